"""The checks of expert parallelism (moe.distributed), shared by the engines' tests.

tests/test_distributed.py (TorchTransport, spawned processes) and
tests/test_distributed_mpi.py (MPITransport, mpiexec running tests/_ep_mpi_worker.py) run
the same checks on every rank: ``run_checks`` (the transport's collectives, then every
config vs the single-process SparseMoE computed locally -- every rank knows every rank's
tokens -- then config mismatches) and ``fault_phase`` (a rank that raises or dies
mid-call; the others raise ExpertParallelError within the timeout).
"""
import os
import time

import numpy as np

import moe
from moe.distributed import ExpertParallelError

FAULT_TIMEOUT = 5.0  # seconds: the fault phase's transport timeout
D, F = 16, 24


def configs():
    """name -> SparseMoE kwargs."""
    return {
        "mixtral": dict(d_model=D, d_ff=F, n_experts=8, top_k=2, scoring="softmax"),
        "deepseek": dict(d_model=D, d_ff=F, n_experts=8, top_k=2, scoring="sigmoid",
                         n_groups=4, topk_groups=2, expert_bias=True, n_shared_experts=1,
                         routed_scaling=2.5),
        # 6 experts (uneven on 4 ranks), a gated shared expert, gelu, capacity
        "qwen-capacity": dict(d_model=D, d_ff=F, n_experts=6, top_k=3, scoring="softmax",
                              n_shared_experts=1, shared_expert_gate=True,
                              capacity_factor=1.0, activation="gelu"),
        "biases-bf16": dict(d_model=D, d_ff=F, n_experts=6, top_k=2, expert_biases=True,
                            activation="swiglu-oai", dtype="bfloat16"),
    }


def tokens(world, seed):
    """Every rank's token count (uneven; rank world-1 has none in 'empty' cases)."""
    rng = np.random.default_rng(seed)
    return [int(n) for n in rng.integers(3, 20, size=world)]


