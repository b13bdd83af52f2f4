"""rayapp: a small language model chooses instruction-tuning data for a large one, on Ray."""

__version__ = "0.1.0"
