"""The evaluate stage: every model answers the evaluation prompts (Ray Data actors; hf or vLLM),
the first model is judged pairwise against each other one in both orders, and the run gets a
win / tie / lose table, ROUGE-L where sets have reference answers, and a report.

Outputs under ``<output_dir>/evaluate/``:
  generations/<model>.parquet      answers (+ tokens, finish reason), cached by a fingerprint
  judgments/<A>-vs-<B>.jsonl       raw judge texts for both orders and the verdict per prompt
  results.json / results.md / results.png / report.html
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa

from rayapp.common import storage
from rayapp.common.hashing import sha256_bytes
from rayapp.common.layout import RunLayout
from rayapp.common.manifests import MissingInputError
from rayapp.config import RunConfig
from rayapp.evaluate.evalsets import load_eval_set, resolve_set
from rayapp.evaluate.judge import describe_judge
from rayapp.evaluate.verdicts import Tally, format_table, tally_by_set, unparseable_kind
from rayapp.prepare.template import PromptFormatter
from rayapp.train.checkpoints import EXPORT_MARKER

FINETUNE_SUBSETS = ("selected", "full", "random")


def resolve_model(cfg: RunConfig, layout: RunLayout, entry: str) -> dict:
    """{label, path, identity, data} for a finetune subset, 'base', or a model path/name."""
    if entry in FINETUNE_SUBSETS:
        uri = storage.join(layout.finetune(entry), "manifest.json")
        if not storage.exists(uri):
            raise MissingInputError(
                f"no fine-tuned '{entry}' model (missing {uri}): run "
                f"`rayapp finetune --config ... --set finetune.subset={entry}` first")
        m = storage.read_json(uri)
        path, data = m["export"], m["data"]
    elif entry == "base":
        from rayapp.models import registry

        path, data = registry.model_source(cfg, "target"), "nothing (the untrained target)"
    else:
        path, data = entry, "given by path"
    marker = storage.join(path, EXPORT_MARKER)
    identity = storage.read_json(marker)["uid"] if storage.exists(marker) else path
    label = entry if entry in FINETUNE_SUBSETS or entry == "base" else entry.rstrip("/").rsplit("/", 1)[-1]
    return {"label": label, "path": path, "identity": identity, "data": data}


def load_prompts(cfg: RunConfig) -> list[dict]:
    ec = cfg.evaluate
    fmt = PromptFormatter(cfg.data.template)
    rows: list[dict] = []
    for entry in ec.sets:
        name, path, field, id_field = resolve_set(entry, ec.eval_dir, ec.prompt_field)
        for r in load_eval_set(name, path, field, id_field, limit=ec.max_prompts):
            r["prompt"] = fmt.prompt(r["instruction"], r["input"])
            rows.append(r)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"evaluation prompts have duplicate id {dup!r}: give each set a distinct name")
    return rows


def _generations(cfg: RunConfig, layout: RunLayout, model: dict, prompts: list[dict], force: bool) -> tuple[list[dict], dict]:
    from rayapp.evaluate.generate import generate

    gen = cfg.evaluate.generation
    fp = sha256_bytes("|".join([model["identity"], gen.model_dump_json(),
                                *(f"{p['id']}\x1f{p['prompt']}" for p in prompts)]).encode())[:16]
    uri = storage.join(layout.evaluation, "generations", f"{model['label']}.parquet")
    if not force and storage.exists(uri):
        table = storage.read_parquet(uri)
        meta = table.schema.metadata or {}
        if meta.get(b"rayapp_fingerprint", b"").decode() == fp:
            print(f"[evaluate] {model['label']}: answers up to date ({table.num_rows}) in {uri}")
            return table.to_pylist(), json.loads(meta.get(b"rayapp_stats", b"{}"))
    print(f"[evaluate] {model['label']}: generating {len(prompts)} answers with {gen.backend} from {model['path']}", flush=True)
    rows, stats = generate([{k: p[k] for k in ("set", "id", "prompt")} for p in prompts], model["path"], gen,
                           trust_remote_code=cfg.models.target.trust_remote_code)
    print(f"[evaluate] {model['label']}: {stats['new_tokens']} new tokens in {stats['seconds']}s "
          f"({stats['new_tokens_per_s']} tokens/s)", flush=True)
    table = pa.Table.from_pylist(rows).replace_schema_metadata(
        {"rayapp_fingerprint": fp, "rayapp_stats": json.dumps(stats), "rayapp_model": model["path"]})
    storage.write_parquet(uri, table)
    return rows, stats


def _judge(cfg: RunConfig, layout: RunLayout, a: dict, b: dict, prompts: list[dict], answers: dict,
           force: bool) -> list[dict]:
    from rayapp.evaluate.judge import judge_pairs, make_judge

    jc = cfg.evaluate.judge
    fp = sha256_bytes("|".join([jc.model_dump_json(), json.dumps(answers[a["label"]], sort_keys=True),
                                json.dumps(answers[b["label"]], sort_keys=True)]).encode())[:16]
    uri = storage.join(layout.evaluation, "judgments", f"{a['label']}-vs-{b['label']}.jsonl")
    meta_uri = uri + ".meta.json"
    if not force and storage.exists(meta_uri) and storage.read_json(meta_uri).get("fingerprint") == fp:
        print(f"[evaluate] {a['label']} vs {b['label']}: judgments up to date in {uri}")
        return [json.loads(l) for l in storage.read_bytes(uri).decode().splitlines() if l.strip()]
    judge = make_judge(jc)
    items = [{"set": p["set"], "id": p["id"], "question": _question(p),
              "reference": p.get("reference"), "answer_a": answers[a["label"]][p["id"]],
              "answer_b": answers[b["label"]][p["id"]]} for p in prompts]
    print(f"[evaluate] judging {a['label']} vs {b['label']} on {len(items)} prompts x 2 orders: {judge.name}", flush=True)
    records = judge_pairs(judge, items, jc.max_concurrency)
    for rec, item in zip(records, items):
        rec.update(question=item["question"], answer_a=item["answer_a"], answer_b=item["answer_b"],
                   model_a=a["label"], model_b=b["label"])
    storage.write_text(uri, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    storage.write_json(meta_uri, {"fingerprint": fp, "judge": judge.name, "rows": len(records)})
    return records


def _question(p: dict) -> str:
    """What the judge reads as the question: the instruction and its input, without the template."""
    return p["instruction"] + (f"\n\n{p['input']}" if p["input"].strip() else "")


def run_evaluate(cfg: RunConfig, force: bool = False) -> dict:
    from rayapp.common.raycluster import init_ray

    ec = cfg.evaluate
    layout = RunLayout(cfg.output_dir)
    models = [resolve_model(cfg, layout, m) for m in ec.models]
    labels = [m["label"] for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"evaluate.models gives two models the same name: {labels}")
    prompts = load_prompts(cfg)
    print(f"[evaluate] {len(prompts)} prompts from {', '.join(ec.sets)}; models: {', '.join(labels)}")
    init_ray(cfg)
    answers: dict[str, dict[str, str]] = {}
    gen_stats: dict[str, dict] = {}
    for m in models:
        rows, gen_stats[m["label"]] = _generations(cfg, layout, m, prompts, force)
        answers[m["label"]] = {r["id"]: r["answer"] for r in rows}

    # reference-based automatic metric, no judge needed: ROUGE-L where a set has references
    from rayapp.evaluate.judge import ReferenceJudge

    rouge: dict[str, dict[str, float]] = {}
    with_ref = [p for p in prompts if p.get("reference")]
    if with_ref:
        scorer = ReferenceJudge()
        for label in labels:
            per: dict[str, list[float]] = {}
            for p in with_ref:
                per.setdefault(p["set"], []).append(scorer.rouge_l(answers[label][p["id"]], p["reference"]))
            rouge[label] = {s: sum(v) / len(v) for s, v in per.items()}

    a = models[0]
    pairs: dict[str, dict[str, Tally]] = {}
    unparseable: dict[str, dict[str, int]] = {}
    examples: list[dict] = []
    for b in models[1:]:
        records = _judge(cfg, layout, a, b, prompts, answers, force)
        key = f"{a['label']} vs {b['label']}"
        pairs[key] = tally_by_set((r["set"], r["verdict"]) for r in records)
        unparseable[key] = dict(Counter(unparseable_kind(r["reason"]) for r in records if r["verdict"] == "unparseable"))
        examples += [r for r in records if r["verdict"] in ("win", "tie", "lose")][:4]

    from rayapp.evaluate.report import write_report

    judge_name = describe_judge(ec.judge)

    remote = storage.is_remote(layout.evaluation)
    if remote:  # drawn locally, then uploaded beside the other outputs
        import tempfile

        out_local = tempfile.mkdtemp(prefix="rayapp-eval-report-")
    else:
        out_local = storage.local_path(layout.evaluation)
    report = write_report(out_local, f"rayapp evaluation: {cfg.name}", judge_name, pairs,
                          {m["label"]: m for m in models}, rouge, examples)
    if remote:
        storage.upload_dir(out_local, layout.evaluation)
        report = storage.join(layout.evaluation, "report.html")
    results = {
        "stage": "evaluate", "judge": judge_name, "sets": ec.sets, "prompts": len(prompts),
        "models": {m["label"]: {"path": m["path"], "data": m["data"], "generation": gen_stats[m["label"]]} for m in models},
        "pairs": {k: {s: t.as_dict() for s, t in v.items()} for k, v in pairs.items()},
        "unparseable_reasons": unparseable,
        "rouge_l": rouge, "report": report,
    }
    storage.write_json(storage.join(layout.evaluation, "results.json"), results)
    for key, tallies in pairs.items():
        x, y = key.split(" vs ")
        print(format_table(tallies, x, y))
    print(f"[evaluate] judge: {judge_name}" + (f"; report: {report}" if report else ""))
    return results
