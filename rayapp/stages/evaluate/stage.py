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
import os
from collections import Counter

import pyarrow as pa

from rayapp.config import RunConfig, is_finetune_subset, subset_folder
from rayapp.core import keyed, storage
from rayapp.core.artifacts import artifact_uid
from rayapp.core.errors import RayappError
from rayapp.core.hashing import fingerprint
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import EvaluationManifest, FinetuneManifest, file_digest, require_manifest
from rayapp.core.stage import Stage, StageContext
from rayapp.core.template import PromptFormatter
from rayapp.stages.evaluate.evalsets import load_eval_set, resolve_set
from rayapp.stages.evaluate.judge import describe_judge
from rayapp.stages.evaluate.verdicts import Tally, format_table, tally_by_set, unparseable_kind

log = get_logger(__name__)


def resolve_model(cfg: RunConfig, layout: RunLayout, entry: str) -> dict:
    """{label, path, identity, data, rows} for training data (a finetune subset), 'base', or a model
    path/name; ``rows``: how many rows the model was fine-tuned on (None: not by this run)."""
    rows = None
    if is_finetune_subset(entry):
        label = subset_folder(entry)
        m: FinetuneManifest = require_manifest(layout, "finetune", label, subset=entry)  # type: ignore[assignment]
        path, data, rows = m.export, m.data, m.rows
    elif entry == "base":
        from rayapp.ml.models import registry

        label, path, data, rows = "base", registry.model_source(cfg, "target"), "nothing (the untrained target)", 0
    else:
        label, path, data = entry.rstrip("/").rsplit("/", 1)[-1], entry, "given by path"
    return {"label": label, "path": path, "identity": artifact_uid(path), "data": data, "rows": rows}


def chat_formatter(cfg: RunConfig, layout: RunLayout | None):
    """How a question becomes a prompt under ``evaluate.prompt_format``: None for the Alpaca template,
    else a function rendering it as one user turn with the chat template the training conversations
    were formatted with (the prepared tokenizer's own, or rayapp's plain one)."""
    from rayapp.core.manifests import PreparedManifest, read_manifest

    fmt = cfg.evaluate.prompt_format
    if fmt == "alpaca":
        return None
    prepared = read_manifest(layout.manifest("prepare"), PreparedManifest) if layout else None
    if fmt == "auto":
        kept = prepared.rows + (prepared.holdout.rows if prepared.holdout else 0) if prepared else 0
        if not prepared or 2 * prepared.conversations <= kept:
            return None
    from rayapp.core.chat import chat_template, generation_prompt
    from rayapp.ml.models import registry
    from rayapp.ml.models.loading import load_tokenizer

    # the target's own tokenizer and template: a target of another family than the selector
    # (stages/finetune/retokenize.py) was trained in its own
    source = registry.model_source(cfg, "target")
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.models.target.trust_remote_code)
    template, kind = chat_template(tokenizer, cfg.data.template.chat)
    log.info("prompts in the %s chat template of %s", kind, source)
    return lambda turns: generation_prompt(tokenizer, template, turns)


def load_prompts(cfg: RunConfig, layout: RunLayout | None = None) -> tuple[list[dict], list[str]]:
    """The prompts of every set the judge can judge, and the sets left out (a reference judge
    needs reference answers; a set without any would only count as unjudged)."""
    ec = cfg.evaluate
    fmt = PromptFormatter(cfg.data.template)
    chat = chat_formatter(cfg, layout)
    rows: list[dict] = []
    skipped: list[str] = []
    for entry in ec.sets:
        name, path, field, id_field = resolve_set(entry, ec.eval_dir, ec.prompt_field)
        got = load_eval_set(name, path, field, id_field, limit=ec.max_prompts)
        if ec.judge.kind == "reference" and not any(r.get("reference") for r in got):
            skipped.append(name)
            continue
        for r in got:
            if chat:
                r["prompt"] = chat(r.get("turns") or [{"role": "user", "content": _question(r)}])
            else:
                r["prompt"] = fmt.prompt(_question(r) if r.get("turns") else r["instruction"], r["input"])
            rows.append(r)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RayappError(f"evaluation prompts have duplicate id {dup!r}: give each set a distinct name")
    if not rows:
        raise RayappError(f"none of the evaluation sets ({', '.join(ec.sets)}) can be judged by "
                          f"{describe_judge(ec.judge)}: they have no reference answers")
    return rows, skipped


