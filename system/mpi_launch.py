"""``mpirun -n N pipetrain train --transport mpi ...``: the same run, its processes started by MPI.

Every rank runs the same command line. **Rank 0 is a dedicated coordinator**; ranks 1..N-1 are
the workers of the ``S x R`` grid, stage ``s`` of replica ``r`` on rank ``1 + r * S + s``, so
``N`` must be ``S x R + 1`` (checked on rank 0 before anything starts, with the command to use).
Why a rank of its own rather than making rank 0 also stage 0: the coordinator is the process
that must answer at once — to signals (mpirun's kill sequence gives it a quarter of a second),
to a worker's error, to a missing heartbeat — and it only can while its main thread does nothing
but wait in ``poll``. A stage's main thread spends its time computing. A dedicated rank also
lets the coordinator, its signal handling, its run directory and its failure reports be exactly
the pipe transport's code (``MpiCoordinator`` only replaces how workers are started and stopped);
the price is one process that sleeps in ``poll`` (put it on the login or head node).

Start-up (no pickle crosses MPI here either): every rank reports its pid and host name to rank 0
(``Gather``); rank 0 alone reads the command line, config, run directory and checkpoints (several
ranks checking "is this run directory free?" would race) and broadcasts go or no-go (``Bcast``);
then rank 0 runs :func:`system.trainer.run_training` with :class:`MpiCoordinator`, and the other
ranks run the worker's ``serve`` loop (:class:`MpiWorker`) with MPI channels
(:mod:`system.mpi_transport`) to rank 0 and to their neighbours. Stages write their checkpoint
segments and logs into the run directory themselves, as with pipes: across hosts it must be on a
shared file system at the same path.

Signals. ``mpirun`` forwards SIGUSR1 and SIGUSR2 to every rank; SIGTERM and SIGINT make it run
its kill sequence on every rank: SIGCONT, 0.25 s, SIGTERM, at most 0.25 s (less as soon as any
rank exits), SIGKILL. Workers ignore all of them (only rank 0 acts, and it tells the workers when
to stop). Rank 0 keeps the pipe transport's meanings, plus one: SIGCONT also asks for a checkpoint
at the next step boundary, because under mpirun it is the warning that SIGTERM follows, and a
quarter of a second is short. So on SIGTERM the checkpoint usually exists already (written at the
boundary after SIGCONT) and the stop writes another one at the next boundary if there is time;
either is a consistent checkpoint to resume from. SIGTSTP is not forwarded by mpirun (pause with
``pipetrain pause RUN_DIR`` on rank 0's host, which signals rank 0 directly).

Failures. Ranks are not restarted in place (``Coordinator.restartable`` is False): a worker that
reports an error, goes silent or sends garbage fails the run with the pipe transport's message
(plus its rank and host); rank 0 records it (``error``, ``run_end``), tells every worker to stop,
and the job ends with exit status 1. A worker that does not acknowledge the stop within the grace
period (a hung one) is taken down with ``MPI_Abort``. A rank that *dies* makes Open MPI kill the
whole job (mpirun names the rank and the signal). Either way recovery is the launcher's loop: the
same mpirun command with ``--resume`` continues from the newest intact checkpoint, bitwise exact.
Workers always exit 0 once told to stop (their own status goes to rank 0 in their last message):
a non-zero exit of any rank would make mpirun kill rank 0 before it has written its record.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from system.config import ConfigError, TrainConfig
from system.control import HANDLED, Requests
from system.coordinator import STOP_GRACE_S, Coordinator, WorkerFailed, WorkerHandle
from system.inbox import InboxFailure
from system.mpi_transport import (
    TAG_CHAIN,
    TAG_CONTROL,
    TAG_PIPELINE,
    MpiChannel,
    MpiHub,
    drain,
    import_mpi,
)
from system.protocol import Kind, ProtocolError, decode_json, encode_json
from system.stage import DOWNSTREAM, UPSTREAM
from system.transport import Channel, ChannelClosed, ChannelTimeout
from system.worker import CONTROL, Worker

# Set by the launchers for each process they start: Open MPI, PMIx-based ones, MPICH's Hydra.
RANK_ENV_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
HOST_BYTES = 256
FAILED_STOP_GRACE_S = 2.0  # after a failure: how long a worker may take to acknowledge "stop"
EXIT_FAILED = 1
DRAIN_TIMEOUT_S = 10.0  # every rank ending its communication together, at the very end


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


def worker_rank(stage: int, replica: int, stages: int) -> int:
    return 1 + replica * stages + stage


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


# -- the world: every rank's view of the job ---------------------------------------------------


class MpiRank:
    """A worker rank seen from rank 0, standing in for the ``subprocess.Popen`` of a pipe worker
    (``pid``, ``poll``, ``wait``, ``kill``). Its return code is the status the worker reported in
    its last message; a rank cannot be killed alone (the job is aborted instead)."""

    def __init__(self, rank: int, pid: int, host: str) -> None:
        self.rank, self.pid, self.host = rank, pid, host
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"MPI rank {self.rank}", timeout or 0)
        return self.returncode

    def kill(self) -> None:
        """Nothing to do per rank: an unresponsive rank makes rank 0 abort the whole job."""


class MpiWorld:
    """The communicator, the progress hub and (on rank 0) the control channel to every rank."""

    def __init__(self, MPI: Any) -> None:  # noqa: N803 - the module's own name
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()  # pipetrain's own: no tag can clash with anyone's
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.hub: MpiHub | None = None
        self.ranks: dict[int, MpiRank] = {}
        self.controls: dict[int, MpiChannel] = {}
        self.stop_sent: set[int] = set()
        pid = np.array([os.getpid()], dtype=np.int64)
        host = np.zeros(HOST_BYTES, dtype=np.uint8)
        name = socket.gethostname().encode()[:HOST_BYTES]
        host[:len(name)] = np.frombuffer(name, dtype=np.uint8)
        pids = np.empty(self.size, dtype=np.int64) if self.rank == 0 else None
        hosts = np.empty((self.size, HOST_BYTES), dtype=np.uint8) if self.rank == 0 else None
        self.comm.Gather(pid, pids, root=0)
        self.comm.Gather(host, hosts, root=0)
        if self.rank == 0:
            for rank in range(self.size):
                text = hosts[rank].tobytes().rstrip(b"\0").decode(errors="replace")
                self.ranks[rank] = MpiRank(rank, int(pids[rank]), text)

    # go / no-go: a count of BLAS threads, or 0 when rank 0 refused the command
    def send_go(self, blas_threads: int) -> None:
        self.comm.Bcast(np.array([blas_threads], dtype=np.int64), root=0)

    def receive_go(self) -> int:
        go = np.zeros(1, dtype=np.int64)
        self.comm.Bcast(go, root=0)
        return int(go[0])

    def start_hub(self) -> None:
        self.hub = MpiHub(self.comm, self.MPI)
        if self.rank == 0:
            for rank in range(1, self.size):
                self.controls[rank] = MpiChannel(self.hub, rank, TAG_CONTROL,
                                                 name=f"control of rank {rank}")

    def stop_ranks(self, ranks: list[int], grace_s: float) -> list[int]:
        """Tell ``ranks`` to stop (once) and wait up to ``grace_s`` for each to acknowledge
        with its exit status; returns the ranks that did not."""
        for rank in ranks:
            if rank in self.stop_sent:
                continue
            self.stop_sent.add(rank)
            with contextlib.suppress(ChannelClosed, ChannelTimeout, ProtocolError):
                self.controls[rank].send_frame(Kind.CONTROL, 0, 0, encode_json({"cmd": "stop"}),
                                               timeout_s=grace_s)
        deadline = time.monotonic() + grace_s
        silent = []
        for rank in ranks:
            process = self.ranks[rank]
            control = self.controls[rank]
            while process.returncode is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    frame = control.recv_frame(timeout_s=remaining)
                except (ChannelClosed, ChannelTimeout, ProtocolError):
                    break
                if frame.kind != Kind.CONTROL:
                    continue  # e.g. parameters of an interrupted gather
                with contextlib.suppress(ProtocolError):
                    message = decode_json(frame.array)
                    if message.get("event") == "exit":
                        process.returncode = int(message.get("status", 0))
            if process.returncode is None:
                silent.append(rank)
        return silent

    def release(self, grace_s: float) -> list[int]:
        """Stop every worker rank not stopped yet (those never started included); returns the
        ranks that never acknowledged any stop."""
        others = [rank for rank in range(1, self.size)]
        self.stop_ranks([r for r in others if r not in self.stop_sent], grace_s)
        return [r for r in others if self.ranks[r].returncode is None]

    def close(self) -> None:
        """Every rank, whatever happened before: close the channels, stop the hub, and end the
        communication together (:func:`system.mpi_transport.drain`)."""
        for channel in self.controls.values():
            channel.close()
        self.controls.clear()
        pending = []
        if self.hub is not None:
            pending = self.hub.close()
            self.hub = None
        left = drain(self.comm, self.MPI, pending, DRAIN_TIMEOUT_S)
        if left:
            print(f"pipetrain: rank {self.rank}: {left} MPI send(s) never completed",
                  file=sys.stderr)
        with contextlib.suppress(Exception):
            self.comm.Free()

    def abort(self, status: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.MPI.COMM_WORLD.Abort(status)


# -- rank 0: the coordinator ------------------------------------------------------------------


class MpiRequests(Requests):
    """The pipe transport's signal meanings, plus: SIGCONT asks for a checkpoint. Under mpirun
    SIGCONT is the first signal of the kill sequence, 0.25 s before SIGTERM; checkpointing at
    the next boundary then leaves a fresh checkpoint even if the stop cannot finish in time."""

    def apply(self, signum: int) -> None:
        super().apply(signum)
        if signum == signal.SIGCONT:
            self.checkpoint = True


class MpiCoordinator(Coordinator):
    """The coordinator, its workers being MPI ranks: ``start`` sends each its ``init`` over MPI
    instead of spawning it; ``shutdown`` stops them and collects their exit statuses."""

    restartable = False

    def __init__(self, world: MpiWorld, config: TrainConfig, run: Any,
                 signals: Any = None) -> None:
        super().__init__(config, run, signals)
        self.world = world
        if signals is not None:
            signals.requests = MpiRequests()

    def start(self, resume_from: Path | None = None, start_step: int = 0) -> None:
        if self.generation:
            raise WorkerFailed("MPI ranks cannot be restarted in place")
        stages, replicas = self.config.stages, self.config.replicas
        for replica in range(replicas):
            for index, layers in enumerate(self.bounds):
                rank = worker_rank(index, replica, stages)
                links: dict[str, int] = {}  # the peer rank of each link, under the pipe fd names
                if index > 0:
                    links.update(up_in=rank - 1, up_out=rank - 1)
                if index < stages - 1:
                    links.update(down_in=rank + 1, down_out=rank + 1)
                if replica > 0:
                    links.update(prev_in=rank - stages, prev_out=rank - stages)
                if replica < replicas - 1:
                    links.update(next_in=rank + stages, next_out=rank + stages)
                control = self.world.controls[rank]
                handle = WorkerHandle(index, tuple(layers), self.world.ranks[rank], control,
                                      self.log_path(index, replica), replica=replica,
                                      replicated=replicas > 1)
                control.name = f"control of {handle.role}"
                control.stall_timeout_s = self.op_timeout_s
                self.workers.append(handle)
                message = self.init_message(index, replica, layers, links, resume_from,
                                            start_step)
                message["log_path"] = str(handle.log_path)
                self.send(handle, message)
        self.run.update_state(transport="mpi", mpi_ranks=[
            {"rank": rank.rank, "pid": rank.pid, "host": rank.host,
             "role": "coordinator" if rank.rank == 0 else self._role_of(rank.rank)}
            for rank in self.world.ranks.values()])
        self.collect("ready")
        self.generation += 1

    def _role_of(self, rank: int) -> str:
        for worker in self.workers:
            if worker.process.rank == rank:
                return worker.role
        return "unused"

    def shutdown(self, *, graceful: bool = True) -> list[WorkerHandle]:
        """Stop every worker and wait for its acknowledgement (graceful or not: a rank cannot be
        killed alone; one that does not answer makes rank 0 abort the job at the end)."""
        workers, self.workers = self.workers, []
        self.world.stop_ranks([worker.process.rank for worker in workers],
                              STOP_GRACE_S if graceful else FAILED_STOP_GRACE_S)
        for worker in workers:
            worker.returncode = worker.process.returncode
        return workers

    def _failure(self, worker: WorkerHandle, reason: str) -> WorkerFailed:
        where = f"MPI rank {worker.process.rank} on {worker.process.host}"
        return super()._failure(worker, f"{reason} [{where}]")


def _run_coordinator(world: MpiWorld, prepare: Callable[[], tuple[TrainConfig, Path]], *,
                     quiet: bool, resume: bool) -> int:
    from threadpoolctl import threadpool_limits

    from system.trainer import run_training

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
    world.send_go(config.blas_threads)
    world.start_hub()

    def coordinator(config: TrainConfig, run: Any, signals: Any) -> MpiCoordinator:
        return MpiCoordinator(world, config, run, signals)

    for sig in HANDLED:  # as in system.cli: until the run installs its handlers, and after
        signal.signal(sig, signal.SIG_IGN)
    status = EXIT_FAILED
    try:
        with threadpool_limits(config.blas_threads):
            status = run_training(config, run_dir, quiet=quiet, resume=resume,
                                  coordinator_factory=coordinator)
    finally:
        silent = world.release(FAILED_STOP_GRACE_S)
        if silent:
            roles = ", ".join(f"rank {r} (pid {world.ranks[r].pid} on {world.ranks[r].host})"
                              for r in silent)
            print(f"pipetrain: {roles} did not stop when told to; aborting the MPI job",
                  file=sys.stderr)
            world.abort(status or EXIT_FAILED)
    if not quiet:
        print(f"run directory: {run_dir}")
    return status


# -- ranks 1..N-1: the workers ----------------------------------------------------------------


class MpiWorker(Worker):
    """The pipe worker's serve loop, its links MPI channels. After ``serve`` returns it stays
    until the coordinator says ``stop`` (exiting earlier would make mpirun kill the job while
    rank 0 is still recording a failure), then acknowledges with its exit status."""

    def __init__(self, control: MpiChannel, world: MpiWorld) -> None:
        super().__init__(control)
        self.world = world
        self.last_command: str | None = None

    def next_command(self) -> dict[str, Any]:
        message = super().next_command()
        self.last_command = message.get("cmd")
        if self.stage is None and self.last_command == "stop":
            # Released before init: rank 0 refused to start (its message says why). Leave
            # quietly through serve's "interrupted" exit.
            raise InterruptedError("released before init")
        return message

    def alive(self) -> bool:
        """Also stop waiting when a command is pending while the main thread waits for a
        neighbour. Steps run in lock-step, so the coordinator sends nothing during a step but
        ``stop`` after a failure elsewhere; a pipe worker is killed then, a rank must leave
        its wait (serve returns, and :meth:`finish` finds the ``stop``)."""
        return super().alive() or bool(self.inbox.depth(CONTROL))

    def init(self, message: dict[str, Any]) -> None:
        log_path = message.get("log_path")
        if log_path:  # from here on this rank's output goes to its log, as a pipe worker's does
            sys.stdout.flush()
            sys.stderr.flush()
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        super().init(message)

    def open_link(self, fds: dict[str, int], read_key: str, write_key: str,
                  name: str) -> Channel | None:
        if read_key not in fds:
            return None
        tag = TAG_PIPELINE if name in (UPSTREAM, DOWNSTREAM) else TAG_CHAIN
        return MpiChannel(self.world.hub, fds[read_key], tag, name=name,
                          stall_timeout_s=self.op_timeout_s)

    def close_control(self) -> None:
        """Kept open: the worker still waits for ``stop`` and acknowledges on it."""

    def finish(self, status: int) -> None:
        if self.last_command != "stop":
            self._await_stop()
        hub_thread = "mpi-progress"
        leftover = [t.name for t in threading.enumerate()
                    if t is not threading.main_thread() and t.name != hub_thread]
        if leftover:
            sys.stderr.write(f"{self.name}: threads still alive at exit: {leftover}\n")
            status = 4
        with self.control_lock:
            self.control.send_frame(Kind.CONTROL, 0, 0, encode_json(
                {"event": "exit", "status": status, "pid": os.getpid()}))
        self.control.close()

    def _await_stop(self) -> None:
        """Wait for ``stop``: first among the commands the receiver thread had read ahead,
        then on the channel itself. No timeout: rank 0 decides, or mpirun ends the job."""
        while self.inbox.depth(CONTROL):
            with contextlib.suppress(InboxFailure):
                frame = self.inbox.get(CONTROL)
                if _is_stop(frame):
                    return
        while True:
            if _is_stop(self.control.recv_frame()):
                return


def _is_stop(frame: Any) -> bool:
    if frame.kind != Kind.CONTROL:
        return False
    try:
        return decode_json(frame.array).get("cmd") == "stop"
    except (ProtocolError, AttributeError):
        return False


def _run_worker(world: MpiWorld) -> int:
    from threadpoolctl import threadpool_limits

    blas_threads = world.receive_go()
    if not blas_threads:
        return 0  # rank 0 refused the command and says why
    world.start_hub()
    control = MpiChannel(world.hub, 0, TAG_CONTROL, name="control")
    worker = MpiWorker(control, world)
    with threadpool_limits(blas_threads):
        status = worker.serve()
    worker.finish(status)
    return 0


# -- the entry point (system.cli) --------------------------------------------------------------


def _ignore_signals(rank: int | None) -> None:
    """mpirun forwards SIGUSR1/SIGUSR2 to every rank and turns SIGTERM/SIGINT into a kill
    sequence on every rank. Workers ignore them all: rank 0 acts and tells them when to stop.
    Rank 0 ignores SIGUSR1/SIGUSR2 until the run installs its handlers (their default action
    would end the process)."""
    ignored = [signal.SIGUSR1, signal.SIGUSR2]
    if rank != 0:
        ignored += [signal.SIGTERM, signal.SIGINT]
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
