"""One scoring measurement, runnable against any rayapp checkout (this one or a baseline worktree):
prepare N real Alpaca rows at the default data settings, then score them with 1 and with 2 actors
on a fresh local Ray cluster, and print the engine's stats as one JSON line.

    PYTHONPATH=CHECKOUT python benchmarks/score_probe.py ALPACA_JSONL --rows 3000

It uses only the API that has not changed across the commits it compares (``load_config``, the
prepare stage, ``score_checkpoints``), so ``python -m benchmarks score --baseline COMMIT`` can run
the same measurement on an older engine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("alpaca")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--actors", default="1,2", help="actor counts; 0: score.local (no actors)")
    a = p.parse_args()

    import ray

    from rayapp.config import DataConfig, ScoreConfig, load_config
    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import CheckpointRecord
    from rayapp.ml.models import registry
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.pipeline import run as run_stage
    from rayapp.stages.score.engine import score_checkpoints
    from rayapp.stages.score.stage import special_ids

    work = tempfile.mkdtemp(prefix="rayapp-score-probe-")
    defaults = DataConfig.model_fields  # the shipped defaults, not tiny.yaml's
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={work}", f"data.sources=[{{path: {a.alpaca}, limit: {a.rows}}}]",
        f"data.shard_rows={defaults['shard_rows'].default}", f"data.max_length={defaults['max_length'].default}"])
    manifest = run_stage("prepare", cfg).manifest
    bos, pad = special_ids(load_tokenizer(manifest.tokenizer))
    ck = [CheckpointRecord(name="epoch-0", path=registry.model_source(cfg, "reference"), uid="probe")]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = []
    for n in (int(x) for x in a.actors.split(",")):
        # 0: score.local, in this process (1 thread, as one 1-CPU actor has)
        local = {"local": True} if n == 0 else {}
        sc = ScoreConfig(modes=["prompted"], resources={"num_cpus": 1, "min_actors": max(n, 1), "max_actors": max(n, 1)},
                         **local)
        t0 = time.perf_counter()
        stats = score_checkpoints(RunLayout(cfg.output_dir).prepared, manifest, ck,
                                  storage.join(work, f"scores-{n}"), sc, bos, pad)
        stats["wall_s"] = time.perf_counter() - t0
        stats["actors"] = n
        runs.append(stats)
    ray.shutdown()
    print("PROBE " + json.dumps({"rows": manifest.rows, "shard_rows": cfg.data.shard_rows,
                                 "max_length": cfg.data.max_length, "runs": runs}))


if __name__ == "__main__":
    main()
