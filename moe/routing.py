"""Routing beyond token-choice top-k: expert choice, dynamic k (top-p, threshold), skipping.

Each function checks and converts its arguments like ``moe.route`` (messages name the
argument), then makes one call into the C core (csrc/cpu/route_ext.c).  The per-token
outputs use the padded ``(T, width)`` layout of ``moe.route``: id -1 / weight 0 marks an
empty slot, so they go straight into ``moe.dispatch`` and ``moe.combine``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _C
from ._api import _check_shape, check_finite, check_float, check_int, float_array, int_array

EXPERT_CHOICE_SCORINGS = ("softmax", "sigmoid")
# Codes of moe_scoring (csrc/moe.h) for the two scorings expert choice accepts.
_SCORING_CODES = {"softmax": 0, "sigmoid": 2}
_TOP_P, _THRESHOLD = 0, 1  # moe_dynamic_mode


class ExpertChoiceResult(NamedTuple):
    """Which tokens each expert took (expert-choice routing).

    token_ids:  (E, C) int64, the tokens expert e took, best score first.
    gates:      (E, C) float32, their scores (softmax over experts, or sigmoid).
    n_experts_per_token: (T,) int32, how many experts took each token (0..E).
    expert_ids: (T, W) int32, token-major view: the experts that took token t in
                ascending expert order, then -1 padding; W = max(1, the most experts
                any token got), at most E.
    weights:    (T, W) float32, the matching gates, 0 padding.
    capacity:   C, tokens per expert.

    ``moe.dispatch(x, expert_ids, E)`` and ``moe.combine(y, position, weights)`` accept
    the token-major view directly; combine then sums a token's expert outputs in
    ascending expert order, a fixed order independent of the batch's other scores.
    """

    token_ids: np.ndarray
    gates: np.ndarray
    n_experts_per_token: np.ndarray
    expert_ids: np.ndarray
    weights: np.ndarray
    capacity: int


class DynamicRoutingResult(NamedTuple):
    """Dynamic-k routing: a variable number of experts per token, padded to k_max.

    expert_ids: (T, k_max) int32, best first, -1 padding.
    weights:    (T, k_max) float32, 0 padding.
    n_selected: (T,) int32, experts selected per token, in [k_min, k_max].
    """

    expert_ids: np.ndarray
    weights: np.ndarray
    n_selected: np.ndarray


class SkipResult(NamedTuple):
    """Routing after dynamic expert skipping.

    expert_ids: (T, k) int32, skipped slots set to -1.
    weights:    (T, k) float32, skipped slots set to 0.
    n_skipped:  slots skipped by this call (slots already -1 are not counted).
    """

    expert_ids: np.ndarray
    weights: np.ndarray
    n_skipped: int


def _logits(logits):
    logits = float_array(logits, "logits", (("n_tokens", None), ("n_experts", None)),
                         np.float64)
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one expert (column), got shape "
                         f"({logits.shape[0]}, 0)")
    return logits  # the core checks finiteness (naming token and expert)


def expert_choice_capacity(n_tokens, n_experts, capacity_factor=1.0):
    """C = ceil(capacity_factor * n_tokens / n_experts), clamped to n_tokens."""
    c = capacity_factor * n_tokens / n_experts
    return n_tokens if c >= n_tokens else min(n_tokens, math.ceil(c))


def route_expert_choice(logits, capacity_factor=None, *, capacity=None,
                        scoring="softmax") -> ExpertChoiceResult:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

    logits: (T, E) float.  scoring: "softmax" (over the E experts of each token) or
    "sigmoid".  The capacity C is `capacity` when given, else
    ceil(capacity_factor * T / E) with capacity_factor defaulting to 1.0; either way
    clamped to T.  Give one of the two, not both.  Ties between tokens of equal score go
    to the lower token index ("equal" in float64 as computed: each softmax row is summed
    in expert order, so the result is a pure function of the logits).  A token may be taken by no expert (its output is then
    zero, or the residual only) or by several.
    """
    logits = _logits(logits)
    T, E = logits.shape
    if scoring not in EXPERT_CHOICE_SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(map(repr, EXPERT_CHOICE_SCORINGS))}"
                         f"; got {scoring!r}")
    if capacity is not None:
        if capacity_factor is not None:
            raise ValueError("give capacity or capacity_factor, not both")
        C = min(check_int(capacity, "capacity", 0), T)
    else:
        cf = 1.0 if capacity_factor is None else check_float(capacity_factor,
                                                              "capacity_factor")
        if cf < 0:
            raise ValueError(f"capacity_factor must be >= 0, got {cf}")
        C = expert_choice_capacity(T, E, cf)
    tok, gates, per_tok, ids, w = _C.route_expert_choice(logits, capacity=C,
                                                         scoring=_SCORING_CODES[scoring])
    return ExpertChoiceResult(tok, gates, per_tok, ids, w, C)


