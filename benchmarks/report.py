"""The one way a benchmark writes its results: ``<out_dir>/<name>.json``, a plot beside it as
``<name>.png`` (drawn by the benchmark's own function), and a line saying where they are."""

from __future__ import annotations

import json
import os
from typing import Callable


def write_results(out_dir: str, name: str, results: dict, plot: Callable[[dict, str], None] | None = None,
                  plot_data: dict | None = None, indent: int = 2) -> str:
    """Write ``results`` as JSON and, with ``plot``, draw ``plot(plot_data or results, path)``; returns
    the path without its suffix."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name)
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=indent)
    if plot is not None:
        plot(results if plot_data is None else plot_data, stem + ".png")
    print(f"results: {stem}.json" + (f", {stem}.png" if plot is not None else ""), flush=True)
    return stem
