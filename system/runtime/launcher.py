"""Starting and stopping workers: the part of running a group that depends on the transport.

The coordinator decides (which steps, when to checkpoint, whom to blame); a :class:`Launcher`
only starts the S x R grid of workers with their links and control channels, and stops them.
:class:`PipeLauncher` spawns child processes joined by ``os.pipe``s; the MPI launcher
(``pipetrain.runtime.mpi_launcher``) uses the ranks ``mpirun`` started. Both hand the
coordinator the same :class:`WorkerHandle`s, so the event loop, the step protocol and the
failure diagnosis are one piece of code for both.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipetrain import hooks
from pipetrain.pipeline.partition import describe_layers
from pipetrain.run.storage import StorageError
from pipetrain.runtime import messages
from pipetrain.runtime.courier import Courier, courier_pair
from pipetrain.runtime.topology import Grid, Position
from pipetrain.wire.channel import Channel, ChannelClosed, ChannelTimeout
from pipetrain.wire.frames import Kind, ProtocolError
from pipetrain.wire.pipe import PipeChannel, open_pipe

STOP_GRACE_S = 3.0
WORKER_MODULE = "pipetrain.runtime.worker"


class Process(Protocol):
    """What the coordinator asks of a worker's process: ``subprocess.Popen`` has it."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@dataclass(eq=False)
class WorkerHandle:
    """One worker as the coordinator sees it."""

    position: Position
    layers: tuple[int, ...]  # (first, stop), or one such pair per piece (interleaved)
    process: Process
    control: Channel
    log_path: Path
    endpoints: dict[str, dict[str, Any]]  # its links, in the transport's terms (for Init)
    replicated: bool = False
    returncode: int | None = None
    last_error: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    courier: Courier | None = None  # pipes: the socket that hands it fds
    fds: list[str] = field(default_factory=list)  # the fd batch last sent, to announce
    ready: bool = False  # it reported Ready (a failure before that is a start-up failure)
    region: bool = False  # it keeps an in-memory snapshot region

    @property
    def index(self) -> int:
        return self.position.stage

    @property
    def replica(self) -> int:
        return self.position.replica

    @property
    def role(self) -> str:
        replica = f" replica {self.replica}" if self.replicated else ""
        return f"stage {self.index}{replica} (layers {describe_layers(self.layers)})"


# (position) -> the log file of that worker
LogPath = Callable[[Position], Path]


class Launcher(Protocol):
    restartable: bool       # can a failed group be replaced (--max-restarts)?
    replaceable: bool       # can one worker be replaced while the others run on (and keep
    #                         in-memory snapshots)? pipes yes, MPI ranks no
    cont_checkpoints: bool  # does SIGCONT also ask for a checkpoint (see Requests)?

    def start(self, grid: Grid, bounds: list[tuple[int, ...]], log_path: LogPath,
              generation: int) -> list[WorkerHandle]:
        """Every worker of ``grid``, in ``grid.positions()`` order, running, linked, and
        waiting for its ``Init``."""

    def stop(self, workers: list[WorkerHandle], *, graceful: bool) -> None:
        """End every worker and set its ``returncode``. Graceful: ask (``Stop``), then force
        after a grace period; not graceful: force at once (after a failure)."""

    def where(self, worker: WorkerHandle) -> str:
        """Where a worker runs, for messages ("" when its role says it all)."""

    def state_fields(self, workers: list[WorkerHandle]) -> dict[str, Any]:
        """What ``run.json`` records about the processes beyond their pids."""

    def keep_spare(self, log_dir: Path, generation: int) -> None:
        """Have a worker started and waiting to replace the next failed one (if it can)."""

    def close(self) -> None:
        """The run is over: stop whatever the launcher keeps of its own (a spare)."""


def send_stop(worker: WorkerHandle, timeout_s: float) -> None:
    """Ask a worker to stop; a worker that cannot be reached any more is stopped anyway."""
    with contextlib.suppress(ChannelClosed, ChannelTimeout, ProtocolError, OSError):
        worker.control.send_frame(Kind.CONTROL, 0, 0, messages.encode(messages.Stop()),
                                  timeout_s=timeout_s)


