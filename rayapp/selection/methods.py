"""The selection methods, each declared once: its sort key (ascending = chosen first), its scope
rule, whether it takes a chunk, what it reads beyond the perplexities, and any rows it refuses.
The config validates against these names, the select stage runs and tags them from here, and the
strategies (strategies.py) turn a key into a selection.

To add a method: write its key (a pure function of the trajectories) and add one ``Method`` to
``METHODS``. It then runs as ``select.method`` or a baseline, stratified or global where its scope
allows, gets its tag (``tag``), and the report and finetune take it. New methods go at the end:
the position seeds the random draws (``random``, ``clust_rand``), so their selections stay put.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rayapp.selection.metrics import ifd, learning_percentage, learning_percentage_approx

SCOPES = ("stratified", "global")
CHUNKS = ("low", "mid", "high")


@dataclass
class Trajectories:
    """What the strategies need, one entry per row."""

    ids: np.ndarray  # str
    P: np.ndarray  # (n, epochs + 1)
    n_tokens: np.ndarray | None = None  # response tokens
    nll_response_only: np.ndarray | None = None  # epoch-0 NLL of the response without its prompt
    response_length: np.ndarray | None = None  # characters or tokens of the response
    truncated: np.ndarray | None = None  # bool: the row was cut to max_length (None: not known)
    # the model IFD is measured with, when not the reference's epoch 0 (e.g. the untrained target):
    # its mean NLL of the response with and without the prompt
    ifd_nll: np.ndarray | None = None
    ifd_nll_response_only: np.ndarray | None = None
    # a part of a larger set of trajectories (select spread over workers): these rows' positions
    # in it, and its row count; None: these are every row
    positions: np.ndarray | None = None
    total_rows: int | None = None


def ifd_scores(t: Trajectories) -> np.ndarray:
    """IFD per row: mean NLL of the response given its prompt over its mean NLL alone (epoch 0),
    or with the untrained target's NLLs where those were scored (score.ifd_model: target)."""
    if t.ifd_nll is not None and t.ifd_nll_response_only is not None:
        return ifd(t.ifd_nll, t.ifd_nll_response_only)
    if t.nll_response_only is None:
        raise ValueError("ifd needs response-only scores (score.modes must include response_only)")
    return ifd(np.log(t.P[:, 0]), t.nll_response_only)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # (trajectories, lp_epoch, seed) -> one float per row, ascending = chosen first; None: every row
    key: Callable[[Trajectories, int, int], np.ndarray] | None
    scope: str | None = None  # part of the method's definition; None: the run's (select.stratified)
    chunked: bool = True  # False: a random draw, always its first chunk (select.chunk does not apply)
    needs_clusters: bool = False
    # why these trajectories cannot run it (a column missing), or None when they can
    unrunnable: Callable[[Trajectories], str | None] = lambda t: None
    # the rows it may choose at all (before ranking), when it refuses some: [(mask, what it dropped)]
    keep: Callable[[Trajectories], list[tuple[np.ndarray, str]]] | None = None


def _no_response_only(t: Trajectories) -> str | None:
    if t.nll_response_only is None and t.ifd_nll_response_only is None:
        return "no response-only scores (add response_only to score.modes)"
    return None


def _no_lengths(t: Trajectories) -> str | None:
    return "no response texts or lengths in these trajectories" if t.response_length is None else None


def _ifd_key(t: Trajectories, lp_epoch: int, seed: int) -> np.ndarray:
    score = ifd_scores(t)
    # high IFD first; IFD >= 1 (the prompt does not help at all) and NaN go last
    return np.where(np.isnan(score) | (score >= 1), np.inf, -score)


def _ifd_cherry_key(t: Trajectories, lp_epoch: int, seed: int) -> np.ndarray:
    score = ifd_scores(t)
    # Cherry-LLM keeps IFD == 1 (it skips only `mean_rate > 1`); ``keep`` drops the rest
    return np.where(np.isnan(score) | (score > 1), np.inf, -score)


