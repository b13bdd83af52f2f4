"""Evaluation: the hf generation backend on a real local Ray cluster, and the judge client against
a real HTTP server on 127.0.0.1 (a scripted one here for deterministic answers; `vllm serve` in
test_vllm.py)."""

from __future__ import annotations

import json

import pytest

from rayapp.config import GenerationConfig, JudgeConfig
from rayapp.stages.evaluate.evalsets import BUILTIN_SETS, EvalSetError, load_eval_set, resolve_set
from rayapp.stages.evaluate.judge import EndpointJudge, JudgeError, ReferenceJudge, judge_pairs
from tests.conftest import SHARED
from tests.judge_server import ScriptedJudgeServer


def _items():
    return [
        {"set": "s", "id": "1", "question": "q1", "answer_a": "a GOOD answer", "answer_b": "meh"},
        {"set": "s", "id": "2", "question": "q2", "answer_a": "meh", "answer_b": "GOOD too"},
        {"set": "t", "id": "3", "question": "q3", "answer_a": "GOOD", "answer_b": "also GOOD"},
    ]


def _endpoint(server, model, **kw):
    return EndpointJudge(JudgeConfig(kind="endpoint", base_url=server.base_url, model=model, **kw))


def test_judge_both_orders_and_verdicts(monkeypatch):
    monkeypatch.setenv("RAYAPP_TEST_JUDGE_KEY", "sk-test-123")
    with ScriptedJudgeServer() as server:
        records = judge_pairs(_endpoint(server, "fair", api_key_env="RAYAPP_TEST_JUDGE_KEY"), _items(), 2)
        assert [r["verdict"] for r in records] == ["win", "lose", "tie"]
        assert len(server.requests) == 6  # every prompt judged in both orders
        assert all(r["auth"] == "Bearer sk-test-123" for r in server.requests)
        # order (B, A) really shows B's answer first
        second = [r for r in server.requests if "q1" in r["body"]["messages"][-1]["content"]]
        firsts = [r["body"]["messages"][-1]["content"].split("answer starts]\n")[1].split("\n")[0] for r in second]
        assert sorted(firsts) == ["a GOOD answer", "meh"]
    assert all(r["review_ab"] and r["review_ba"] for r in records)  # raw judge text kept


def test_the_judge_prompt_is_a_file_with_its_hash_recorded(tmp_path):
    """The prompt the endpoint receives is the configured file's text (answers with braces intact);
    the length-neutral sentence is an option that changes the prompt and its hash; a file without
    the three fields is refused, naming the file and what is missing."""
    from rayapp.stages.evaluate.judge import DEFAULT_PROMPT_FILE, LENGTH_NEUTRAL, judge_prompt, prompt_record

    mine = tmp_path / "mine.txt"
    mine.write_text("Q: {question}\nFIRST: {answer_1}\nSECOND: {answer_2}\nScores on line one.\n")
    items = [{"set": "s", "id": "1", "question": "q1 {x}", "answer_a": "a GOOD {answer_2}", "answer_b": "meh"}]
    with ScriptedJudgeServer() as server:
        # 'biased' answers "9 5" whatever the prompt looks like: a tie over both orders
        records = judge_pairs(_endpoint(server, "biased", prompt_file=str(mine)), items, 1)
        sent = [r["body"]["messages"][-1]["content"] for r in server.requests]
    assert records[0]["verdict"] == "tie"
    assert sorted(sent) == ["Q: q1 {x}\nFIRST: a GOOD {answer_2}\nSECOND: meh\nScores on line one.",
                            "Q: q1 {x}\nFIRST: meh\nSECOND: a GOOD {answer_2}\nScores on line one."]

    default = JudgeConfig(kind="endpoint", base_url="http://127.0.0.1:1/v1", model="m")
    neutral = default.model_copy(update={"length_neutral": True})
    assert judge_prompt(default).source == DEFAULT_PROMPT_FILE and LENGTH_NEUTRAL not in judge_prompt(default).template
    assert judge_prompt(neutral).template.endswith(LENGTH_NEUTRAL)
    hashes = {prompt_record(c)["judge_prompt_sha256"] for c in (default, neutral,
              default.model_copy(update={"prompt_file": str(mine)}))}
    assert len(hashes) == 3 and all(len(h) == 64 for h in hashes)
    assert prompt_record(JudgeConfig(kind="reference")) == {"judge_prompt_sha256": None}

    bad = tmp_path / "bad.txt"
    bad.write_text("Which is better, {answer_1} or {answer_2}?")
    with pytest.raises(JudgeError, match=r"bad.txt: the template lacks \{question\}"):
        judge_prompt(default.model_copy(update={"prompt_file": str(bad)}))


