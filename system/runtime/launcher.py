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
from pipetrain.runtime import messages
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
    layers: tuple[int, int]
    process: Process
    control: Channel
    log_path: Path
    endpoints: dict[str, dict[str, int]]  # its links, in the transport's terms (for Init)
    replicated: bool = False
    returncode: int | None = None
    last_error: str | None = None
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def index(self) -> int:
        return self.position.stage

    @property
    def replica(self) -> int:
        return self.position.replica

    @property
    def role(self) -> str:
        replica = f" replica {self.replica}" if self.replicated else ""
        return f"stage {self.index}{replica} (layers {self.layers[0]}-{self.layers[1] - 1})"


# (position) -> the log file of that worker
LogPath = Callable[[Position], Path]


class Launcher(Protocol):
    restartable: bool       # can a failed group be replaced in place (--max-restarts)?
    cont_checkpoints: bool  # does SIGCONT also ask for a checkpoint (see Requests)?

    def start(self, grid: Grid, bounds: list[tuple[int, int]], log_path: LogPath,
              generation: int) -> list[WorkerHandle]:
        """Every worker of ``grid``, in ``grid.positions()`` order, running and waiting for
        its ``Init``."""

    def stop(self, workers: list[WorkerHandle], *, graceful: bool) -> None:
        """End every worker and set its ``returncode``. Graceful: ask (``Stop``), then force
        after a grace period; not graceful: force at once (after a failure)."""

    def where(self, worker: WorkerHandle) -> str:
        """Where a worker runs, for messages ("" when its role says it all)."""

    def state_fields(self, workers: list[WorkerHandle]) -> dict[str, Any]:
        """What ``run.json`` records about the processes beyond their pids."""


def send_stop(worker: WorkerHandle, timeout_s: float) -> None:
    """Ask a worker to stop; a worker that cannot be reached any more is stopped anyway."""
    with contextlib.suppress(ChannelClosed, ChannelTimeout, ProtocolError, OSError):
        worker.control.send_frame(Kind.CONTROL, 0, 0, messages.encode(messages.Stop()),
                                  timeout_s=timeout_s)


class PipeLauncher:
    """Workers as child processes with only their own fds, linked by pipes."""

    restartable = True
    cont_checkpoints = False

    def __init__(self, blas_threads: int) -> None:
        self.blas_threads = blas_threads

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # BLAS threads are fixed before numpy loads in the child, for reproducible kernels.
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(self.blas_threads)
        env["PIPETRAIN_BLAS_THREADS"] = str(self.blas_threads)
        return env

    def start(self, grid: Grid, bounds: list[tuple[int, int]], log_path: LogPath,
              generation: int) -> list[WorkerHandle]:
        # Each link is two one-way pipes: (lower -> higher, higher -> lower).
        pipes = {edge: (open_pipe(), open_pipe()) for edge in grid.edges()}
        env = self._env()
        workers: list[WorkerHandle] = []
        try:
            for at in grid.positions():
                endpoints: dict[str, dict[str, int]] = {}
                for name, peer in grid.links(at).items():
                    if at < peer:
                        (_, out_w), (in_r, _) = pipes[at, peer]
                    else:
                        (in_r, _), (_, out_w) = pipes[peer, at]
                    endpoints[name] = {"read_fd": in_r, "write_fd": out_w}
                workers.append(self._spawn(at, bounds[at.stage], endpoints, env, log_path(at),
                                           generation, grid.replicas > 1))
        except BaseException:
            self.stop(workers, graceful=False)
            raise
        finally:
            for pair in pipes.values():
                for read_fd, write_fd in pair:  # the children hold theirs; ours would hide EOFs
                    os.close(read_fd)
                    os.close(write_fd)
        return workers

    def _spawn(self, at: Position, layers: tuple[int, int], endpoints: dict[str, dict[str, int]],
               env: dict[str, str], log_path: Path, generation: int,
               replicated: bool) -> WorkerHandle:
        to_child_r, to_child_w = open_pipe()
        from_child_r, from_child_w = open_pipe()
        place = hooks.Place(hooks.STAGE, at.stage, at.replica, generation)
        # -P: nothing in the working directory can shadow the installed package.
        argv = hooks.current().worker_command(place, [
            sys.executable, "-P", "-m", WORKER_MODULE, str(to_child_r), str(from_child_w)])
        link_fds = [fd for endpoint in endpoints.values() for fd in endpoint.values()]
        try:
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    argv, pass_fds=(to_child_r, from_child_w, *link_fds),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        except BaseException:
            os.close(from_child_r)
            os.close(to_child_w)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        control = PipeChannel(from_child_r, to_child_w, name=f"control of stage {at.stage}")
        return WorkerHandle(at, layers, process, control, log_path, endpoints,
                            replicated=replicated)

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

    def where(self, worker: WorkerHandle) -> str:
        return ""

    def state_fields(self, workers: list[WorkerHandle]) -> dict[str, Any]:
        return {}
