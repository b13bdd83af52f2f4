"""What importing transformers brings along, kept lean (below loading.py and packaged.py, which
both call it)."""

from __future__ import annotations


def lean_transformers() -> None:
    """Keep scikit-learn and scipy (and pandas) out of every process that loads a model.

    transformers imports ``sklearn.metrics`` while importing its generation utilities, only for
    assisted generation's confidence heuristic, and ``scipy.optimize`` while importing its losses,
    only for the Hungarian matching of object-detection losses; rayapp uses neither. Those imports
    are ~3.5 s and ~0.8 s of the ~12 s it takes to import a model class here, paid again by every
    actor and training worker. Telling transformers that the packages are absent must happen before
    ``transformers.generation`` / ``transformers.loss`` are imported; later it changes nothing (and
    both stay usable: k-means imports scikit-learn itself)."""
    import sys

    import transformers.utils

    if "transformers.generation" not in sys.modules:
        transformers.utils.is_sklearn_available = lambda: False
    if "transformers.loss" not in sys.modules:
        transformers.utils.is_scipy_available = lambda: False
