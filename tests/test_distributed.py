"""Expert parallelism (moe.distributed) over torch.distributed gloo on loopback.

Two spawned groups (2 and 4 processes), each running every check in one process group so
that torch is imported once per process; each rank compares its results with the
single-process SparseMoE computed locally (every rank knows every rank's tokens):
forward bitwise layer(x_rank); "x" gradient bitwise; the routed experts' gradients bitwise
those of one layer on the concatenation of all ranks' tokens (dropless; with capacity,
close to the sum of the per-rank gradients); router / shared gradients bitwise the sum of
the per-rank gradients in rank order.  Then the faults: a config mismatch (every rank
raises naming the field), and last, a rank that raises mid-call (world 4) or dies
mid-call (world 2): the others raise within the short timeout.  The checks live in
tests/_ep_cases.py (tests/test_distributed_mpi.py runs them with MPITransport).
"""
import json
import os
import sys
import time
import traceback

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import _ep_cases as cases  # the checks, shared with test_distributed_mpi.py

import moe


def _worker(rank, world, init_method, outdir, fault):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import datetime

    import torch
    import torch.distributed as dist

    from moe.distributed import ExpertParallelMoE, TorchTransport
    torch.set_num_threads(1)
    moe.set_num_threads(1)
    report = {"rank": rank, "ok": False, "done": []}

    def save():
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)

    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        tr = TorchTransport()
        assert "torch" in sys.modules
        cases.run_checks(ExpertParallelMoE, tr, rank, world, report["done"])
        report["done"].append(cases.check_close(lambda: TorchTransport(timeout=30), rank,
                                                world))
        save()

        # faults, last (they leave the group unusable)
        def linger():  # stay alive (connections open): the others must give up by the timeout
            time.sleep(cases.FAULT_TIMEOUT + 4)

        cases.fault_phase(ExpertParallelMoE, TorchTransport(timeout=cases.FAULT_TIMEOUT),
                          rank, world, fault, report["done"], linger)
        report["ok"] = True
    except BaseException:
        report["error"] = traceback.format_exc()
    save()
    # no destroy_process_group: the group is broken by the fault phase
    sys.stdout.flush()
    os._exit(0 if report["ok"] else 1)


def _run(world, fault, tmp_path, limit=150):
    import torch.multiprocessing as mp
    init = f"file://{tmp_path / 'store'}"
    ctx = mp.start_processes(_worker, args=(world, init, str(tmp_path), fault), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    for p in ctx.processes:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
    for i in hung:
        ctx.processes[i].kill()
        ctx.processes[i].join(5)
    reports = {}
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        reports[r] = json.loads(path.read_text()) if path.exists() else None
    assert not hung, f"ranks {hung} hung past {limit} s: {reports}"
    return ctx, reports


@pytest.mark.parametrize("world,fault", [(2, "die"), (4, "raise")])
def test_expert_parallel(world, fault, tmp_path):
    ctx, reports = _run(world, fault, tmp_path)
    codes = [p.exitcode for p in ctx.processes]
    for r in range(world):
        rep = reports[r]
        assert rep is not None, f"rank {r} left no report (exit code {codes[r]})"
        if fault == "die" and r == cases.bad_rank(world, fault):
            assert codes[r] == 3, codes
            assert len(rep["done"]) >= 11, rep  # every check before the fault passed
            continue
        assert rep["ok"], f"rank {r}: {rep.get('error')}\n{rep['done']}"
        assert codes[r] == 0, codes
