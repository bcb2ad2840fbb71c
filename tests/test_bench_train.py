"""benchmarks/bench_train.py on tiny shapes of each architecture: the three implementations
agree (its correctness check), a table row comes out of the interleaved timing, and the
saved-memory count leaves the weights out and sees what each forward keeps."""
import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_train as bt  # noqa: E402

COMMON = dict(d_model=32, scoring="softmax", renormalize=True, activation="swiglu")
TINY = {
    "mixtral": dict(COMMON, d_ff=48, n_experts=4, top_k=2),
    "qwen3": dict(COMMON, d_ff=16, n_experts=8, top_k=4),
    "deepseek": dict(COMMON, d_ff=16, n_experts=16, top_k=4, scoring="sigmoid", n_groups=4,
                     topk_groups=2, routed_scaling=2.5, expert_bias=True, n_shared_experts=1,
                     shared_d_ff=16),
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: torch's OpenMP threads only wait for each other (10x slower on a busy
    machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_row(arch, monkeypatch):
    monkeypatch.setattr(bt, "SETTLE", 0.0)
    cfg, T = TINY[arch], 64
    ours = bt.Ours(cfg)
    impls = [ours, bt.HFBlock(arch, cfg, ours), bt.Loop(cfg, ours)]
    assert impls[1].has_aux == (arch != "deepseek")  # DeepseekV3MoE has no aux loss
    for other in impls[1:]:
        bt.check_against_ours(ours, other, cfg)  # raises SystemExit on a mismatch
    line, times, mem = bt.row(f"tiny-{arch}", cfg, impls, T, rounds=2, measure_peak=False)
    assert line.startswith(f"| tiny-{arch} | {T} |") and line.count("|") == 11, line
    assert [len(t) for t in times] == [2, 2, 2]
    d, k = cfg["d_model"], cfg["top_k"]
    # ours keeps at least x and the experts' outputs (T k, d); torch at least x and more
    assert mem[0] >= 4 * (T * d + T * k * d), mem
    assert all(m > 4 * T * d for m in mem[1:]), mem


def test_tiny_row_with_the_kept_hidden_variant(monkeypatch):
    """main()'s layout: ours, ours with recompute_hidden=False, then the two baselines; the
    kept variant holds the (T k, 2 d_ff) pre-activations more."""
    monkeypatch.setattr(bt, "SETTLE", 0.0)
    cfg, T = TINY["mixtral"], 64
    ours = bt.Ours(cfg)
    impls = [ours, bt.OursKept(cfg), bt.HFBlock("mixtral", cfg, ours), bt.Loop(cfg, ours)]
    line, times, mem = bt.row("tiny", cfg, impls, T, rounds=2, measure_peak=False, n_ours=2)
    assert line.count("|") == 14 and [len(t) for t in times] == [2] * 4, line
    assert mem[1] - mem[0] == 4 * T * cfg["top_k"] * 2 * cfg["d_ff"], mem


def test_saved_bytes_counts_activations_not_weights():
    class Linear:
        module = torch.nn.Linear(32, 16, bias=False)

        def forward(self, x):
            return self.module(x), None

    x = torch.randn(8, 32)
    # a linear layer saves its input (and its weight, which is held anyway)
    assert bt.saved_bytes(Linear(), x) == 8 * 32 * 4


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_row_bfloat16(arch, monkeypatch):
    """--dtype bfloat16: ours in bf16 compute, torch's cast to bf16; the check passes (at its
    bf16 tolerance) and a row comes out."""
    monkeypatch.setattr(bt, "SETTLE", 0.0)
    monkeypatch.setattr(bt, "DTYPE", torch.bfloat16)
    cfg, T = TINY[arch], 64
    ours = bt.Ours(cfg)
    assert ours.module.to_layer().compute_dtype == "bfloat16"
    impls = [ours, bt.HFBlock(arch, cfg, ours), bt.Loop(cfg, ours)]
    assert all(p.dtype == torch.bfloat16 for p in impls[2].module.experts.parameters())
    for other in impls[1:]:
        bt.check_against_ours(ours, other, cfg)
    line, times, _ = bt.row(f"tiny-{arch}", cfg, impls, T, rounds=2, measure_peak=False)
    assert line.startswith(f"| tiny-{arch} | {T} |") and [len(t) for t in times] == [2] * 3
