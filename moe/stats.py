"""Routing statistics: how a MoE layer spreads its tokens over the experts.

RoutingStats accumulates the routing decisions of many calls (per-expert load, mean gate
weight, dropped assignments) and summarises them (load entropy, max/mean imbalance); it
shows itself as an HTML table in Jupyter and draws the expert-load histogram (matplotlib,
optional).  Load imbalance is what capacity limits, aux losses and expert biases fight.
"""
from __future__ import annotations

import html
import math

import numpy as np

from ._api import _shape_str, check_int, float_array, int_array

__all__ = ["RoutingStats", "routing_stats"]


class RoutingStats:
    """Accumulated routing statistics of one MoE layer with n_experts experts.

    Feed it with update() (a moe.RoutingResult, or expert ids and gate weights) once per
    call; the properties summarise everything seen since construction or reset().
    An assignment is one (token, slot) pair; a slot whose id is -1 was dropped (capacity)
    and counts in `dropped`, not in the load.
    """

    def __init__(self, n_experts):
        self.n_experts = check_int(n_experts, "n_experts", 1, 2**31 - 1)
        self.reset()

    def reset(self):
        """Forget everything seen so far; returns self."""
        E = self.n_experts
        self._load = np.zeros(E, np.int64)         # kept assignments per expert
        self._gate_sum = np.zeros(E, np.float64)   # sum of their gate weights ...
        self._gate_count = np.zeros(E, np.int64)   # ... over the assignments that had one
        self._dropped = 0
        self._tokens = 0
        self._calls = 0
        self._out_norm = np.zeros(E, np.float64)  # sum of gate * ||expert output||
        self._out_norm_count = np.zeros(E, np.int64)
        return self

    def update_output_norm(self, out_norm, counts):
        """Add one call's per-expert sums of gate * ||expert output||_2 (out_norm (E,)) over
        its counts (E,) assignments; returns self.  routing_stats() does this."""
        norm = float_array(out_norm, "out_norm", (("n_experts", self.n_experts),), np.float64)
        cnt = int_array(counts, "counts", (("n_experts", self.n_experts),), low=0,
                        what="[0, inf)")
        self._out_norm += norm
        self._out_norm_count += cnt
        return self

    @property
    def output_norm(self):
        """(E,) mean of gate * ||expert output||_2 per assignment (NaN where none was
        measured): the pruning statistic -- experts that contribute little score low."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._out_norm_count > 0,
                            self._out_norm / np.maximum(self._out_norm_count, 1), np.nan)

    @property
    def output_contribution(self):
        """(E,) sum of gate * ||expert output||_2 over everything measured."""
        return self._out_norm.copy()

    def update(self, routing, weights=None):
        """Add one call's routing; returns self.

        routing: a moe.RoutingResult (its expert_ids and weights are used; pass no weights),
          or expert ids: (n_tokens, top_k) ints in [0, n_experts) or -1 (dropped); a 1-D
          (n_tokens,) array is top-1.
        weights: None, or float gate weights of the ids' shape ((n_tokens,) for 1-D ids);
          without them the load counts but mean_gate does not change.
        A rejected update (ValueError / TypeError) leaves the statistics unchanged.
        """
        if hasattr(routing, "expert_ids") and hasattr(routing, "weights"):
            if weights is not None:
                raise TypeError("pass weights only with expert ids, not with a RoutingResult "
                                "(it carries its own)")
            ids, weights = routing.expert_ids, routing.weights
        else:
            ids = routing
        E = self.n_experts
        ids = int_array(ids, "expert_ids", dtype=np.int64, low=-1, high=E,
                        what=f"[0, n_experts={E}) or -1")
        if ids.ndim == 1:
            ids = ids[:, None]
        if ids.ndim != 2:
            raise ValueError(f"expert_ids must have shape (n_tokens, top_k) or (n_tokens,), "
                             f"got {_shape_str(ids.shape)}")
        if weights is not None:
            w = float_array(weights, "weights", dtype=np.float64)
            if w.ndim == 1 and ids.shape[1] == 1:
                w = w[:, None]
            if w.shape != ids.shape:
                raise ValueError(f"weights must have the shape of expert_ids "
                                 f"{_shape_str(ids.shape)}, got {_shape_str(w.shape)}")
        kept = ids >= 0
        self._load += np.bincount(ids[kept], minlength=E)
        if weights is not None:
            self._gate_sum += np.bincount(ids[kept], weights=w[kept], minlength=E)
            self._gate_count += np.bincount(ids[kept], minlength=E)
        self._dropped += int(ids.size - np.count_nonzero(kept))
        self._tokens += ids.shape[0]
        self._calls += 1
        return self

    # ---- counters ---------------------------------------------------------------------

    @property
    def load(self):
        """(n_experts,) int64: kept assignments per expert."""
        return self._load.copy()

    @property
    def assignments(self):
        """int: kept assignments in all (the sum of load)."""
        return int(self._load.sum())

    @property
    def dropped(self):
        """int: assignments dropped by a capacity limit (ids of -1)."""
        return self._dropped

    @property
    def tokens(self):
        """int: tokens seen (rows of expert_ids)."""
        return self._tokens

    @property
    def calls(self):
        """int: update() calls since construction or reset()."""
        return self._calls

    # ---- summaries ----------------------------------------------------------------------

    @property
    def fraction(self):
        """(n_experts,) float64: each expert's share of the kept assignments (0 if none)."""
        total = self._load.sum()
        return self._load / total if total else np.zeros(self.n_experts)

    @property
    def mean_gate(self):
        """(n_experts,) float64: mean gate weight of each expert's assignments (NaN if none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._gate_count > 0,
                            self._gate_sum / np.maximum(self._gate_count, 1), np.nan)

    @property
    def entropy(self):
        """float: entropy of the load distribution in nats (log(n_experts) when uniform,
        0 when one expert takes everything; NaN before any assignment)."""
        if not self._load.any():
            return math.nan
        p = self.fraction[self._load > 0]
        return float(-(p * np.log(p)).sum())

    @property
    def normalized_entropy(self):
        """float in [0, 1]: entropy / log(n_experts); 1 = perfectly balanced (1 when
        n_experts == 1; NaN before any assignment)."""
        h = self.entropy
        if math.isnan(h) or self.n_experts == 1:
            return h if math.isnan(h) else 1.0
        return min(max(h / math.log(self.n_experts), 0.0), 1.0)

    @property
    def max_over_mean(self):
        """float: max(load) / mean(load); 1 = balanced, n_experts = all on one expert
        (NaN before any assignment)."""
        if not self._load.any():
            return math.nan
        return float(self._load.max() / self._load.mean())

    def to_dict(self):
        """Everything as plain Python values (lists, ints, floats; NaN as None): JSON-ready."""
        def num(v):
            v = float(v)
            return None if math.isnan(v) else v

        return {"n_experts": self.n_experts, "calls": self.calls, "tokens": self.tokens,
                "assignments": self.assignments, "dropped": self.dropped,
                "load": [int(v) for v in self._load],
                "fraction": [float(v) for v in self.fraction],
                "mean_gate": [num(v) for v in self.mean_gate],
                "entropy": num(self.entropy),
                "normalized_entropy": num(self.normalized_entropy),
                "max_over_mean": num(self.max_over_mean),
                "output_norm": [num(v) for v in self.output_norm]}

    # ---- display ------------------------------------------------------------------------

    def __repr__(self):
        load = np.array2string(self._load, separator=", ", threshold=16, edgeitems=4)
        return (f"RoutingStats(n_experts={self.n_experts}, calls={self.calls}, "
                f"tokens={self.tokens}, dropped={self.dropped}, load={load}, "
                f"max_over_mean={self.max_over_mean:.3f}, "
                f"normalized_entropy={self.normalized_entropy:.3f})")

    def _repr_html_(self):
        """An HTML table for Jupyter: per-expert load, share and mean gate, then a total row
        and a line with tokens, calls, dropped, entropy and max/mean imbalance."""
        def gate(v):
            return "&ndash;" if math.isnan(v) else f"{v:.4f}"

        share, mgate = self.fraction, self.mean_gate
        rows = [f"<tr><td>{e}</td><td>{int(n)}</td><td>{100 * s:.2f}%</td><td>{gate(g)}</td>"
                "</tr>" for e, (n, s, g) in enumerate(zip(self._load, share, mgate))]
        count = self._gate_count.sum()
        overall = self._gate_sum.sum() / count if count else math.nan
        total = 100.0 if self.assignments else 0.0
        summary = (f"{self.tokens} tokens in {self.calls} call{'s' if self.calls != 1 else ''}, "
                   f"{self.dropped} dropped; load entropy {self.entropy:.4f} nats "
                   f"(normalized {self.normalized_entropy:.4f}), "
                   f"max/mean {self.max_over_mean:.4f}")
        return ("<table class=\"moe-routing-stats\">"
                f"<caption>RoutingStats, {self.n_experts} experts</caption>"
                "<thead><tr><th>expert</th><th>load</th><th>share</th><th>mean gate</th></tr>"
                "</thead><tbody>" + "".join(rows) + "</tbody>"
                f"<tfoot><tr><th>total</th><th>{self.assignments}</th><th>{total:.2f}%</th>"
                f"<th>{gate(overall)}</th></tr>"
                f"<tr><td colspan=\"4\">{html.escape(summary)}</td></tr></tfoot></table>")

    def plot(self, ax=None):
        """Draw the expert-load histogram (bars per expert, dashed mean); returns the Axes.

        ax: a matplotlib Axes to draw into, or None for a new figure.  Needs matplotlib.
        """
        if ax is None:  # (given an Axes, matplotlib is there already)
            try:
                import matplotlib.pyplot as plt
            except ImportError as exc:
                raise ImportError("RoutingStats.plot needs matplotlib: pip install matplotlib"
                                  ) from exc
            _, ax = plt.subplots(figsize=(max(4.0, min(12.0, 0.25 * self.n_experts + 3)), 3),
                                 layout="constrained")
        experts = np.arange(self.n_experts)
        ax.bar(experts, self._load, width=0.8, color="tab:blue")
        if self.assignments:
            ax.axhline(self._load.mean(), color="tab:red", linestyle="--", linewidth=1,
                       label="mean")
            ax.set_ylim(0, 1.2 * self._load.max())  # headroom for the legend
            ax.legend(loc="upper right")
        ax.set_xlabel("expert")
        ax.set_ylabel("assignments")
        ax.set_xlim(-0.6, self.n_experts - 0.4)
        ax.set_title(f"expert load: {self.tokens} tokens, max/mean {self.max_over_mean:.2f}, "
                     f"{self.dropped} dropped", fontsize="medium")
        return ax


def routing_stats(layer, x):
    """Run `layer` on x and return a fresh RoutingStats of its routing.

    layer: anything with n_experts that answers layer(x, return_routing=True) with
    (y, RoutingResult) -- a moe.SparseMoE, whose call also measures output_norm (the
    gate-weighted expert output norm used for pruning).  x: (..., d_model) float.
    """
    if hasattr(layer, "_forward"):
        _, routing, norm = layer._forward(x, None, None, True)
        stats = RoutingStats(getattr(layer, "n_router", layer.n_experts)).update(routing)
        E = layer.n_experts
        norm_all = np.zeros(stats.n_experts)
        norm_all[:E] = norm
        return stats.update_output_norm(norm_all, np.where(np.arange(stats.n_experts) < E,
                                                           routing.counts, 0))
    _, routing = layer(x, return_routing=True)
    return RoutingStats(layer.n_experts).update(routing)
