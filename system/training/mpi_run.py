"""``mpirun -n N pipetrain train --transport mpi ...``: the same run, its processes started by MPI.

Every rank runs the same command line. **Rank 0 is a dedicated coordinator**; ranks 1..N-1 are
the workers of the ``S x R`` grid, stage ``s`` of replica ``r`` on rank ``1 + r * S + s``, so
``N`` must be ``S x R + 1`` (checked on rank 0 before anything starts, with the command to use).
Why a rank of its own rather than making rank 0 also stage 0: the coordinator is the process
that must answer at once (to signals: mpirun's kill sequence gives it a quarter of a second; to
a worker's error; to a missing heartbeat), and it only can while its main thread does nothing
but wait in ``poll``. A stage's main thread spends its time computing. A dedicated rank also
lets the coordinator, its signal handling, its run directory and its failure reports be exactly
the pipe transport's code: only the launcher differs (``pipetrain.runtime.mpi_launcher``); the
price is one process that sleeps in ``poll`` (put it on the login or head node).

Start-up (no pickle crosses MPI here either): every rank reports its pid and host name to rank 0
(``Gather``); rank 0 alone reads the command line, config, run directory and checkpoints (several
ranks checking "is this run directory free?" would race) and broadcasts go or no-go (``Bcast``);
then rank 0 runs :func:`pipetrain.training.trainer.run_training` with an ``MpiLauncher``, and the
other ranks serve as workers. Stages write their checkpoint segments and logs into the run
directory themselves, as with pipes: across hosts it must be on a shared file system at the
same path.

Signals. ``mpirun`` forwards SIGUSR1 and SIGUSR2 to every rank; SIGTERM and SIGINT make it run
its kill sequence on every rank: SIGCONT, 0.25 s, SIGTERM, at most 0.25 s (less as soon as any
rank exits), SIGKILL. Workers ignore all of them (only rank 0 acts, and it tells the workers when
to stop). Rank 0 keeps the pipe transport's meanings, plus one: SIGCONT also asks for a
checkpoint at the next step boundary, because under mpirun it is the warning that SIGTERM
follows, and a quarter of a second is short. SIGTSTP is not forwarded by mpirun (pause with
``pipetrain pause RUN_DIR`` on rank 0's host, which signals rank 0 directly).

Failures. Ranks are not restarted in place: a worker that reports an error, goes silent or sends
garbage fails the run with the pipe transport's message (plus its rank and host); rank 0 records
it (``error``, ``run_end``), tells every worker to stop, and the job ends with exit status 1. A
worker that does not acknowledge the stop within the grace period (a hung one) is taken down with
``MPI_Abort``. A rank that *dies* makes Open MPI kill the whole job (mpirun names the rank and the
signal). Either way recovery is the launcher's loop: the same mpirun command with ``--resume``
continues from the newest intact checkpoint, bitwise exact.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pipetrain.config import ConfigError, TrainConfig
from pipetrain.runtime.mpi_launcher import FAILED_STOP_GRACE_S, MpiLauncher, MpiWorld, serve_rank
from pipetrain.runtime.signals import ignore_job_control
from pipetrain.status import ExitCode
from pipetrain.threads import CONTROL_SIGNALS
from pipetrain.wire.mpi_hub import import_mpi

# Set by the launchers for each process they start: Open MPI, PMIx-based ones, MPICH's Hydra.
RANK_ENV_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def launcher_rank() -> int | None:
    """This process's rank if an MPI launcher started it (read from the environment, without
    loading MPI), else None."""
    for name in RANK_ENV_VARS:
        value = os.environ.get(name)
        if value is not None:
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def launched_by_mpirun() -> bool:
    return launcher_rank() is not None


def world_size(config: TrainConfig) -> int:
    """Ranks a run needs: one coordinator and one per stage of every replica."""
    return config.stages * config.replicas + 1


def launch_hint(config: TrainConfig) -> str:
    n = world_size(config)
    return (f"--transport mpi runs under mpirun with {n} ranks (1 coordinator + "
            f"{config.stages} stage(s) x {config.replicas} replica(s)): "
            f"mpirun -n {n} pipetrain train --transport mpi ...")


def check_world(config: TrainConfig, size: int) -> None:
    if config.transport != "mpi":
        raise ConfigError(f"started by mpirun ({size} ranks) but transport is "
                          f"{config.transport!r}: add --transport mpi")
    if size != world_size(config):
        raise ConfigError(
            f"mpirun started {size} rank(s) but --stages {config.stages} x --replicas "
            f"{config.replicas} needs {world_size(config)} (rank 0 coordinates, one rank per "
            f"stage of every replica): use mpirun -n {world_size(config)}, or change "
            f"--stages/--replicas so that stages x replicas = {size - 1}")


def _run_coordinator(world: MpiWorld, prepare: Callable[[], tuple[TrainConfig, Path]], *,
                     quiet: bool, resume: bool) -> int:
    from threadpoolctl import threadpool_limits

    from pipetrain.training.trainer import run_training

    try:
        config, run_dir = prepare()
        check_world(config, world.size)
        # Absolute, so that every rank (and a checkpoint directory sent to a stage) names the
        # same place whatever the rank's working directory.
        run_dir = run_dir.resolve()
        config = config.replace(run_dir=str(run_dir))
    except BaseException:
        world.send_go(0)  # the workers leave quietly; this rank reports the error
        raise
    # Printed first, even with --quiet, as the pipe transport does: the handle for
    # `pipetrain status|stop|plot RUN_DIR`.
    print(f"run directory: {run_dir}", flush=True)
    world.send_go(config.blas_threads)
    world.start_hub()
    for sig in CONTROL_SIGNALS:  # as in pipetrain.cli: until the run installs its handlers
        signal.signal(sig, signal.SIG_IGN)
    status = ExitCode.FAILED
    try:
        with threadpool_limits(config.blas_threads):
            status = run_training(config, run_dir, quiet=quiet, resume=resume,
                                  launcher_factory=lambda c: MpiLauncher(world, c.op_timeout_s))
    finally:
        silent = world.release(FAILED_STOP_GRACE_S)
        if silent:
            roles = ", ".join(f"rank {r} (pid {world.ranks[r].pid} on {world.ranks[r].host})"
                              for r in silent)
            print(f"pipetrain: {roles} did not stop when told to; aborting the MPI job",
                  file=sys.stderr)
            world.abort(status or ExitCode.FAILED)
    return status


def _run_worker(world: MpiWorld) -> int:
    from threadpoolctl import threadpool_limits

    blas_threads = world.receive_go()
    if not blas_threads:
        return ExitCode.OK  # rank 0 refused the command and says why
    world.start_hub()
    with threadpool_limits(blas_threads):
        serve_rank(world)
    return ExitCode.OK


def _ignore_signals(rank: int | None) -> None:
    """mpirun forwards SIGUSR1/SIGUSR2 to every rank and turns SIGTERM/SIGINT into a kill
    sequence on every rank. Workers ignore them all: rank 0 acts and tells them when to stop.
    Rank 0 ignores SIGUSR1/SIGUSR2 until the run installs its handlers (their default action
    would end the process)."""
    ignored = [signal.SIGUSR1, signal.SIGUSR2]
    if rank != 0:
        ignored += [signal.SIGTERM]
        ignore_job_control()
    for sig in ignored:
        signal.signal(sig, signal.SIG_IGN)


def main(prepare: Callable[[], tuple[TrainConfig, Path]], *, quiet: bool = False,
         resume: bool = False) -> int:
    """Run this rank's part. ``prepare`` (rank 0 only) resolves and checks the command line:
    the config and the run directory, raising the CLI's usage errors."""
    _ignore_signals(launcher_rank())
    MPI = import_mpi()  # noqa: N806 - the module's own name
    world = MpiWorld(MPI)
    try:
        if world.rank == 0:
            return _run_coordinator(world, prepare, quiet=quiet, resume=resume)
        return _run_worker(world)
    finally:
        world.close()
        # Every rank here has been told to stop (or rank 0 aborted the job). Finalizing now,
        # together, rather than at interpreter exit keeps a non-zero exit of rank 0 from
        # making mpirun kill ranks that are still inside MPI_Finalize.
        MPI.Finalize()
