"""benchmarks/_common.py's interleaved timing: the rounds, hooks and order the benchmark
tables rely on (a ratio per round needs the lists aligned by round)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from _common import interleaved, spread  # noqa: E402


def test_interleaved_rounds_hooks_and_order():
    log = []
    fns = [(lambda: log.append("a"), lambda: log.append("flush"), lambda: log.append("rest")),
           lambda: log.append("b"),
           (lambda: log.append("c"), None, None)]
    times = interleaved(fns, max_rounds=4, warmup=1, pre=1,
                        each_round=lambda: log.append("round"))
    assert [len(t) for t in times] == [4, 4, 4]
    assert all(t >= 0 for ts in times for t in ts)
    # the warm-up: each fn once, a's after hook too
    assert log[:4] == ["a", "rest", "b", "c"]
    rounds = []
    for item in log[4:]:
        if item == "round":
            rounds.append([])
        else:
            rounds[-1].append(item)
    assert len(rounds) == 4
    # a: flush, untimed a, flush, timed a, rest; b and c: untimed then timed
    blocks = {"a": ["flush", "a", "flush", "a", "rest"], "b": ["b", "b"], "c": ["c", "c"]}
    for r, calls in enumerate(rounds):
        order = ["abc"[(j + r) % 3] for j in range(3)]  # rotated each round
        assert calls == [x for name in order for x in blocks[name]]


def test_interleaved_budget_and_spread():
    times = interleaved([lambda: None], budget=0.0, min_rounds=2, max_rounds=10)
    assert len(times[0]) == 2  # the budget is spent at once: the minimum
    assert len(interleaved([lambda: None], max_rounds=5)[0]) == 5
    assert spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