def test_position_biased_judge_gives_ties():
    with ScriptedJudgeServer() as server:
        records = judge_pairs(_endpoint(server, "biased"), _items())
    assert [r["verdict"] for r in records] == ["tie", "tie", "tie"]


def test_unparseable_judgments_are_counted_not_guessed():
    with ScriptedJudgeServer() as server:
        records = judge_pairs(_endpoint(server, "garbled"), _items())
    assert [r["verdict"] for r in records] == ["unparseable"] * 3
    assert all("first line" in r["reason"] and r["review_ab"].startswith("Both") for r in records)


def test_client_retries_server_errors():
    with ScriptedJudgeServer() as server:
        records = judge_pairs(_endpoint(server, "flaky", retries=2), _items()[:1], 1)
        assert records[0]["verdict"] == "win"
        assert len(server.requests) == 4  # two failures retried


def test_refused_requests_are_counted_and_dead_judges_stop_the_stage():
    with ScriptedJudgeServer() as server:
        records = judge_pairs(_endpoint(server, "strict"), _items()[:2])
        base_url = server.base_url
    assert [r["verdict"] for r in records] == ["unjudged", "unjudged"]
    assert all("context length" in r["reason"] for r in records)
    dead = EndpointJudge(JudgeConfig(kind="endpoint", base_url=base_url, model="fair", retries=0, timeout_s=5))
    with pytest.raises(JudgeError, match="s/1"):
        judge_pairs(dead, _items()[:1])


def test_remote_judge_needs_key_from_environment(monkeypatch):
    monkeypatch.delenv("RAYAPP_NO_SUCH_KEY", raising=False)
    with pytest.raises(JudgeError, match="RAYAPP_NO_SUCH_KEY"):
        EndpointJudge(JudgeConfig(kind="endpoint", base_url="https://judge.example.com/v1", model="m",
                                  api_key_env="RAYAPP_NO_SUCH_KEY"))
    with pytest.raises(Exception, match="api_key"):  # a key in a config file is refused outright
        JudgeConfig(kind="endpoint", base_url="http://127.0.0.1:1/v1", model="m", api_key="sk-oops")


def test_reference_judge_rates_by_rouge():
    j = ReferenceJudge()
    recs = judge_pairs(j, [{"set": "s", "id": "1", "question": "q", "reference": "the cat sat on the mat",
                            "answer_a": "the cat sat on a mat", "answer_b": "dogs bark"},
                           {"set": "s", "id": "2", "question": "q", "reference": None,
                            "answer_a": "x", "answer_b": "y"}])
    assert [r["verdict"] for r in recs] == ["win", "unjudged"]


def test_builtin_eval_sets_load():
    sizes = {"vicuna": 80, "koala": 180, "wizardlm": 218, "sinstruct": 252, "lima": 300}
    for name, n in sizes.items():
        _, path, field, id_field = resolve_set(name, str(SHARED / "eval"), "prompt")
        rows = load_eval_set(name, path, field, id_field)
        assert len(rows) == n and all(r["instruction"].strip() for r in rows)
        assert len({r["id"] for r in rows}) == n
    sinstruct = load_eval_set("sinstruct", str(SHARED / "eval" / BUILTIN_SETS["sinstruct"].file), "instruction", "id")
    assert all(r["reference"] for r in sinstruct) and any(r["input"] for r in sinstruct)