def _cherry_rows(t: Trajectories) -> list[tuple[np.ndarray, str]]:
    """Cherry-LLM ranks only rows that fit its max_length whole (it skips truncated ones before
    scoring), and only IFD <= 1 (`if mean_rate > 1: continue`)."""
    score = ifd_scores(t)
    rules = [(~np.isnan(score) & (score <= 1), "dropped_ifd_above_1_or_undefined")]
    if t.truncated is not None:
        rules.insert(0, (~np.asarray(t.truncated, dtype=bool), "dropped_truncated"))
    return rules


def _random_key(name: str) -> Callable[[Trajectories, int, int], np.ndarray]:
    def key(t: Trajectories, lp_epoch: int, seed: int) -> np.ndarray:
        # an independent stream per method: the two random baselines must not share one permutation;
        # a part of the rows takes its rows' places in the permutation of the whole
        order = np.random.default_rng([seed, NAMES.index(name)]).permutation(t.total_rows or len(t.ids))
        return (order if t.positions is None else order[t.positions]).astype(np.float64)
    return key


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lp", "low LP(i): learned late, the paper's hard rows",
           lambda t, lp_epoch, seed: learning_percentage(t.P, lp_epoch)),
    Method("lp_app", "LP_app = (P0 - P1) / P0, from one epoch",
           lambda t, lp_epoch, seed: learning_percentage_approx(t.P[:, 0], t.P[:, 1])),
    Method("ppl_high", "highest perplexity before training", lambda t, lp_epoch, seed: -t.P[:, 0]),
    Method("ppl_low", "lowest perplexity before training", lambda t, lp_epoch, seed: t.P[:, 0]),
    Method("ifd", "highest instruction-following difficulty (IFD < 1)", _ifd_key, unrunnable=_no_response_only),
    Method("ifd_cherry", "Cherry-LLM's IFD: IFD <= 1 only, the highest kept globally", _ifd_cherry_key,
           scope="global", unrunnable=_no_response_only, keep=_cherry_rows),
    Method("longest", "the longest responses (Long Is More)",
           lambda t, lp_epoch, seed: -np.asarray(t.response_length, dtype=np.float64), unrunnable=_no_lengths),
    Method("random", "a random draw over all rows", _random_key("random"), scope="global", chunked=False),
    Method("clust_rand", "a random draw of the same per-cluster counts", _random_key("clust_rand"),
           scope="stratified", chunked=False, needs_clusters=True),
    Method("full", "every row", None, scope="global"),
)}
NAMES: tuple[str, ...] = tuple(METHODS)


def method_named(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown selection method {name!r}; known: {', '.join(NAMES)}") from None


def parse_selection(spec: str) -> tuple[str, str | None]:
    """``METHOD`` or ``METHOD:global`` / ``METHOD:stratified`` -> (method, scope or None for the
    run's default). Raises ValueError naming what is wrong."""
    name, sep, scope = spec.partition(":")
    m = method_named(name)
    if not sep:
        return name, None
    if scope not in SCOPES:
        raise ValueError(f"{spec!r}: the scope after ':' is 'global' or 'stratified'")
    if m.scope is not None and m.scope != scope:
        raise ValueError(f"{spec!r}: {name} is always {m.scope}")
    return name, scope


def natural_scope(name: str, default: str) -> str:
    """The scope a method runs in when none is given: its own, else the run's ``default``."""
    return method_named(name).scope or default


def chunk_of(name: str, chunk: str) -> str:
    """The chunk a method takes: ``chunk`` (select.chunk), or the first for a random draw."""
    return chunk if method_named(name).chunked else "low"


def tag(name: str, chunk: str, budget: float, scope: str = "stratified") -> str:
    """e.g. lp-low-33pct, ppl_high-global-low-5pct (a method with its own scope does not name it)."""
    if name == "full":
        return "full"
    where = "-global" if scope == "global" and method_named(name).scope is None else ""
    return f"{name}{where}-{chunk_of(name, chunk)}-{round(budget * 100, 2):g}pct"


def is_tag(entry: str) -> bool:
    """Whether ``entry`` is a selection's tag (what ``tag`` makes)."""
    m = re.fullmatch(r"([a-z_]+)(-global)?-(low|mid|high)-[0-9.]+pct", entry)
    return bool(m) and m.group(1) in METHODS