def _set_files(cfg: RunConfig) -> dict[str, str]:
    ec = cfg.evaluate
    out = {}
    for entry in ec.sets:
        name, path, _, _ = resolve_set(entry, ec.eval_dir, ec.prompt_field)
        out[name] = file_digest(path) if storage.exists(path) else "missing"
    return out


def _generations(cfg: RunConfig, layout: RunLayout, models: list[dict], prompts: list[dict],
                 force: bool) -> dict[str, tuple[list[dict], dict]]:
    """Every model's answers: cached ones read back (keyed by model, generation settings and
    prompts), the rest generated together."""
    from rayapp.stages.evaluate.generate import generate

    gen = cfg.evaluate.generation
    out: dict[str, tuple[list[dict], dict]] = {}
    todo: dict[str, str] = {}
    fps: dict[str, str] = {}
    for m in models:
        fps[m["label"]] = fp = fingerprint(model=m["identity"], generation=gen.content(),
                                           prompts=[[p["id"], p["prompt"]] for p in prompts])
        uri = layout.generations(m["label"])
        table = None if force else keyed.read_table(uri, {"rayapp_fingerprint": fp})
        if table is not None:
            log.info("%s: answers up to date (%d) in %s", m["label"], table.num_rows, uri)
            out[m["label"]] = (table.to_pylist(), json.loads(table.schema.metadata.get(b"rayapp_stats", b"{}")))
            continue
        todo[m["label"]] = m["path"]
    if not todo:
        return out
    log.info("generating %d answers each with %s: %s", len(prompts), gen.backend, ", ".join(todo))
    rows = [{k: p[k] for k in ("set", "id", "prompt")} for p in prompts]
    written: list[str] = []

    def kept() -> str:  # asked when a wait stalls: what is on disk by then
        return (f"answers of {len(out) + len(written)} of {len(models)} models under "
                f"{layout.generations('').rsplit('/', 1)[0]}")

    def keep(label: str, answers: list[dict], stats: dict) -> None:
        """Each model's answers written as soon as they are complete: a model that fails later, or
        a stop, costs only its own (called from a generating thread)."""
        log.info("%s: %d new tokens (%s tokens/s)%s", label, stats["new_tokens"], stats["new_tokens_per_s"],
                 f"; {stats['start_s']:.0f} s to the first answer, {stats['decode_s']:.0f} s from it to the last"
                 if "start_s" in stats else "")
        keyed.write_table(layout.generations(label), pa.Table.from_pylist(answers),
                          {"rayapp_fingerprint": fps[label], "rayapp_stats": json.dumps(stats),
                           "rayapp_model": todo[label]})
        written.append(label)

    out.update(generate(rows, todo, gen, trust_remote_code=cfg.models.target.trust_remote_code,
                        stall_s=cfg.ray.stall_timeout_s, committed=kept, on_done=keep))
    return out


def _judge(cfg: RunConfig, layout: RunLayout, a: dict, b: dict, prompts: list[dict], answers: dict,
           force: bool) -> list[dict]:
    from rayapp.stages.evaluate.judge import judge_pairs, make_judge, prompt_record

    jc = cfg.evaluate.judge
    ids = [p["id"] for p in prompts]
    prompt = prompt_record(jc)  # the prompt's hash: a changed prompt file means new judgments
    fp = fingerprint(judge=jc, prompt=prompt, a=[answers[a["label"]][i] for i in ids], b=[answers[b["label"]][i] for i in ids], ids=ids)
    uri = layout.judgments(a["label"], b["label"])
    kept = None if force else keyed.read_records(uri, {"fingerprint": fp})
    if kept is not None:
        log.info("%s vs %s: judgments up to date in %s", a["label"], b["label"], uri)
        return kept
    judge = make_judge(jc)
    items = [{"set": p["set"], "id": p["id"], "question": _question(p),
              "reference": p.get("reference"), "answer_a": answers[a["label"]][p["id"]],
              "answer_b": answers[b["label"]][p["id"]]} for p in prompts]
    log.info("judging %s vs %s on %d prompts x 2 orders: %s", a["label"], b["label"], len(items), judge.name)
    records = judge_pairs(judge, items, jc.max_concurrency)
    for rec, item in zip(records, items):
        rec.update(question=item["question"], answer_a=item["answer_a"], answer_b=item["answer_b"],
                   model_a=a["label"], model_b=b["label"], **prompt)
    keyed.write_records(uri, records, {"fingerprint": fp}, judge=judge.name, **prompt)
    return records


