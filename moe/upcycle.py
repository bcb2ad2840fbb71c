"""Upcycling: turn a dense FFN into a sparse MoE layer (moe.upcycle).

Two recipes from the literature: "copy" (sparse upcycling, Komatsuzaki et al. 2023: every
expert starts as a copy of the dense FFN) and "split" (MoEfication, Zhang et al. 2022: the
FFN's hidden units are partitioned into experts, so the experts together *are* the FFN).
Both return a ready moe.SparseMoE whose routing is chosen so the result is meaningful.
"""
from __future__ import annotations

import numpy as np

from ._api import (ACTIVATIONS, GATED, WEIGHT_DTYPES, _shape_str, check_choice, check_finite,
                   check_int, float_array, weight_array)
from .layer import SparseMoE

__all__ = ["upcycle", "partition_units", "METHODS", "PARTITIONS", "ROUTERS"]

METHODS = ("copy", "split")
PARTITIONS = ("contiguous", "clustered")
ROUTERS = ("auto", "random", "zeros")

# Router logit scale (std of the logits for inputs of unit variance per coordinate) of every
# router upcycle makes.  Small on purpose: "copy" experts are all the same function, so the
# routing only has to start near uniform; "split" weights are E * softmax(logits), so logits
# of spread s move the selected experts' weights from 1 by a factor of about exp(+-s).
# Measured (d=32, d_ff=256, E=8, top-2, random SwiGLU/ReLU FFNs, clustered): relative error
# to the dense FFN 0.77 at s=0.1, 0.84 at 0.3, 1.5 at 1.0 -- worse than a random router of
# scale 0.1 (0.87) -- while the selection itself does not depend on s.
_ROUTER_LOGIT_STD = 0.1
# balanced k-means: Lloyd iterations until the assignment stops changing, at most this many.
_KMEANS_ITERS = 50


def upcycle(w_gate, w_up, w_down, n_experts, top_k, method="copy", *, partition="contiguous",
            activation="swiglu", router="auto", seed=0, dtype="float32") -> SparseMoE:
    """Build a SparseMoE from a dense FFN y = act(x @ w_gate.T, x @ w_up.T) @ w_down.T.

    w_gate: (d_ff, d_model) float, or None for the non-gated activations.
    w_up:   (d_ff, d_model) float.  w_down: (d_model, d_ff) float (nn.Linear layout; float16/
    32/64 NumPy arrays, or torch CPU tensors, bfloat16 included).
    n_experts: E >= 1; top_k: 1..E; activation: one of moe.ACTIVATIONS, as in the dense FFN.

    method="copy" (sparse upcycling): E experts of width d_ff, each a copy of the FFN;
      scoring="softmax", renormalize=True.  The selected gates sum to 1, so for any top_k
      and any router the layer computes the dense FFN (to float32 rounding; with a
      bfloat16 / float16 `dtype`, the dense FFN on the rounded weights).
    method="split" (MoEfication): d_ff must be a multiple of E; each expert gets d_ff / E of
      the hidden units (rows of w_gate / w_up, columns of w_down), chosen by `partition`
      (see partition_units).  scoring="softmax", renormalize=False, routed_scaling=E: with
      equal logits every selected expert has weight exactly 1, so with router="zeros" and
      top_k == E the layer is the dense FFN, decomposed exactly.  With top_k < E it keeps
      the top_k experts the router picks (router="zeros": always experts 0..top_k-1).

    router: "auto": for "copy" small random logits, for "split" the centroid router (see
      _centroid_router); "random": N(0, 0.01 / d_model) entries (both: logits of std 0.1
      for inputs of unit variance per coordinate; for "split" the baseline the centroid
      router beats); "zeros": all logits 0; or an (E, d_model) float array.
    seed: seeds the random router and the clustering's initial centroids.
    dtype: storage of the expert weights in the layer ("float32", "bfloat16", "float16").

    Returns a moe.SparseMoE (d_model, d_ff or d_ff / E, E, top_k).
    """
    check_choice(method, "method", METHODS)
    check_choice(partition, "partition", PARTITIONS)
    check_choice(activation, "activation", ACTIVATIONS)
    check_choice(dtype, "dtype", WEIGHT_DTYPES)
    if method == "copy" and partition != "contiguous":
        raise ValueError(f"partition applies to method='split' only, got partition={partition!r} "
                         "with method='copy'")
    n_experts = check_int(n_experts, "n_experts", 1, 2**31 - 1)
    top_k = check_int(top_k, "top_k", 1, n_experts)
    seed = check_int(seed, "seed", 0)
    w_gate, w_up, w_down = _dense_weights(w_gate, w_up, w_down, activation)
    d_ff, d_model = w_up.shape
    E = n_experts
    # the clustering draws from default_rng(seed) (as partition_units(seed=seed) does);
    # the router from a stream of its own
    ss_router = np.random.SeedSequence([seed, 1])

    if method == "copy":
        layer = SparseMoE(d_model, d_ff, E, top_k, activation=activation, scoring="softmax",
                          renormalize=True, dtype=dtype, init=False)
        if w_gate is not None:
            layer.w_gate = np.broadcast_to(w_gate, (E, d_ff, d_model))
        layer.w_up = np.broadcast_to(w_up, (E, d_ff, d_model))
        layer.w_down = np.broadcast_to(w_down, (E, d_model, d_ff))
        layer.router_weight = _router(router, E, d_model, ss_router,
                                      auto=lambda rng: _random_router(rng, E, d_model))
        return layer

    if d_ff % E:
        raise ValueError(f"method='split' needs d_ff divisible by n_experts: d_ff={d_ff} "
                         f"(w_up has shape {_shape_str(w_up.shape)}) is not a multiple of "
                         f"n_experts={E}")
    units = partition_units(w_gate, w_up, E, partition, seed=seed)
    layer = SparseMoE(d_model, d_ff // E, E, top_k, activation=activation, scoring="softmax",
                      renormalize=False, routed_scaling=float(E), dtype=dtype,
                      init=False)
    if w_gate is not None:
        layer.w_gate = w_gate[units]                        # (E, F/E, d)
    layer.w_up = w_up[units]                                # (E, F/E, d)
    layer.w_down = np.moveaxis(w_down[:, units], 1, 0)      # (d, E, F/E) -> (E, d, F/E)
    layer.router_weight = _router(router, E, d_model, ss_router,
                                  auto=lambda rng: _centroid_router(w_gate, w_up, units))
    return layer


