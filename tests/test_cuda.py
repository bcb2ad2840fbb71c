"""The CUDA backend.  Without a GPU only its loading and graceful absence are checked;
the device tests skip, visibly, and run wherever a GPU is present."""
import io

import numpy as np
import pytest

import moe
from moe import reference as ref
from tolerances import assert_close


def test_import_and_availability_never_fail():
    info = moe._C.cuda_info()
    assert set(info) == {"built", "devices", "reason"}
    assert isinstance(moe.cuda_available(), bool)
    if not info["built"]:
        assert info["reason"]  # says why (no nvcc at build time, or the library did not load)
    buf = io.StringIO()
    moe.show_config(file=buf)
    assert "cuda:" in buf.getvalue()


def test_cuda_route_without_backend_raises_cleanly():
    if moe.cuda_available():
        pytest.skip("a GPU is present: the device tests below cover the router")
    torch = pytest.importorskip("torch")
    with pytest.raises((ValueError, TypeError, NotImplementedError, RuntimeError)):
        moe.cuda.route(torch.zeros((4, 8)), 2)  # a CPU tensor is refused


needs_gpu = pytest.mark.skipif(not moe.cuda_available(),
                               reason="no CUDA device (CUDA code compiled but not run here)")


@needs_gpu
@pytest.mark.parametrize("scoring", ["softmax", "softmax-after-topk", "sigmoid"])
@pytest.mark.parametrize("E,k,groups", [(8, 2, (1, 1)), (128, 8, (1, 1)), (256, 8, (8, 4)),
                                        (1000, 32, (1, 1)), (7, 7, (1, 1))])
def test_cuda_route_matches_reference(scoring, E, k, groups):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(E + k)
    logits = rng.standard_normal((333, E)).astype(np.float32)
    bias = (rng.standard_normal(E) * 0.1).astype(np.float32)
    ids, w = moe.cuda.route(torch.from_numpy(logits).cuda(), k, scoring=scoring,
                            expert_bias=bias, n_groups=groups[0], topk_groups=groups[1])
    torch.cuda.synchronize()
    r = ref.route(logits, k, scoring=scoring, expert_bias=bias, n_groups=groups[0],
                  topk_groups=groups[1])
    np.testing.assert_array_equal(ids.cpu().numpy(), r["expert_ids"])
    assert_close(w.cpu().numpy(), r["weights"], what="cuda route weights")
    # integer outputs match the CPU backend exactly
    cpu = moe.route(logits, k, scoring=scoring, expert_bias=bias, n_groups=groups[0],
                    topk_groups=groups[1])
    np.testing.assert_array_equal(ids.cpu().numpy(), cpu.expert_ids)


@needs_gpu
def test_cuda_route_ties_and_zero_tokens():
    torch = pytest.importorskip("torch")
    logits = torch.zeros((5, 16), device="cuda")
    ids, w = moe.cuda.route(logits, 4)
    assert ids.cpu().numpy().tolist() == [[0, 1, 2, 3]] * 5
    ids, w = moe.cuda.route(torch.zeros((0, 16), device="cuda"), 4)
    assert ids.shape == (0, 4)