def _question(p: dict) -> str:
    """What the judge reads as the question: the instruction and its input, without the template; a
    conversation's turns under their speakers' names."""
    if p.get("turns"):
        from rayapp.stages.evaluate.evalsets import render_turns

        return render_turns(p["turns"]) if len(p["turns"]) > 1 else p["turns"][0]["content"]
    return p["instruction"] + (f"\n\n{p['input']}" if p["input"].strip() else "")


class EvaluateStage(Stage):
    name = "evaluate"
    help = "generate answers and judge models pairwise (win / tie / lose)"
    manifest_type = EvaluationManifest

    @classmethod
    def placements(cls, cfg: RunConfig) -> list:
        from rayapp.core import placement

        return [placement.generation(cfg.evaluate.generation)]

    @classmethod
    def own_models(cls, cfg: RunConfig) -> list[str]:
        """evaluate.models entries given as a model name rather than training data or 'base': the
        generators load these themselves."""
        return [m for m in cfg.evaluate.models if m != "base" and not is_finetune_subset(m)]

    @classmethod
    def disk_need(cls, cfg: RunConfig, hub_params):
        """The fine-tuned exports it generates with, the staged target where it is compared (or LoRA
        adapters are merged onto it), and models named directly."""
        from rayapp.ops.plan.disk import EXPORT_BYTES_PER_PARAM, GB, HUB_BYTES_PER_PARAM, DiskNeed

        target = cfg.models.target.name_or_path
        p_target = hub_params(target)
        trained = [m for m in cfg.evaluate.models if is_finetune_subset(m)]
        adapters = cfg.finetune.lora is not None and cfg.finetune.lora.export == "adapter"
        exports = 0 if adapters else len(trained) * EXPORT_BYTES_PER_PARAM * p_target
        base = HUB_BYTES_PER_PARAM * p_target if ("base" in cfg.evaluate.models or adapters) else 0
        direct = sum(HUB_BYTES_PER_PARAM * hub_params(m) for m in cls.own_models(cfg) if m.count("/") == 1)
        return DiskNeed(cls.name, kept=exports + base + direct,
                        parts=[f"{len(trained)} fine-tuned exports ({exports / GB:.0f} GB)"]
                        + ([f"the staged {target} ({base / GB:.0f} GB)"] if base else [])
                        + ([f"models named in evaluate.models ({direct / GB:.0f} GB)"] if direct else []))

    @classmethod
    def memory_plans(cls, cfg: RunConfig) -> list:
        from rayapp.core import placement
        from rayapp.ops.plan.check import plan_generation, role_shape

        gen = cfg.evaluate.generation
        return [plan_generation(cfg, cls.name, gen, placement.generation(gen), role_shape(cfg, "target"))]

    def read_inputs(self, cfg: RunConfig, layout: RunLayout) -> list[dict]:
        """The models compared, each resolved to what it is (label, path, identity, rows trained on)."""
        return [resolve_model(cfg, layout, m) for m in cfg.evaluate.models]

    def fingerprint(self, cfg: RunConfig, layout: RunLayout, inputs: list[dict]) -> str:
        return fingerprint(evaluate=cfg.evaluate.content(), template=cfg.data.template, sets=_set_files(cfg),
                           models=[[m["label"], m["identity"]] for m in inputs])

    def run(self, ctx: StageContext) -> EvaluationManifest:
        return evaluate(ctx.cfg, ctx.layout, ctx.force, ctx.inputs)

    def done_detail(self, m: EvaluationManifest) -> dict:
        return {"pairs": ", ".join(m.pairs)} if m.pairs else {}

    def artifacts(self, m: EvaluationManifest, layout: RunLayout) -> list[str]:
        return [p for p in (m.report, m.human_page, layout.results) if p]

    def summary(self, m: EvaluationManifest, layout: RunLayout) -> list[str]:
        lines = [f"{m.prompts} prompts ({', '.join(m.judged_sets)}); judge: {m.judge}"]
        skipped = [s for s in m.sets if s not in m.judged_sets]
        if skipped:
            lines.append(f"not judged (no reference answers for this judge): {', '.join(skipped)}")
        for pair, tallies in m.pairs.items():
            a, b = pair.split(" vs ")
            t = {s: Tally(v["win"], v["tie"], v["lose"], v["unparseable"], v["unjudged"]) for s, v in tallies.items()}
            lines.extend(format_table(t, a, b, m.models.get(a, {}).get("rows"),
                                      m.models.get(b, {}).get("rows")).splitlines())
        if m.report:
            lines.append(f"report: {m.report}")
        if m.human_page:
            lines.append(f"blind judging by people: {m.human_page}")
        return lines