class PipeLauncher:
    """Workers as child processes, each with only its control pipes and courier socket;
    their links (pairs of pipes) and snapshot regions are handed over on the courier, so the
    same running process can be given new links when a neighbour is replaced.

    One *spare* is kept started (interpreter and imports done, waiting for an ``Init``), so that
    replacing a failed worker costs its set-up, not a Python start-up."""

    restartable = True
    replaceable = True
    cont_checkpoints = False

    def __init__(self, blas_threads: int) -> None:
        self.blas_threads = blas_threads
        self._spare: tuple[subprocess.Popen, PipeChannel, Courier, Path] | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # BLAS threads are fixed before numpy loads in the child, for reproducible kernels.
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(self.blas_threads)
        env["PIPETRAIN_BLAS_THREADS"] = str(self.blas_threads)
        return env

    def start(self, grid: Grid, bounds: list[tuple[int, ...]], log_path: LogPath,
              generation: int) -> list[WorkerHandle]:
        workers: list[WorkerHandle] = []
        try:
            for at in grid.positions():
                workers.append(self.spawn(at, bounds[at.stage], log_path(at), generation,
                                          grid.replicas > 1))
            self.link(grid, workers)
        except BaseException:
            self.stop(workers, graceful=False)
            raise
        return workers

    def link(self, grid: Grid, workers: list[WorkerHandle],
             extra: dict[Position, dict[str, int]] | None = None) -> None:
        """New pipes for every link of the grid, each worker's ends sent on its courier (with
        the fds of ``extra`` for it, which stay the caller's); sets every worker's
        ``endpoints`` and ``fds`` (to announce in its next command)."""
        by_position = {worker.position: worker for worker in workers}
        batches: dict[Position, dict[str, int]] = {at: {} for at in by_position}
        ours: list[int] = []
        try:
            for link in grid.edges():
                down_r, down_w = open_pipe()  # low -> high
                up_r, up_w = open_pipe()      # high -> low
                ours += [down_r, down_w, up_r, up_w]
                for at, name, read_fd, write_fd in ((link.low, link.low_name, up_r, down_w),
                                                    (link.high, link.high_name, down_r, up_w)):
                    batches[at][f"{name}.read"] = read_fd
                    batches[at][f"{name}.write"] = write_fd
            for at, worker in by_position.items():
                worker.endpoints = {name: {"read": f"{name}.read", "write": f"{name}.write"}
                                    for name in grid.links(at)}
                self.send_fds(worker, {**batches[at], **(extra or {}).get(at, {})})
        finally:
            for fd in ours:  # the workers hold theirs now; ours would hide end-of-files
                os.close(fd)

    def send_fds(self, worker: WorkerHandle, fds: dict[str, int]) -> None:
        """Send ``fds`` on the worker's courier (announced by its next command's ``fds``)."""
        worker.fds = list(fds)
        if fds:
            try:
                worker.courier.send(fds)
            except OSError as exc:  # the worker is gone: its next command fails to say so
                worker.fds = []
                raise ChannelClosed(f"courier of {worker.role}: {exc}") from None

    def receive_fds(self, worker: WorkerHandle, names: list[str]) -> dict[str, int]:
        return worker.courier.receive(names)

    def spawn(self, at: Position, layers: tuple[int, ...], log_path: Path, generation: int,
              replicated: bool) -> WorkerHandle:
        """A worker at ``at``: the spare if one is waiting, a new process otherwise."""
        spare, self._spare = self._spare, None
        if spare is not None and spare[0].poll() is None:
            process, control, courier, _ = spare
        else:
            if spare is not None:
                self._discard(spare)
            place = hooks.Place(hooks.STAGE, at.stage, at.replica, generation)
            process, control, courier = self._start_process(place, log_path)
        control.name = f"control of stage {at.stage}"
        return WorkerHandle(at, layers, process, control, log_path, {}, replicated=replicated,
                            courier=courier)

    def keep_spare(self, log_dir: Path, generation: int) -> None:
        """Start a spare worker (if none is waiting) to replace the next failed one. Until it
        is placed its output goes nowhere (it has said nothing yet); its ``Init`` sends it to
        the log of the position it takes."""
        if self._spare is not None and self._spare[0].poll() is None:
            return
        if self._spare is not None:
            self._discard(self._spare)
            self._spare = None
        place = hooks.Place(hooks.STAGE, None, None, generation)
        self._spare = (*self._start_process(place, None), log_dir)

    def _start_process(self, place: hooks.Place,
                       log_path: Path | None) -> tuple[subprocess.Popen, PipeChannel, Courier]:
        to_child_r, to_child_w = open_pipe()
        from_child_r, from_child_w = open_pipe()
        courier, courier_fd = courier_pair(f"courier of {place}")
        # -P: nothing in the working directory can shadow the installed package.
        argv = hooks.current().worker_command(place, [
            sys.executable, "-P", "-m", WORKER_MODULE, str(to_child_r), str(from_child_w),
            str(courier_fd)])
        try:
            with open_log(log_path) if log_path else open(os.devnull, "wb") as log:
                process = subprocess.Popen(
                    argv, pass_fds=(to_child_r, from_child_w, courier_fd),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self._env())
        except BaseException:
            os.close(from_child_r)
            os.close(to_child_w)
            courier.close()
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
            os.close(courier_fd)
        return process, PipeChannel(from_child_r, to_child_w, name="control"), courier

    def _discard(self, spare: tuple[subprocess.Popen, PipeChannel, Courier, Path]) -> None:
        process, control, courier, _ = spare
        if process.poll() is None:
            process.kill()
        process.wait()
        control.close()
        courier.close()

    def stop(self, workers: list[WorkerHandle], *, graceful: bool) -> None:
        for worker in workers:
            if worker.process.poll() is None:
                if graceful:
                    send_stop(worker, STOP_GRACE_S)
                else:
                    worker.process.kill()
        deadline = time.monotonic() + (STOP_GRACE_S if graceful else 0)
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.returncode = worker.process.returncode
            worker.control.close()
            if worker.courier is not None:
                worker.courier.close()

    def close(self) -> None:
        """Stop the spare (the run is over)."""
        if self._spare is not None:
            self._discard(self._spare)
            self._spare = None

    def where(self, worker: WorkerHandle) -> str:
        return ""

    def state_fields(self, workers: list[WorkerHandle]) -> dict[str, Any]:
        return {}


def open_log(path: Path):
    """A worker's log, opened for appending; a full or read-only disk is a StorageError."""
    try:
        return open(path, "ab")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise StorageError.from_os_error(exc, path) from None