def partition_units(w_gate, w_up, n_experts, partition="contiguous", *, seed=0):
    """The hidden units of each expert for method="split": (E, d_ff / E) int64, rows sorted.

    w_gate: (d_ff, d_model) float or None; w_up: (d_ff, d_model) float; d_ff % n_experts == 0.
    partition="contiguous": expert e gets units e*m .. (e+1)*m - 1 (m = d_ff / E).
    partition="clustered": balanced k-means on the units' weight rows (w_up, or w_gate | w_up
      concatenated when gated): units whose input weights point the same way tend to fire
      together, so an expert groups units that are on for the same inputs.  Every cluster
      holds exactly m units; the result depends only on the weights and seed.
    """
    check_choice(partition, "partition", PARTITIONS)
    E = check_int(n_experts, "n_experts", 1, 2**31 - 1)
    seed = check_int(seed, "seed", 0)
    w_up = float_array(w_up, "w_up", (("d_ff", None), ("d_model", None)))
    F = w_up.shape[0]
    if w_gate is not None:
        w_gate = float_array(w_gate, "w_gate", (("d_ff", F), ("d_model", w_up.shape[1])))
    if F == 0 or F % E:
        raise ValueError(f"d_ff={F} (w_up has shape {_shape_str(w_up.shape)}) must be a "
                         f"positive multiple of n_experts={E}")
    m = F // E
    if partition == "contiguous" or E == 1:
        return np.arange(F, dtype=np.int64).reshape(E, m)
    blocks = [w_up] if w_gate is None else [w_gate, w_up]
    assign = _balanced_kmeans(blocks, E, np.random.default_rng(seed))
    # stable sort by cluster: each expert's units in increasing unit order
    return np.argsort(assign, kind="stable").reshape(E, m).astype(np.int64)


# ---- helpers ----------------------------------------------------------------------------

def _dense_weights(w_gate, w_up, w_down, activation):
    """Check the dense FFN weights; returns float32 (gate | None, up, down)."""
    any_shape = (("d_ff", None), ("d_model", None))
    w_up = weight_array(w_up, "w_up", any_shape, "float32")
    F, d = w_up.shape
    if F == 0 or d == 0:
        raise ValueError(f"w_up must have shape (d_ff, d_model) with both sizes >= 1, got "
                         f"{_shape_str(w_up.shape)}")
    shape = (("d_ff", F), ("d_model", d))
    if activation in GATED:
        if w_gate is None:
            raise ValueError(f"w_gate is required by the gated activation {activation!r}")
        w_gate = weight_array(w_gate, "w_gate", shape, "float32")
    elif w_gate is not None:
        raise ValueError(f"w_gate must be None for the non-gated activation {activation!r} "
                         "(pass activation='swiglu' or another gated one to use it)")
    w_down = weight_array(w_down, "w_down", (("d_model", d), ("d_ff", F)), "float32")
    for name, a in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if a is not None:
            check_finite(a, name)
    return w_gate, w_up, w_down


def _router(router, E, d, seed_seq, auto):
    """router_weight (E, d) float32 for the `router` argument of upcycle."""
    rng = np.random.default_rng(seed_seq)
    if isinstance(router, str):
        check_choice(router, "router", ROUTERS)
        if router == "auto":
            return auto(rng)
        if router == "random":
            return _random_router(rng, E, d)
        return np.zeros((E, d), np.float32)
    if router is None:
        raise TypeError(f"router must be one of {', '.join(map(repr, ROUTERS))} or an "
                        f"(n_experts={E}, d_model={d}) float array, got None")
    r = weight_array(router, "router", (("n_experts", E), ("d_model", d)), "float32")
    check_finite(r, "router")
    return r


