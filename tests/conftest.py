"""Shared fixtures: a seeded random generator per test and helpers that make random inputs.

The seed is derived from the test's node id (so a failure reproduces on rerun) mixed with
MOE_TEST_SEED (default 0; set it to draw fresh inputs); a failing test prints its seed.
Inputs are standard normal, never zeros: zeros would hide outputs the core never wrote.
"""
import os
import zlib

import numpy as np
import pytest

import moe

from moe._C import GATED_ACTIVATIONS as GATED  # noqa: E402


def _base_seed():
    value = os.environ.get("MOE_TEST_SEED", "0")
    try:
        return int(value)
    except ValueError:
        return zlib.crc32(value.encode())


@pytest.fixture
def threads():
    """moe.set_num_threads, with the thread count restored after the test."""
    before = moe.get_num_threads()
    yield moe.set_num_threads
    moe.set_num_threads(before)


@pytest.fixture
def rng(request):
    """np.random.Generator seeded from the test id (and MOE_TEST_SEED)."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + 1_000_003 * _base_seed()) % 2**32
    request.node.user_properties.append(("rng_seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "rng_seed"]
        if seeds:
            rep.sections.append(
                ("rng", f"rng seed {seeds[0]} (node id {item.nodeid!r}, "
                        f"MOE_TEST_SEED={os.environ.get('MOE_TEST_SEED', '0')})"))


def unaligned(a):
    """A copy of `a` (C-contiguous, same dtype and values) whose data is not aligned."""
    a = np.ascontiguousarray(a)
    buf = np.empty(a.nbytes + 1, dtype=np.uint8)
    out = np.ndarray(a.shape, dtype=a.dtype, buffer=buf.data, offset=1)
    out[...] = a
    return out


class DLPackOnly:
    """Offers its data only through the DLPack protocol (as a torch CPU tensor does), to
    exercise the DLPack path without torch."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class Inputs:
    """Random inputs from one generator; float arrays are float32 unless asked otherwise."""

    unaligned = staticmethod(unaligned)
    DLPackOnly = DLPackOnly

    def __init__(self, rng):
        self.rng = rng

    def normal(self, *shape, scale=1.0, dtype=np.float32):
        a = self.rng.standard_normal(shape) * scale
        a[a == 0] = 0.5 * scale  # never an exact zero
        return a.astype(dtype)

    def logits(self, T, E, dtype=np.float64):
        return self.normal(T, E, dtype=dtype)

    def expert_weights(self, E, F, d, activation="swiglu"):
        """(w_gate or None, w_up, w_down) in the nn.Linear layout, ~unit-variance outputs."""
        w_gate = self.normal(E, F, d, scale=d ** -0.5) if activation in GATED else None
        w_up = self.normal(E, F, d, scale=d ** -0.5)
        w_down = self.normal(E, d, F, scale=F ** -0.5)
        return w_gate, w_up, w_down

    def dense_weights(self, F, d, activation="swiglu"):
        w_gate, w_up, w_down = self.expert_weights(1, F, d, activation)
        return (None if w_gate is None else w_gate[0]), w_up[0], w_down[0]

    @staticmethod
    def offsets(counts):
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def expert_ids(self, T, k, E, drop=0.0, distinct=True):
        """(T, k) int32 ids; distinct per row when distinct (k <= E); a share `drop` -> -1."""
        if distinct:
            ids = np.argsort(self.rng.random((T, E)), axis=1)[:, :k]
        else:
            ids = self.rng.integers(0, E, size=(T, k))
        ids = ids.astype(np.int32)
        if drop:
            ids[self.rng.random((T, k)) < drop] = -1
        return ids

    def layer(self, d, F, E, k, **options):
        """A SparseMoE whose weights (and expert bias, if any) come from this generator."""
        layer = moe.SparseMoE(d, F, E, k, seed=int(self.rng.integers(2**31)), **options)
        if layer.use_expert_bias:
            layer.expert_bias[:] = self.normal(E, scale=0.05)
        return layer


@pytest.fixture
def make(rng):
    """Inputs bound to the test's rng."""
    return Inputs(rng)


# Set when .ci/sanitize.sh runs the suite against the AddressSanitizer build: ASan keeps
# freed memory in quarantine (RSS grows) and reserves terabytes of address space for its
# shadow (an RLIMIT_AS cap kills it), so memory-accounting tests skip there; the normal
# run and valgrind cover them.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
skip_under_asan = pytest.mark.skipif(UNDER_ASAN, reason="memory accounting is meaningless "
                                     "under AddressSanitizer (covered by the normal run)")
