"""Moved to rayapp/selection/strategies.py and methods.py (pure selection math lives outside the
stage); kept so ``rayapp.select.strategies`` imports keep working."""

from rayapp.selection.methods import Trajectories, ifd_scores
from rayapp.selection.strategies import chunk_index, n_chunks, select, sort_key, stratified_select, take_from_end

__all__ = ["Trajectories", "chunk_index", "ifd_scores", "n_chunks", "select", "sort_key", "stratified_select",
           "take_from_end"]
