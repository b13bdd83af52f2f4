"""Stage progress and throughput as Ray metrics (``ray.util.metrics``).

Each node's metrics agent exports them on its Prometheus endpoint (``ray.nodes()``'s
``MetricsExportPort``), with Ray's ``ray_`` prefix (and ``_total`` on counters); the dashboard's metrics views and
``ray metrics launch-prometheus`` read them from there. The names:

| metric | kind | tags | what |
|---|---|---|---|
| ``rayapp_score_rows`` | counter | checkpoint | rows scored |
| ``rayapp_score_tokens`` | counter | checkpoint | tokens scored (``rate()``: tokens/s) |
| ``rayapp_actors_alive`` | gauge | pool | 1 per live actor of a pool (``sum by (pool)``) |
| ``rayapp_train_step`` | gauge | stage | training step (rank 0) |
| ``rayapp_train_total_steps`` | gauge | stage | the run's total steps |
| ``rayapp_train_tokens_per_s`` | gauge | stage | training tokens/s, all workers |
| ``rayapp_train_loss`` | gauge | stage | last training loss |
| ``rayapp_generated_tokens`` | counter | model | answer tokens generated (``rate()``: tokens/s) |

Outside Ray (the GPU check, the in-process scorer before ``ray.init``) every call is a no-op.
"""

from __future__ import annotations

_METRICS: dict[str, object] = {}

DESCRIPTIONS = {
    "rayapp_score_rows": "Rows scored",
    "rayapp_score_tokens": "Tokens scored",
    "rayapp_actors_alive": "Live actors of a rayapp pool",
    "rayapp_train_step": "Training step (rank 0)",
    "rayapp_train_total_steps": "Total training steps of the run",
    "rayapp_train_tokens_per_s": "Training tokens/s, all workers",
    "rayapp_train_loss": "Last training loss",
    "rayapp_generated_tokens": "Answer tokens generated",
}


def _get(kind: str, name: str, tag_keys: tuple[str, ...]):
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.util import metrics
    except ImportError:
        return None
    key = f"{kind}:{name}"
    if key not in _METRICS:
        cls = metrics.Counter if kind == "counter" else metrics.Gauge
        _METRICS[key] = cls(name, description=DESCRIPTIONS[name], tag_keys=tag_keys)
    return _METRICS[key]


def count(name: str, value: float, **tags: str) -> None:
    m = _get("counter", name, tuple(sorted(tags)))
    if m is not None and value > 0:
        m.inc(float(value), tags={k: str(v) for k, v in tags.items()})


def gauge(name: str, value: float, **tags: str) -> None:
    m = _get("gauge", name, tuple(sorted(tags)))
    if m is not None:
        m.set(float(value), tags={k: str(v) for k, v in tags.items()})
