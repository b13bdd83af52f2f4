"""Moved to rayapp/selection/metrics.py (pure selection math lives outside the stage); kept so
``rayapp.select.metrics`` imports keep working."""

from rayapp.selection.metrics import ifd, learning_percentage, learning_percentage_approx, no_response_rows

__all__ = ["ifd", "learning_percentage", "learning_percentage_approx", "no_response_rows"]
