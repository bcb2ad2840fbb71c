"""moe.stats.RoutingStats: accumulation, summaries on hand-made counts, display and plot.

Accumulating over calls must equal one call on the concatenated tokens; entropy and the
max/mean imbalance are checked on loads whose values are known by hand; the HTML table and
to_dict carry the numbers; plot() draws with matplotlib's Agg backend (skipped without it).
"""
import json
import math
import sys

import numpy as np
import pytest

from moe.stats import RoutingStats, routing_stats
from tolerances import assert_int_equal

E = 8


def ids_for_load(load, k=1):
    """(T, k) int32 ids, shuffled, whose per-expert counts are `load` (sum divisible by k)."""
    flat = np.repeat(np.arange(len(load)), load).astype(np.int32)
    return np.random.default_rng(0).permutation(flat).reshape(-1, k)


def test_accumulation_equals_one_call_on_the_concatenation(make):
    layer = make.layer(16, 32, E, 2)
    xs = [make.normal(n, 16) for n in (7, 1, 30, 12)]
    acc = RoutingStats(E)
    for x in xs:
        _, r = layer(x, return_routing=True)
        acc.update(r)
    one = routing_stats(layer, np.concatenate(xs))
    assert_int_equal(acc.load, one.load, "load")
    assert (acc.tokens, acc.dropped, acc.calls, one.calls) == (50, 0, 4, 1)
    np.testing.assert_allclose(acc.mean_gate, one.mean_gate, rtol=1e-12)
    assert acc.entropy == pytest.approx(one.entropy, rel=1e-12)
    assert acc.max_over_mean == one.max_over_mean
    assert acc.load.sum() == 50 * 2 and acc.load.dtype == np.int64


def test_accumulation_with_dropped_slots_and_arrays(make):
    T, k = 40, 3
    ids = make.expert_ids(T, k, E, drop=0.2)
    w = make.rng.random((T, k)).astype(np.float32)
    w[ids < 0] = 0.0
    acc = RoutingStats(E)
    for lo, hi in ((0, 5), (5, 6), (6, 40)):
        acc.update(ids[lo:hi], w[lo:hi])
    one = RoutingStats(E).update(ids, w)
    assert_int_equal(acc.load, one.load)
    assert acc.dropped == one.dropped == int((ids < 0).sum()) > 0
    assert acc.tokens == one.tokens == T
    assert acc.assignments + acc.dropped == T * k
    np.testing.assert_allclose(acc.mean_gate, one.mean_gate, rtol=1e-12)
    # the mean gate by hand
    for e in range(E):
        sel = ids == e
        want = w[sel].astype(np.float64).mean() if sel.any() else np.nan
        np.testing.assert_allclose(one.mean_gate[e], want, rtol=1e-12)


def test_capacity_drops_match_the_routing_result(make):
    layer = make.layer(16, 32, E, 2, capacity_factor=0.5)
    _, r = layer(make.normal(64, 16), return_routing=True)
    stats = RoutingStats(E).update(r)
    assert r.n_dropped > 0
    assert stats.dropped == r.n_dropped
    assert_int_equal(stats.load, r.counts)


def test_entropy_and_imbalance_on_hand_made_counts():
    stats = RoutingStats(4).update(ids_for_load([4, 2, 1, 1]))
    p = np.array([0.5, 0.25, 0.125, 0.125])
    h = -(p * np.log(p)).sum()
    assert stats.entropy == pytest.approx(h, rel=1e-12)
    assert stats.normalized_entropy == pytest.approx(h / math.log(4), rel=1e-12)
    assert stats.max_over_mean == 2.0          # 4 / (8 / 4)
    np.testing.assert_array_equal(stats.fraction, p)

    uniform = RoutingStats(4).update(ids_for_load([3, 3, 3, 3]))
    assert uniform.entropy == pytest.approx(math.log(4), rel=1e-12)
    assert uniform.normalized_entropy == pytest.approx(1.0, rel=1e-12)
    assert uniform.max_over_mean == 1.0

    one_expert = RoutingStats(4).update(ids_for_load([0, 0, 6, 0]))
    assert one_expert.entropy == 0.0 and one_expert.normalized_entropy == 0.0
    assert one_expert.max_over_mean == 4.0     # n_experts: everything on one expert

    single = RoutingStats(1).update(np.zeros((5, 1), np.int32))
    assert single.normalized_entropy == 1.0 and single.max_over_mean == 1.0


def test_top1_ids_and_missing_weights():
    stats = RoutingStats(3).update(np.array([0, 2, 2, -1]))       # (T,): top-1
    assert_int_equal(stats.load, np.array([1, 0, 2]))
    assert stats.dropped == 1 and stats.tokens == 4
    assert np.isnan(stats.mean_gate).all()                        # no weights given
    stats.update(np.array([[1], [2]]), np.array([0.5, 0.25]))       # (T,) weights for top-1
    np.testing.assert_array_equal(stats.mean_gate, [np.nan, 0.5, 0.25])


def test_empty_and_reset(make):
    stats = RoutingStats(E)
    assert stats.calls == stats.tokens == stats.dropped == stats.assignments == 0
    assert math.isnan(stats.entropy) and math.isnan(stats.normalized_entropy)
    assert math.isnan(stats.max_over_mean)
    np.testing.assert_array_equal(stats.fraction, np.zeros(E))
    assert "calls=0" in repr(stats) and "<table" in stats._repr_html_()
    assert json.loads(json.dumps(stats.to_dict(), allow_nan=False))["entropy"] is None

    stats.update(make.expert_ids(10, 2, E), make.rng.random((10, 2)))
    assert stats.calls == 1
    assert stats.reset() is stats
    assert stats.calls == stats.tokens == 0 and not stats.load.any()
    assert np.isnan(stats.mean_gate).all()