def make_layer(cfg, seed):
    layer = moe.SparseMoE(**cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    if layer.use_expert_bias:
        layer.expert_bias = rng.standard_normal(layer.n_experts).astype(np.float32) * 0.1
    if layer.use_expert_biases:
        for name in ("b_gate", "b_up", "b_down"):
            setattr(layer, name, rng.standard_normal(getattr(layer, name).shape)
                    .astype(np.float32) * 0.1)
    return layer


def check_case(ep_cls, transport, rank, world, name, cfg, seed, sizes, expert_to_rank=None,
                starve=None):
    """One config: forward, backward and gradients vs the single-process layer."""
    layer = make_layer(cfg, seed)
    if starve is not None:  # the experts of rank `starve` are never selected
        ep_probe = ep_cls(layer, transport, expert_to_rank)
        bias = layer.expert_bias.copy()
        bias[ep_probe.expert_to_rank == starve] = -1e3
        layer.expert_bias = bias
    ep = ep_cls(layer, transport, expert_to_rank)
    rng = np.random.default_rng(seed + 7)
    X = rng.standard_normal((sum(sizes), D)).astype(np.float32)
    DY = rng.standard_normal((sum(sizes), D)).astype(np.float32)
    cuts = np.cumsum([0] + sizes)
    xs = [X[cuts[r]:cuts[r + 1]] for r in range(world)]
    dys = [DY[cuts[r]:cuts[r + 1]] for r in range(world)]
    x, dy = xs[rank], dys[rank]
    where = f"{name} rank {rank}/{world}"

    y, routing = ep(x, return_routing=True)
    y_ref, r_ref = layer(x, return_routing=True)
    assert np.array_equal(y, y_ref), f"{where}: forward differs"
    assert np.array_equal(routing.expert_ids, r_ref.expert_ids), where
    if starve is not None and rank == starve:
        assert ep.local_experts.size and not np.isin(routing.expert_ids,
                                                     ep.local_experts).any()

    aux, zc = 0.01, 0.001
    y, ctx = ep.forward_train(x)
    g = ep.backward(ctx, dy, aux_coef=aux, z_coef=zc)
    refs = []
    for r in range(world):
        yr, cr = layer.forward_train(xs[r])
        refs.append(layer.backward(cr, dys[r], aux_coef=aux, z_coef=zc))
        if r == rank:
            assert np.array_equal(y, yr), f"{where}: forward_train differs"
    assert np.array_equal(g["x"], refs[rank]["x"]), f"{where}: grad x differs"
    assert set(g) == set(refs[rank]), where
    for wname in ("router_weight", "shared_w_gate", "shared_w_up", "shared_w_down",
                  "shared_gate_weight"):
        if wname in g:
            want = refs[0][wname].copy()
            for ref in refs[1:]:
                want += ref[wname]
            assert np.array_equal(g[wname], want), f"{where}: {wname} (rank-order sum)"
    local = ep.local_experts
    dropless = cfg.get("capacity_factor") is None
    if dropless:
        _, cc = layer.forward_train(X)
        gc = layer.backward(cc, DY)
    for wname in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"):
        if wname not in g:
            continue
        assert g[wname].shape[0] == local.size, where
        if starve is not None and rank == starve:
            assert not g[wname].any(), f"{where}: a starved rank's {wname} is not 0"
        if dropless:
            assert np.array_equal(g[wname], gc[wname][local]), \
                f"{where}: {wname} differs from one layer on all ranks' tokens"
        else:
            want = sum(ref[wname][local] for ref in refs)
            np.testing.assert_allclose(g[wname], want, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{where}: {wname}")
    return f"{name} ok"


def mismatch(ep_cls, transport, rank, world):
    out = []
    for field, change, expect in (
            ("top_k", dict(top_k=3), "top_k"),
            ("d_ff", dict(d_ff=F + 2), "d_ff"),
            ("router values", dict(), "router_weight values")):
        cfg = dict(configs()["mixtral"])
        seed = 3
        if rank == world - 1:
            cfg.update(change)
            if not change:
                seed = 4  # different router weights
        layer = make_layer(cfg, seed)
        try:
            ep_cls(layer, transport)
        except ValueError as exc:
            assert expect in str(exc), f"{field}: {exc}"
            out.append(f"mismatch {field} raised")
            continue
        raise AssertionError(f"mismatch in {field} did not raise on rank {rank}")
    return out


def check_transport(tr, rank, world):
    """The transport alone: sizes exchanged by alltoallv, the rank-order sum, objects."""
    send = [np.full((r + rank, 3), 10 * rank + r, np.int64) for r in range(world)]
    got = tr.alltoallv(send)
    for s in range(world):
        assert got[s].shape == (s + rank, 3) and (got[s] == 10 * s + rank).all(), s
    a = (np.arange(5, dtype=np.float32) + rank) / 7
    want = np.arange(5, dtype=np.float32) / 7
    for r in range(1, world):
        want += (np.arange(5, dtype=np.float32) + r) / 7
    assert np.array_equal(tr.allreduce_sum(a), want)
    assert tr.allgather_object(("r", rank)) == [("r", r) for r in range(world)]
    return "transport ok"


def check_close(make, rank, world):
    """close(), on a transport of its own (every rank together): the context manager
    closes on exit; a closed transport raises; closing twice does nothing."""
    with make() as tr:
        assert tr.allgather_object(rank) == list(range(world))
    for call in (lambda: tr.allgather_object(rank), lambda: tr.allreduce_sum(np.ones(2)),
                 lambda: tr.alltoall_counts(np.zeros((world, 1), np.int64))):
        try:
            call()
        except ExpertParallelError as exc:
            assert "is closed" in str(exc), exc
        else:
            raise AssertionError("a closed transport took a call")
    tr.close()
    return "close ok"


def run_checks(ep_cls, tr, rank, world, done):
    """Every check before the faults; appends to `done` as they pass (11 entries)."""
    done.append(check_transport(tr, rank, world))
    cfgs = configs()
    for i, (name, cfg) in enumerate(cfgs.items()):
        done.append(check_case(ep_cls, tr, rank, world, name, cfg, 10 + i, tokens(world, i)))
    # a given, non-contiguous expert map
    m = np.arange(8)[::-1] % world
    done.append(check_case(ep_cls, tr, rank, world, "mixtral-map", cfgs["mixtral"], 20,
                           tokens(world, 5), m))
    # a rank without tokens; a rank whose experts get no rows
    sizes = tokens(world, 6)
    sizes[-1] = 0
    done.append(check_case(ep_cls, tr, rank, world, "no-tokens", cfgs["deepseek"], 21, sizes))
    done.append(check_case(ep_cls, tr, rank, world, "starved", cfgs["deepseek"], 22,
                           tokens(world, 7), starve=1))
    done += mismatch(ep_cls, tr, rank, world)


def bad_rank(world, fault):
    return 1 if fault == "die" else world - 2


def fault_phase(ep_cls, transport, rank, world, fault, done, linger):
    """A working call, then rank bad_rank() fails in the next one: "die" (os._exit(3) in
    its alltoallv) or "raise" (its alltoallv raises; it then calls linger(): it stays
    alive without taking part).  The others must raise ExpertParallelError within the
    transport's timeout (FAULT_TIMEOUT), and the layer must then refuse further calls."""
    layer = make_layer(configs()["mixtral"], 30)
    ep = ep_cls(layer, transport)
    x = np.random.default_rng(rank).standard_normal((9, D)).astype(np.float32)
    ep(x)  # a working call first
    bad = bad_rank(world, fault)
    if rank == bad:
        def fail(*a, **k):
            if fault == "die":
                os._exit(3)
            raise RuntimeError("injected failure")
        ep.transport.alltoallv = fail
    t0 = time.monotonic()
    try:
        ep(x)
    except ExpertParallelError as exc:
        elapsed = time.monotonic() - t0
        assert rank != bad
        assert elapsed < FAULT_TIMEOUT + 20, elapsed
        if fault == "raise":  # the raising rank stays alive: the timeout ends it
            assert elapsed > FAULT_TIMEOUT - 1, elapsed
        done.append(f"peer fault raised after {elapsed:.1f} s: {str(exc)[:120]}")
        try:
            ep(x)
        except ExpertParallelError as again:
            assert "broken" in str(again)
        else:
            raise AssertionError("a broken layer ran again")
    except RuntimeError as exc:
        assert rank == bad and "injected" in str(exc), exc
        done.append("raised the injected failure")
        linger()
    else:
        raise AssertionError("the call after a peer's failure returned")
