"""Ray plumbing for prepare: blocks of the sources read and normalised as Ray Data tasks, and the
kept rows tokenized by a pool of actors that each load the tokenizer once. Results come back in
source order whatever order the tasks finish in (the driver sorts them), so the prepared data are
the same as with ``data.workers: 0``."""

from __future__ import annotations

import json
from dataclasses import asdict

from rayapp.config import TemplateConfig
from rayapp.core.watchdog import watched_iter
from rayapp.stages.prepare.blocks import Block, BlockResult, process_block

NOTHING_YET = "nothing yet (prepare writes its shards once every row is read and tokenized)"


def _process(item: dict) -> dict:
    job = json.loads(item["job"])
    job["block"], job["template"] = Block(**job["block"]), TemplateConfig(**job["template"])
    job["detected_at"] = tuple(job["detected_at"]) if job["detected_at"] else None
    return {"result": process_block(**job)}


def process_blocks(jobs: list[dict], workers: int, stall_s: float | None = None) -> list[BlockResult]:
    """``process_block(**job)`` for every job, ``workers`` at a time, as Ray Data tasks. Each block
    read is progress for the watchdog (``stall_s``: ray.stall_timeout_s; core/watchdog.py)."""
    import ray.data

    # each job as JSON: Ray Data keeps plain columns (the results come back as Python objects)
    items = [{"job": json.dumps({**job, "block": asdict(job["block"]), "template": job["template"].model_dump()})}
             for job in jobs]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    rows = watched_iter(ds.map(_process, num_cpus=1, concurrency=min(workers, len(items))).iter_rows(),
                        stage="prepare", stall_s=stall_s, committed=NOTHING_YET,
                        waiting_for=f"the source-reading tasks (Ray Data, {len(items)} blocks)")
    results = [row["result"] for row in rows]
    return sorted(results, key=lambda r: (r.block.source, r.block.index))


class _Tokenizer:
    def __init__(self, tokenizer: str, trust_remote_code: bool, max_length: int, truncation: str,
                 chat_template: str | None):
        from rayapp.ml.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.max_length, self.truncation, self.chat_template = max_length, truncation, chat_template

    def __call__(self, item: dict) -> dict:
        from rayapp.ml.tokenize import tokenize_rows

        return {"lo": item["lo"], "tokens": tokenize_rows(self.tokenizer, json.loads(item["rows"]), self.max_length,
                                                          self.truncation, self.chat_template)}


def tokenize(rows: list[dict], tokenizer: str, trust_remote_code: bool, max_length: int, truncation: str,
             chat_template: str | None, workers: int, chunk_rows: int = 4096, stall_s: float | None = None) -> list:
    """``tokenize_rows`` over all rows (Alpaca ``{prompt, response}`` or ``{messages}``), in chunks,
    on ``workers`` actors; results in row order. Each tokenized chunk is progress for the watchdog
    (``stall_s``)."""
    import ray.data

    # each chunk's rows as JSON: Alpaca rows and conversations have different shapes
    chunks = [{"lo": lo, "rows": json.dumps(rows[lo:lo + chunk_rows], ensure_ascii=False)}
              for lo in range(0, len(rows), chunk_rows)]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map(
        _Tokenizer, fn_constructor_kwargs=dict(tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                                               max_length=max_length, truncation=truncation,
                                               chat_template=chat_template),
        num_cpus=1, concurrency=min(workers, len(chunks)))
    done = sorted(watched_iter(ds.iter_rows(), stage="prepare", stall_s=stall_s, committed=NOTHING_YET,
                               waiting_for=f"the tokenizer actor pool (Ray Data, {len(chunks)} chunks)"),
                  key=lambda row: row["lo"])
    return [tk for row in done for tk in row["tokens"]]
