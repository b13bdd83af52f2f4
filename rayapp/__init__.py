"""rayapp: a small language model chooses instruction-tuning data for a large one, on Ray."""

from pathlib import Path

__version__ = "0.1.0"
# The bundled model configs, judge prompt and rehearsal sample: found from the package root, so a
# module can move between folders without its asset paths changing.
ASSETS = Path(__file__).parent / "assets"