def evaluate(cfg: RunConfig, layout: RunLayout, force: bool = False, models: list[dict] | None = None
             ) -> EvaluationManifest:
    from rayapp.core.raycluster import init_ray

    ec = cfg.evaluate
    models = models if models is not None else [resolve_model(cfg, layout, m) for m in ec.models]
    labels = [m["label"] for m in models]
    if len(set(labels)) != len(labels):
        raise RayappError(f"evaluate.models gives two models the same name: {labels}")
    prompts, skipped = load_prompts(cfg, layout)
    judged_sets = list(dict.fromkeys(p["set"] for p in prompts))
    log.info("%d prompts from %s; models: %s", len(prompts), ", ".join(judged_sets), ", ".join(labels))
    if skipped:
        log.info("not judged: %s (no reference answers, and the judge is %s)", ", ".join(skipped),
                 describe_judge(ec.judge))
    init_ray(cfg)
    answers: dict[str, dict[str, str]] = {}
    gen_stats: dict[str, dict] = {}
    for label, (rows, stats) in _generations(cfg, layout, models, prompts, force).items():
        gen_stats[label] = stats
        answers[label] = {r["id"]: r["answer"] for r in rows}

    # reference-based automatic metric, no judge needed: ROUGE-L where a set has references
    from rayapp.stages.evaluate.judge import ReferenceJudge

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

    from rayapp.stages.evaluate.report import write_report

    judge_name = describe_judge(ec.judge)

    remote = storage.is_remote(layout.evaluation)
    if remote:  # drawn locally, then uploaded beside the other outputs
        import tempfile

        out_local = tempfile.mkdtemp(prefix="rayapp-eval-report-")
    else:
        out_local = storage.local_path(layout.evaluation)
    report = write_report(out_local, f"rayapp evaluation: {cfg.name}", judge_name, pairs,
                          {m["label"]: m for m in models}, rouge, examples)
    human_page = None
    if ec.human_page:
        from rayapp.stages.evaluate import human

        items, key = human.build_items([(a["label"], b["label"]) for b in models[1:]],
                                       [{**p, "question": _question(p)} for p in prompts], answers, seed=cfg.seed)
        human_page = human.write_page(os.path.join(out_local, "human"), f"Which answer is better? ({cfg.name})",
                                      items, key)
        log.info("page for people to judge the pairs blind: %s (the key to its models: %s)", human_page,
                 os.path.join(os.path.dirname(human_page), human.KEY))
    if remote:
        storage.upload_dir(out_local, layout.evaluation)
        report = storage.join(layout.evaluation, "report.html")
        human_page = storage.join(layout.evaluation, "human", "index.html") if human_page else None
    results = EvaluationManifest(
        judge=judge_name, sets=[resolve_set(e, ec.eval_dir, ec.prompt_field)[0] for e in ec.sets],
        judged_sets=judged_sets, prompts=len(prompts),
        models={m["label"]: {"path": m["path"], "data": m["data"], "rows": m["rows"],
                             "generation": gen_stats[m["label"]]} for m in models},
        pairs={k: {s: t.as_dict() for s, t in v.items()} for k, v in pairs.items()},
        unparseable_reasons=unparseable, rouge_l=rouge, report=report, human_page=human_page,
    )
    storage.write_json(layout.results, results.model_dump(mode="json"))
    rows = {m["label"]: m["rows"] for m in models}  # each table names the rows its models trained on
    for key, tallies in pairs.items():
        x, y = key.split(" vs ")
        for line in format_table(tallies, x, y, rows[x], rows[y]).splitlines():
            log.info("%s", line)
    log.info("judge: %s%s", judge_name, f"; report: {report}" if report else "")
    return results