def test_load_is_a_copy(make):
    stats = RoutingStats(E).update(make.expert_ids(10, 2, E))
    stats.load[:] = 0
    assert stats.load.sum() == 20


def test_repr_and_to_dict(make):
    stats = RoutingStats(4).update(ids_for_load([4, 2, 1, 1]), np.full((8, 1), 0.75))
    text = repr(stats)
    assert text.startswith("RoutingStats(n_experts=4, calls=1, tokens=8, dropped=0")
    assert "load=[4, 2, 1, 1]" in text and "max_over_mean=2.000" in text
    d = json.loads(json.dumps(stats.to_dict(), allow_nan=False))
    assert d["load"] == [4, 2, 1, 1] and d["fraction"] == [0.5, 0.25, 0.125, 0.125]
    assert d["mean_gate"] == [0.75] * 4 and d["max_over_mean"] == 2.0
    assert (d["n_experts"], d["calls"], d["tokens"], d["assignments"], d["dropped"]) == \
        (4, 1, 8, 8, 0)
    big = RoutingStats(64).update(np.arange(64)[:, None])
    assert "..." in repr(big) and len(repr(big)) < 300


def test_html_table_holds_the_numbers():
    ids = np.array([[0, 1], [0, 2], [0, -1], [3, 0]])
    w = np.array([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0], [0.6, 0.4]])
    stats = RoutingStats(5).update(ids, w)
    page = stats._repr_html_()
    assert page.count("<tr>") == 5 + 1 + 2   # header, one row per expert, total + summary
    # expert 0: 4 assignments, 4/7 of the load, mean gate (0.5+0.25+1.0+0.4)/4 = 0.5375
    assert "<tr><td>0</td><td>4</td><td>57.14%</td><td>0.5375</td></tr>" in page
    assert "<tr><td>4</td><td>0</td><td>0.00%</td><td>&ndash;</td></tr>" in page
    assert "<th>total</th><th>7</th><th>100.00%</th>" in page
    assert "4 tokens in 1 call, 1 dropped" in page
    assert f"max/mean {4 / (7 / 5):.4f}" in page
    assert f"{stats.entropy:.4f} nats" in page and f"normalized {stats.normalized_entropy:.4f}" \
        in page


def test_routing_stats_helper(make):
    layer = make.layer(16, 32, E, 3)
    x = make.normal(2, 5, 16)  # leading dims are flattened
    stats = routing_stats(layer, x)
    _, r = layer(x, return_routing=True)
    assert isinstance(stats, RoutingStats) and stats.n_experts == E
    assert_int_equal(stats.load, r.counts)
    assert stats.tokens == 10 and stats.calls == 1


def test_bad_input(make):
    with pytest.raises(ValueError, match="n_experts"):
        RoutingStats(0)
    with pytest.raises(TypeError, match="n_experts"):
        RoutingStats(2.5)
    stats = RoutingStats(4)
    with pytest.raises(ValueError, match=r"expert_ids values must be in \[0, n_experts=4\) or -1"):
        stats.update(np.array([[0, 4]]))
    with pytest.raises(ValueError, match="expert_ids values"):
        stats.update(np.array([[-2, 0]]))
    with pytest.raises(TypeError, match="expert_ids must be an integer array"):
        stats.update(np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="expert_ids must have shape"):
        stats.update(np.zeros((2, 2, 2), np.int32))
    with pytest.raises(ValueError, match=r"weights must have the shape of expert_ids \(3, 2\)"):
        stats.update(np.zeros((3, 2), np.int32), np.zeros((3, 1)))
    with pytest.raises(TypeError, match="weights must be a floating-point array"):
        stats.update(np.zeros((3, 2), np.int32), np.zeros((3, 2), np.int32))
    layer = make.layer(8, 16, 4, 2)
    _, r = layer(make.normal(3, 8), return_routing=True)
    with pytest.raises(TypeError, match="RoutingResult"):
        stats.update(r, r.weights)
    assert stats.calls == 0 and stats.tokens == 0  # a rejected update changes nothing


@pytest.fixture
def agg():
    mpl = pytest.importorskip("matplotlib", reason="matplotlib is optional: plot() needs it")
    mpl.use("Agg", force=True)
    import matplotlib.pyplot as plt
    yield plt
    plt.close("all")


def test_plot_draws_the_load(agg, make):
    stats = RoutingStats(E).update(make.expert_ids(50, 2, E))
    ax = stats.plot()
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_array_equal(heights, stats.load)
    assert ax.get_xlabel() == "expert" and "50 tokens" in ax.get_title()
    ax.figure.canvas.draw()  # renders without error

    fig, mine = agg.subplots()
    assert stats.plot(ax=mine) is mine and len(mine.patches) == E
    RoutingStats(3).plot()  # empty stats draw too


def test_plot_without_matplotlib(monkeypatch, make):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    stats = RoutingStats(E).update(make.expert_ids(5, 2, E))
    with pytest.raises(ImportError, match="pip install matplotlib"):
        stats.plot()