def _random_router(rng, E, d):
    """N(0, s^2 / d) entries, s = _ROUTER_LOGIT_STD: logits of std s for unit-variance inputs."""
    return (rng.standard_normal((E, d)) * (_ROUTER_LOGIT_STD / np.sqrt(d))).astype(np.float32)


def _centroid_router(w_gate, w_up, units):
    """MoEfication's similarity router: expert e's row is the centroid of its units' rows.

    x . centroid_e is the mean pre-activation of expert e's units, so the router picks the
    experts whose units are most switched on.  For a gated FFN (silu(x.g_i) * x.u_i) the
    gate rows decide that: the up branch is linear and symmetric in sign, so the mean of
    x.u_i over a group says nothing about the size of the group's output, while a large mean
    x.g_i means many of its gates are open.  Without a gate, the activation is applied to
    x.u_i itself (relu / gelu / silu pass large positive pre-activations), so w_up rows.

    The centroids' common mean is removed (it shifts every logit by the same amount, which
    softmax ignores) and the rest scaled to an RMS row norm of _ROUTER_LOGIT_STD = 0.1: for
    inputs with unit variance per coordinate the logits then have a spread of about 0.1,
    whatever the FFN's weight scale.  Not O(1): the split layer's weights are
    E * softmax(logits), which is 1 for every selected expert only while the logits are
    close; at a spread of 1 the top experts get weights of 2-4 and the output moves further
    from the dense FFN than with a random router (see _ROUTER_LOGIT_STD).  The ranking, and
    so which experts are chosen, is the same at any scale; fine-tuning can sharpen it.
    Returns (E, d) float32.
    """
    rows = np.asarray(w_up if w_gate is None else w_gate, dtype=np.float64)
    centroids = rows[units].mean(axis=1)                   # (E, d)
    centroids -= centroids.mean(axis=0, keepdims=True)
    rms = np.sqrt(np.mean(np.sum(centroids ** 2, axis=1)))
    if rms > 0:  # (E == 1, or identical centroids: every logit equal, any scale will do)
        centroids *= _ROUTER_LOGIT_STD / rms
    return centroids.astype(np.float32)


def _sq_distances(blocks, centroids):
    """(F, E) float64 squared distances from the rows to the centroids.

    blocks: list of (F, d_i) float32 arrays whose concatenated rows are the points (kept
    apart so a gated FFN's w_gate | w_up is never copied); centroids: list of (E, d_i).
    """
    d2 = 0.0
    for f, c in zip(blocks, centroids):
        c = c.astype(np.float32)
        d2 = d2 + (np.einsum("ij,ij->i", f, f).astype(np.float64)[:, None]
                   - 2.0 * (f @ c.T).astype(np.float64)
                   + np.einsum("ij,ij->i", c, c).astype(np.float64)[None, :])
    return np.maximum(d2, 0.0)


def _kmeanspp_init(blocks, E, rng):
    """k-means++ seeding: E distinct rows, each drawn with probability ~ squared distance."""
    F = blocks[0].shape[0]
    chosen = [int(rng.integers(F))]
    d2 = _sq_distances(blocks, [f[chosen] for f in blocks])[:, 0]
    for _ in range(1, E):
        total = d2.sum()
        if total > 0:
            nxt = int(rng.choice(F, p=d2 / total))
        else:  # all remaining rows coincide with a centroid: take any unused one
            nxt = int(np.setdiff1d(np.arange(F), chosen)[0])
        chosen.append(nxt)
        d2 = np.minimum(d2, _sq_distances(blocks, [f[nxt:nxt + 1] for f in blocks])[:, 0])
    return [f[chosen].astype(np.float64) for f in blocks]


def _balanced_assign(d2, capacity):
    """Greedy capacity-constrained assignment: (F,) cluster of each row, each <= capacity.

    Rounds: every unassigned row proposes its nearest cluster that still has room; each
    cluster accepts its closest proposers up to its room (ties: lower row index).  Every
    round fills a cluster or places every proposer, so it ends within E + 1 rounds.
    """
    F, E = d2.shape
    assign = np.full(F, -1, dtype=np.int64)
    room = np.full(E, capacity, dtype=np.int64)
    while True:
        free = np.flatnonzero(assign < 0)
        if free.size == 0:
            return assign
        dist = np.where(room > 0, d2[free], np.inf)
        choice = np.argmin(dist, axis=1)                   # ties -> lower cluster
        best = dist[np.arange(free.size), choice]
        for c in np.unique(choice):
            mine = choice == c
            order = np.argsort(best[mine], kind="stable")[:room[c]]
            assign[free[mine][order]] = c
            room[c] -= order.size


def _balanced_kmeans(blocks, E, rng):
    """Balanced k-means: Lloyd iterations with _balanced_assign; (F,) cluster per row."""
    F = blocks[0].shape[0]
    centroids = _kmeanspp_init(blocks, E, rng)
    assign = None
    for _ in range(_KMEANS_ITERS):
        new = _balanced_assign(_sq_distances(blocks, centroids), F // E)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for f, c in zip(blocks, centroids):
            for e in range(E):
                c[e] = f[assign == e].mean(axis=0, dtype=np.float64)
    return assign
