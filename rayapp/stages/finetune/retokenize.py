"""A target of another family than the selector: the selected rows in the target's own tokens.

Selection is by row id (a content hash of the text), so it does not depend on the selector's
tokenizer. When the target's vocabulary differs from the prepared data's, the rows it trains on
(and the held-out rows its eval loss is measured on) are tokenized again from their text, as
prepare would have tokenized them for the target: Alpaca rows with the Alpaca prompt and the
target's EOS, conversations with the target's chat template (``data.template.chat``), the same
``max_length`` and ``truncation``. Rows the target cannot use are reported, never trained on
silently: rows too long for it (``truncation: drop``), rows its chat template cannot render, and
rows left with no response tokens (their prompt fills ``max_length`` in the target's tokens).
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa

from rayapp.config import DataConfig
from rayapp.core import storage
from rayapp.core.chat import chat_template
from rayapp.core.template import PromptFormatter
from rayapp.ml.tokenize import tokenize_rows

TOKEN_COLUMNS = ("input_ids", "labels", "n_tokens", "n_response_tokens", "truncated")


def retokenize(table: pa.Table, tokenizer, data: DataConfig) -> tuple[pa.Table, Counter, list[dict]]:
    """``table``'s rows in ``tokenizer``'s tokens: (the rows kept, counts of what was done to how
    many rows, one reject record per row left out)."""
    n = table.num_rows
    messages = table["messages"].to_pylist() if "messages" in table.column_names else [None] * n
    prompts, outputs = table["prompt"].to_pylist(), table["output"].to_pylist()
    respond = PromptFormatter.response
    items = [{"prompt": p, "response": respond(o, tokenizer.eos_token)} if m is None else {"messages": m}
             for p, o, m in zip(prompts, outputs, messages)]
    template = chat_template(tokenizer, data.template.chat)[0] if any(m is not None for m in messages) else None
    tokens = tokenize_rows(tokenizer, items, data.max_length, data.truncation, template)
    ids = table["id"].to_pylist()
    keep, rejects, counts = [], [], Counter(rows_in=n)
    cols: dict[str, list] = {c: [] for c in TOKEN_COLUMNS}
    for i, (rid, tk) in enumerate(zip(ids, tokens)):
        reason = None
        if tk.error:
            reason, key = tk.error, "template_errors"
        elif tk.truncated and data.truncation == "drop":
            reason, key = (f"too long for the target: {tk.full_length} tokens > max_length {data.max_length} "
                           "(truncation: drop)"), "dropped_too_long"
        elif tk.n_response_tokens == 0:
            reason, key = (f"no response tokens left in the target's tokens (the prompt fills max_length "
                           f"{data.max_length})"), "no_response_tokens"
        if reason:
            rejects.append({"id": rid, "reason": reason})
            counts[key] += 1
            continue
        counts["truncated"] += tk.truncated
        counts["turns_dropped"] += tk.turns_dropped > 0
        keep.append(i)
        for c, v in zip(TOKEN_COLUMNS, (tk.input_ids, tk.labels, len(tk.input_ids), tk.n_response_tokens,
                                        tk.truncated)):
            cols[c].append(v)
    out = table.take(pa.array(keep, pa.int64()))
    for c in TOKEN_COLUMNS:
        field = out.schema.field(c)
        out = out.set_column(out.schema.get_field_index(c), field, pa.array(cols[c], field.type))
    counts["rows"] = out.num_rows
    return out, counts, rejects


def retokenize_files(files: list[str], out: str, rejects_out: str, tokenizer, data: DataConfig) -> Counter:
    """``retokenize`` over the rows of ``files``, written to ``out`` (one Parquet file) and
    ``rejects_out`` (JSONL: id and reason per row left out)."""
    table = pa.concat_tables([storage.read_parquet(f) for f in files], promote_options="default")
    kept, counts, rejects = retokenize(table, tokenizer, data)
    if not kept.num_rows:
        from rayapp.core.errors import InputDataError

        raise InputDataError(f"none of the {table.num_rows} rows in {', '.join(files)} is usable in the target's "
                             f"tokens; see {rejects_out}")
    storage.write_parquet(out, kept)
    storage.write_text(rejects_out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    return counts