def _k_range(E, k_min, k_max):
    k_min = check_int(k_min, "k_min", 1, E)
    if k_max is None:
        return k_min, E
    k_max = check_int(k_max, "k_max", 1, E)
    if k_max < k_min:
        raise ValueError(f"k_max must be >= k_min={k_min}, got {k_max}")
    return k_min, k_max


def route_top_p(logits, p, *, k_min=1, k_max=None, renormalize=True) -> DynamicRoutingResult:
    """Top-p (nucleus) routing: per token, the fewest experts whose probabilities reach p.

    logits: (T, E) float; probabilities are the softmax over E.  Experts are ranked by
    probability (ties to the lower index) and k_t is the smallest count whose cumulative
    probability is >= p, clamped to [k_min, k_max] (k_max defaults to E).  p in (0, 1];
    p = 1 selects k_max experts.  renormalize: the selected weights sum to 1 (else they
    are the probabilities).  Outputs are padded to (T, k_max).
    """
    logits = _logits(logits)
    p = check_float(p, "p")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    k_min, k_max = _k_range(logits.shape[1], k_min, k_max)
    return DynamicRoutingResult(*_C.route_dynamic(logits, mode=_TOP_P, p=p, k_min=k_min,
                                                  k_max=k_max, renormalize=bool(renormalize)))


def route_threshold(logits, threshold, *, k_min=1, k_max=None,
                    renormalize=True) -> DynamicRoutingResult:
    """Threshold routing: per token, every expert whose softmax probability is >= threshold.

    The count is clamped to [k_min, k_max] (k_max defaults to E): with fewer above the
    threshold the best k_min are taken, with more the best k_max.  Ranking, padding and
    renormalize as in route_top_p.  threshold in [0, 1].
    """
    logits = _logits(logits)
    threshold = check_float(threshold, "threshold")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    k_min, k_max = _k_range(logits.shape[1], k_min, k_max)
    return DynamicRoutingResult(*_C.route_dynamic(logits, mode=_THRESHOLD, p=threshold,
                                                  k_min=k_min, k_max=k_max,
                                                  renormalize=bool(renormalize)))


def skip_experts(expert_ids, weights, threshold, *, renormalize=False) -> SkipResult:
    """Dynamic expert skipping: drop the slots whose gate weight is under threshold.

    expert_ids: (T, k) ints (-1 = empty slot); weights: (T, k) float, finite.  Slots with
    weight < threshold become id -1, weight 0.  renormalize: divide each token's kept
    weights by their sum (a token whose slots were all skipped keeps none).  Returns new
    arrays; the inputs are not modified.
    """
    ids = int_array(expert_ids, "expert_ids", (("n_tokens", None), ("top_k", None)), np.int32,
                    low=-1, what="[-1, inf)")
    w = float_array(weights, "weights")
    _check_shape(w, "weights", (("n_tokens", ids.shape[0]), ("top_k", ids.shape[1])))
    check_finite(w, "weights")
    threshold = check_float(threshold, "threshold")
    ids = np.array(ids, dtype=np.int32, order="C", copy=True)
    w = np.array(w, dtype=np.float32, order="C", copy=True)
    n = _C.route_skip(ids, weights=w, threshold=threshold, renormalize=bool(renormalize))
    return SkipResult(ids, w, int(n))
