"""Workers that are MPI ranks: the launcher rank 0 uses, and the transport the ranks use.

Under ``mpirun -n N pipetrain train --transport mpi`` every process already exists when the run
starts: rank 0 is the coordinator, stage ``s`` of replica ``r`` is rank ``1 + r * S + s``
(:meth:`pipetrain.runtime.topology.Grid.rank`). So :class:`MpiLauncher` starts nothing: it hands
the coordinator a :class:`~pipetrain.runtime.launcher.WorkerHandle` per rank over the control
channels :class:`MpiWorld` opened, and stops ranks by telling them to (a rank cannot be killed
alone; one that does not answer makes rank 0 abort the job). On the ranks, :class:`MpiTransport`
opens a worker's links as MPI channels (``pipetrain.wire.mpi_channel``). The start-up and the
signal handling of the whole job are in ``pipetrain.training.mpi_run``.

Workers always exit 0 once told to stop, sending their own status to rank 0 in a last
:class:`~pipetrain.runtime.messages.Exited` message: a non-zero exit of any rank would make
mpirun kill rank 0 before it has written its record.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np

from pipetrain.runtime import messages
from pipetrain.runtime.inbox import InboxFailure
from pipetrain.runtime.launcher import LogPath, WorkerHandle
from pipetrain.runtime.topology import PIPELINE_LINKS, Grid
from pipetrain.runtime.transport import redirect_output
from pipetrain.runtime.worker import CONTROL, Worker
from pipetrain.status import ExitCode
from pipetrain.threads import leftover_threads
from pipetrain.wire.channel import Channel, ChannelClosed, ChannelTimeout
from pipetrain.wire.frames import Frame, Kind, ProtocolError
from pipetrain.wire.mpi_channel import MpiChannel
from pipetrain.wire.mpi_hub import MpiHub

# One tag per kind of link. Between two ranks there is at most one link of each kind (a pipeline
# neighbour is never a replica neighbour), so (peer, tag) names a channel.
# The ring's link round from the last stage to the first has a tag of its own: with two stages
# it joins the same two ranks as the other pipeline link (interleaved 1F1B).
TAG_CONTROL, TAG_PIPELINE, TAG_CHAIN, TAG_RING = 1, 2, 3, 4
HOST_BYTES = 256
FAILED_STOP_GRACE_S = 2.0  # after a failure: how long a worker may take to acknowledge "stop"
STOP_GRACE_S = 3.0
DRAIN_TIMEOUT_S = 10.0  # every rank ending its communication together, at the very end
HUB_THREAD = "mpi-progress"


class MpiRank:
    """A worker rank seen from rank 0: its pid and host, and the exit status it reported in
    its last message (``poll`` and ``wait`` as for a child process; no ``kill``)."""

    def __init__(self, rank: int, pid: int, host: str) -> None:
        self.rank, self.pid, self.host = rank, pid, host
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"MPI rank {self.rank}", timeout or 0)
        return self.returncode


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
                self.controls[rank].send_frame(Kind.CONTROL, 0, 0,
                                               messages.encode(messages.Stop()),
                                               timeout_s=grace_s)
        deadline = time.monotonic() + grace_s
        silent = []
        for rank in ranks:
            process = self.ranks[rank]
            while process.returncode is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    frame = self.controls[rank].recv_frame(timeout_s=remaining)
                except (ChannelClosed, ChannelTimeout, ProtocolError):
                    break
                message = _decoded(frame)  # anything else: e.g. an interrupted gather's frames
                if isinstance(message, messages.Exited):
                    process.returncode = message.status
            if process.returncode is None:
                silent.append(rank)
        return silent

    def release(self, grace_s: float) -> list[int]:
        """Stop every worker rank not stopped yet (those never started included); returns the
        ranks that never acknowledged any stop."""
        others = list(range(1, self.size))
        self.stop_ranks([r for r in others if r not in self.stop_sent], grace_s)
        return [r for r in others if self.ranks[r].returncode is None]

    def close(self) -> None:
        """Every rank, whatever happened before: close the channels, stop the hub, and end the
        communication together (:func:`drain`)."""
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


def drain(comm: Any, MPI: Any, pending: list[Any], timeout_s: float) -> int:  # noqa: N803
    """The collective end of every rank's communication, before MPI_Finalize.

    A send whose receiver stopped receiving never completes (a failed stage closes its
    channels while its neighbour's activations are on their way). So every rank completes its
    own sends while receiving and discarding whatever still arrives (every channel is closed by
    now, so it is stale), then enters a non-blocking barrier and keeps discarding until the
    barrier completes: a rank enters it only once its sends are done, so when it completes
    nobody has a send left, and nobody left early. Returns how many of this rank's sends did
    not complete within ``timeout_s`` (a peer that never got here: the job is being aborted).
    """
    deadline = time.monotonic() + timeout_s
    status = MPI.Status()
    barrier = None
    while time.monotonic() < deadline:
        pending = [request for request in pending if not request.Test()]
        if not pending and barrier is None:
            barrier = comm.Ibarrier()
        message = comm.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)
        if message is not None:
            message.Recv([bytearray(status.Get_count(MPI.BYTE)), MPI.BYTE])
            continue
        if barrier is not None and barrier.Test():
            return 0
        time.sleep(0.0005)
    return len(pending)


def _decoded(frame: Frame) -> messages.Message | None:
    if frame.kind != Kind.CONTROL:
        return None
    try:
        return messages.decode(frame.array)
    except ProtocolError:
        return None


# -- rank 0 ----------------------------------------------------------------------------------


class MpiLauncher:
    """The launcher of rank 0: the workers are the ranks ``mpirun`` started."""

    restartable = False  # recovery is the launcher's loop: the same mpirun with --resume
    replaceable = False  # a rank cannot be replaced alone, so no in-memory snapshots either
    cont_checkpoints = True  # SIGCONT opens mpirun's kill sequence: checkpoint while there is time

    def __init__(self, world: MpiWorld, op_timeout_s: float) -> None:
        self.world = world
        self.op_timeout_s = op_timeout_s

    def start(self, grid: Grid, bounds: list[tuple[int, ...]], log_path: LogPath,
              generation: int) -> list[WorkerHandle]:
        if generation:
            raise RuntimeError("MPI ranks cannot be restarted in place")
        workers = []
        for at in grid.positions():
            rank = grid.rank(at)
            control = self.world.controls[rank]
            endpoints = {name: {"rank": grid.rank(peer), "wraps": grid.wraps(at, name)}
                         for name, peer in grid.links(at).items()}
            worker = WorkerHandle(at, tuple(bounds[at.stage]), self.world.ranks[rank], control,
                                  log_path(at), endpoints, replicated=grid.replicas > 1)
            control.name = f"control of {worker.role}"
            control.stall_timeout_s = self.op_timeout_s
            workers.append(worker)
        return workers

    def stop(self, workers: list[WorkerHandle], *, graceful: bool) -> None:
        """Graceful or not, a rank can only be told: one that does not answer makes rank 0
        abort the job at the end."""
        self.world.stop_ranks([worker.process.rank for worker in workers],
                              STOP_GRACE_S if graceful else FAILED_STOP_GRACE_S)
        for worker in workers:
            worker.returncode = worker.process.returncode

    def keep_spare(self, log_dir, generation: int) -> None:
        """No spares: a rank is never replaced."""

    def close(self) -> None:
        """Nothing of its own to stop (the ranks are mpirun's)."""

    def where(self, worker: WorkerHandle) -> str:
        return f" [MPI rank {worker.process.rank} on {worker.process.host}]"

    def state_fields(self, workers: list[WorkerHandle]) -> dict[str, Any]:
        roles = {worker.process.rank: worker.role for worker in workers}
        return {"transport": "mpi", "mpi_ranks": [
            {"rank": rank.rank, "pid": rank.pid, "host": rank.host,
             "role": "coordinator" if rank.rank == 0 else roles.get(rank.rank, "unused")}
            for rank in self.world.ranks.values()]}


# -- ranks 1..N-1 -----------------------------------------------------------------------------


class MpiTransport:
    """A worker rank's links are MPI channels; its output goes to its log once it knows it."""

    keeps_control_open = True  # it still waits for Stop and acknowledges on it

    def __init__(self, world: MpiWorld) -> None:
        self.world = world

    def prepare(self, init: messages.Init) -> None:
        if init.log_path:  # from here on this rank's output goes to its log, as a pipe worker's
            redirect_output(init.log_path)

    def take(self, names: list[str]) -> dict[str, int]:
        """MPI ranks are handed no fds (no in-place recovery, no snapshot regions)."""
        return {}

    def send(self, fds: dict[str, int]) -> None:
        """Nothing to hand over (see :meth:`take`)."""

    def open_link(self, name: str, endpoint: dict[str, int], op_timeout_s: float) -> Channel:
        tag = TAG_PIPELINE if name in PIPELINE_LINKS else TAG_CHAIN
        if endpoint.get("wraps"):
            tag = TAG_RING
        return MpiChannel(self.world.hub, endpoint["rank"], tag, name=name,
                          stall_timeout_s=op_timeout_s)


def serve_rank(world: MpiWorld) -> None:
    """A worker rank's life: serve until told to stop, then report the status and leave.

    After ``serve`` returns the rank stays until the coordinator says ``Stop`` (exiting earlier
    would make mpirun kill the job while rank 0 is still recording a failure).
    """
    control = MpiChannel(world.hub, 0, TAG_CONTROL, name="control")
    worker = Worker(control, MpiTransport(world))
    status = worker.serve()
    if not worker.stopped:
        _await_stop(worker)
    leftover = leftover_threads(allowed=(HUB_THREAD,))
    if leftover:
        sys.stderr.write(f"{worker.name}: threads still alive at exit: {leftover}\n")
        status = ExitCode.THREADS_LEFT
    with worker.control_lock:
        control.send_frame(Kind.CONTROL, 0, 0, messages.encode(
            messages.Exited(status=int(status), pid=os.getpid())))
    control.close()


def _await_stop(worker: Worker) -> None:
    """Wait for ``Stop``: first among the commands the receiver thread had read ahead, then on
    the channel itself. No timeout: rank 0 decides, or mpirun ends the job."""
    while worker.inbox.depth(CONTROL):
        with contextlib.suppress(InboxFailure):
            if isinstance(_decoded(worker.inbox.get(CONTROL)), messages.Stop):
                return
    while not isinstance(_decoded(worker.control.recv_frame()), messages.Stop):
        pass