def test_custom_jsonl_set_errors_name_file_and_line(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text(json.dumps({"question": "hi"}) + "\n" + json.dumps({"q": "x"}) + "\n")
    name, path, field, _ = resolve_set(str(p), "unused", "question")
    with pytest.raises(EvalSetError, match=r"mine.jsonl:2: field 'question' is missing"):
        load_eval_set(name, path, field)
    with pytest.raises(EvalSetError, match="unknown evaluation set"):
        resolve_set("nope", "unused", "prompt")


@pytest.mark.slow
def test_hf_backend_generates_on_ray(ray_local, make_config):
    from rayapp.ml.models import registry
    from rayapp.ml.models.tiny import train_tokenizer
    from rayapp.stages.evaluate.generate import generate
    from tests.conftest import alpaca_rows

    cfg = make_config([{"path": "unused.jsonl"}])
    rows = alpaca_rows(200)
    import os

    train_tokenizer((r["instruction"] + " " + r["output"] for r in rows), 512, registry.tokenizer_source(cfg))
    model = registry.model_source(cfg, "target")
    prompts = [{"set": "s", "id": str(i), "prompt": f"### Instruction:\n{r['instruction']}\n\n### Response:"}
               for i, r in enumerate(rows[:10])]
    gen = GenerationConfig(max_new_tokens=12, batch_size=4, temperature=0.8, seed=7,
                           resources={"num_cpus": 1, "min_actors": 1, "max_actors": 1})
    base = registry.model_source(cfg, "reference")  # a second model, answered from the same actor pool
    both = generate(prompts, {"target": model, "other": base}, gen)
    out, stats = both["target"]
    assert [r["id"] for r in out] == [p["id"] for p in prompts]  # input order kept
    assert all(0 < r["new_tokens"] <= 12 and isinstance(r["answer"], str) for r in out)
    assert stats["new_tokens"] == sum(r["new_tokens"] for r in out) and stats["new_tokens_per_s"] > 0
    # start-up (the pool's start, the first model's load and chunk) apart from decoding: one pool's
    for _, model_stats in both.values():
        assert model_stats["start_s"] > 0 and model_stats["decode_s"] >= 0
        assert model_stats["start_s"] + model_stats["decode_s"] <= model_stats["seconds"] + 0.01
        assert model_stats["start_s"] == stats["start_s"] and model_stats["models_at_once"] == 2
    assert [r["answer"] for r in both["other"][0]] != [r["answer"] for r in out]  # each model answered itself
    again, _ = generate(prompts, {"target": model}, gen)["target"]
    # seeded: reproducible, whichever models share the pool (each batch holds one model's prompts)
    assert [r["answer"] for r in again] == [r["answer"] for r in out]
    assert os.path.isdir(model)


def test_models_generating_at_once_fit_the_clusters_gpus():
    from rayapp.stages.evaluate.generate import models_at_once

    tp2 = GenerationConfig(backend="vllm", tensor_parallel_size=2, resources={"max_actors": 2, "num_gpus": 1})
    assert models_at_once(tp2, 3, {"GPU": 16}) == 3  # 4 GPUs a model: three models on two free 8-GPU nodes
    assert models_at_once(tp2, 3, {"GPU": 8}) == 2 and models_at_once(tp2, 3, {"GPU": 4}) == 1
    assert models_at_once(tp2, 3, {}) == 1  # GPU nodes not up yet: one model at a time, as before
    assert models_at_once(tp2.model_copy(update={"concurrent_models": 2}), 3, {}) == 2
    assert models_at_once(tp2.model_copy(update={"concurrent_models": 9}), 3, {}) == 3
    # the engines' bundles ask for the node-type label too: only the labelled GPUs count
    labelled = tp2.model_copy(update={"resources": tp2.resources.model_copy(update={"resources": {"gpu_8x": 1}})})
    assert models_at_once(labelled, 3, {"GPU": 16, "gpu_8x": 8}) == 2
    assert models_at_once(labelled, 3, {"GPU": 16}) == 1
    # the answers do not depend on it: their cache key leaves it out
    assert tp2.content() == tp2.model_copy(update={"concurrent_models": 2}).content()
    assert "concurrent_models" not in tp2.content()


def test_vllm_inputs_honour_trust_remote_code(tmp_path, make_config):
    """Defect: the vLLM path read the model's config and tokenizer without the config's
    trust_remote_code, so a model that ships its own code failed before reaching the engine."""
    from rayapp.ml.models.tiny import train_tokenizer
    from rayapp.stages.evaluate.generate import vllm_inputs
    from tests.conftest import alpaca_rows

    model = tmp_path / "custom"
    model.mkdir()
    train_tokenizer((r["instruction"] + " " + r["output"] for r in alpaca_rows(50)), 400, str(model))
    (model / "configuration_custom.py").write_text(
        "from transformers import PretrainedConfig\n\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'rayapp_custom'\n\n"
        "    def __init__(self, max_position_embeddings=64, **kw):\n"
        "        self.max_position_embeddings = max_position_embeddings\n        super().__init__(**kw)\n")
    (model / "config.json").write_text(json.dumps({
        "model_type": "rayapp_custom", "max_position_embeddings": 64,
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    rows = [{"set": "s", "id": "1", "prompt": "word " * 200}]
    gen = GenerationConfig(max_new_tokens=16)
    with pytest.raises(ValueError, match="trust_remote_code"):
        vllm_inputs(rows, str(model), gen, None, trust_remote_code=False)
    fitted, engine = vllm_inputs(rows, str(model), gen, None, trust_remote_code=True)
    assert engine["trust_remote_code"] is True and engine["max_model_len"] == 64
    assert len(fitted[0]["prompt"]) < len(rows[0]["prompt"])  # cut from the left to fit 64 - 16 tokens
