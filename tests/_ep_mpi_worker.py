"""One rank of tests/test_distributed_mpi.py, run under mpiexec:

    mpiexec -n WORLD python _ep_mpi_worker.py OUTDIR FAULT PHASES

FAULT: "die" or "raise" (see _ep_cases.fault_phase); PHASES: "all" (every check of
_ep_cases.run_checks, then the fault) or "faults" (the fault alone).  Each rank writes
OUTDIR/rank<r>.json ({"rank", "ok", "final", "done": [...], "error"?}) after the checks and
at the end.  The fault leaves a collective abandoned, so the job cannot end normally: as
MPITransport documents, the job is then ended with comm.Abort(ABORT_CODE), by the lowest
surviving rank once every surviving rank's final report is written.
"""
import json
import os
import sys
import time
import traceback

ABORT_CODE = 17
WAIT = 30.0  # seconds: the most a rank waits for the others' final reports


def main(outdir, fault, phases):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _ep_cases as cases
    from mpi4py import MPI

    import moe
    from moe.distributed import ExpertParallelMoE, MPITransport

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    moe.set_num_threads(1)
    dead = {cases.bad_rank(world, fault)} if fault == "die" else set()
    live = [r for r in range(world) if r not in dead]
    report = {"rank": rank, "ok": False, "final": False, "done": []}

    def save():
        path = os.path.join(outdir, f"rank{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(report, f)
        os.replace(path + ".tmp", path)

    def final(r):
        try:
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                return json.load(f)["final"]
        except (OSError, ValueError, KeyError):
            return False

    def wait_final(ranks):
        deadline = time.monotonic() + WAIT
        while not all(final(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)

    try:
        assert "torch" not in sys.modules
        if phases == "all":
            with MPITransport() as tr:  # no timeout: the blocking path (Wait)
                cases.run_checks(ExpertParallelMoE, tr, rank, world, report["done"])
            report["done"].append(cases.check_close(lambda: MPITransport(timeout=30), rank,
                                                    world))
            save()

        def linger():  # the raising rank takes no further part until the others are done
            save()
            wait_final([r for r in live if r != rank])

        cases.fault_phase(ExpertParallelMoE, MPITransport(timeout=cases.FAULT_TIMEOUT),
                          rank, world, fault, report["done"], linger)
        report["ok"] = True
    except BaseException:
        report["error"] = traceback.format_exc()
    report["final"] = True
    save()
    sys.stdout.flush()
    wait_final(live)
    if rank == min(live):
        comm.Abort(ABORT_CODE)
    time.sleep(WAIT)  # the abort ends this process
    os._exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
