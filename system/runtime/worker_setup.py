"""What a worker builds from its ``Init``: its stage, loader, links, snapshots and helper threads.

:func:`build_parts` builds them in dependency order and, if any step fails, takes down what it
had built (threads joined, channels closed) before the error leaves, so a worker that cannot
start leaves nothing running. :class:`Parts` owns them afterwards and closes them in reverse.

In-place recovery (``pipetrain.runtime.recovery``) changes some of them under a running worker:
:meth:`Parts.halt` stops the links and the threads that use them, :meth:`Parts.restore` rolls
the state back (from the worker's own snapshots) and builds new links, a new loader and a new
all-reduce thread; the stage, its optimizer and the snapshot region stay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipetrain import hooks, tracing
from pipetrain.config import TrainConfig, build_config
from pipetrain.data.loader import Loader, MicroBatch, auto_threads
from pipetrain.data.workload import Workload, prepare
from pipetrain.nn.digest import array_digest, combine
from pipetrain.pipeline.partition import inbound_bytes_per_step, stage_pieces
from pipetrain.pipeline.schedule import Action
from pipetrain.pipeline.stage import Stage
from pipetrain.run import checkpoint
from pipetrain.run.storage import StorageError
from pipetrain.runtime import messages
from pipetrain.runtime.background import (
    DigestReport,
    DigestThread,
    InlineDigester,
    ReduceThread,
    make_digester,
)
from pipetrain.runtime.courier import close_all
from pipetrain.runtime.inbox import Inbox, InboxClosed, Receivers, reads_directly
from pipetrain.runtime.snapshot import (
    InlineSnapshots,
    Region,
    SnapshotError,
    SnapshotThread,
    make_snapshots,
    region_name,
)
from pipetrain.runtime.topology import NEXT_REPLICA, PREV_REPLICA, Grid, Position
from pipetrain.wire import allreduce
from pipetrain.wire.channel import Channel
from pipetrain.wire.frames import HEADER_SIZE, Kind, ProtocolError


def receive_frame(inbox: Inbox, source: str, kind: Kind, step: int, index: int, *,
                  what: object, interrupted: Callable[[], bool], name: str) -> np.ndarray:
    """The next frame from ``source``, which must be the expected one (links keep order)."""
    frame = inbox.get(source, interrupted=interrupted)
    if (frame.kind, frame.step, frame.microbatch) != (kind, step, index):
        raise ProtocolError(
            f"{name} at {what}: expected {kind.name} step {step} index {index} from "
            f"{source}, got kind {frame.kind} step {frame.step} index {frame.microbatch}")
    return frame.array


def state_arrays(stage: Stage) -> dict[str, np.ndarray]:
    """Every array of a stage's state: its parameters, then its optimizer's state."""
    arrays = {f"param.{name}": stage.params[name] for name in stage.names}
    arrays.update({f"optim.{key}": value for key, value in stage.optimizer.state_dict().items()})
    return arrays


def load_arrays(stage: Stage, arrays: dict[str, np.ndarray]) -> None:
    params = {key[6:]: value for key, value in arrays.items() if key.startswith("param.")}
    optim = {key[6:]: value for key, value in arrays.items() if key.startswith("optim.")}
    stage.load_state(params, optim)


@dataclass
class Parts:
    place: hooks.Place
    config: TrainConfig
    workload: Workload | None
    stage: Stage
    actions: list[Action]
    inbox: Inbox
    transport: Any
    alive: Callable[[], bool]
    op_timeout_s: float
    digester: DigestThread | InlineDigester
    loader: Loader | None = None
    reducer: ReduceThread | None = None
    channels: dict[str, Channel] = field(default_factory=dict)
    receivers: Receivers | None = None
    region: Region | None = None
    snapshots: SnapshotThread | InlineSnapshots | None = None
    held: dict[str, int] = field(default_factory=dict)  # "S.R" -> fd of a region we hold
    applied_step: int = 0  # the last step whose update the stage holds
    _chain: Any = None
    _undo: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def digest_share(self) -> list[np.ndarray | None]:
        """The gradients this worker hashes: after the all-reduce every replica holds the same
        ones, so replica r hashes the parameters at positions r, r + R, r + 2R, ... and the
        coordinator takes each digest from the replica that made it."""
        grads = self.stage.grads()
        replica, replicas = self.place.replica, self.config.replicas
        return [grads[name] if position % replicas == replica else None
                for position, name in enumerate(self.stage.names)]

    def next_microbatch(self, step: int, microbatch: int) -> MicroBatch:
        return self.loader.get(step, microbatch)

    def write_checkpoint(self, command: messages.WriteCheckpoint) -> messages.Checkpointed:
        """Replica 0 writes the segment; every replica reports a digest of its parameters so
        the coordinator can check that the replicas have not drifted apart."""
        stage = self.stage
        span_ns = tracing.current().start()
        params_digest = combine(array_digest(stage.params[name]) for name in stage.names)
        file = sha256 = None
        if self.place.replica == 0:
            try:
                file, sha256 = checkpoint.write_segment(Path(command.directory), stage.index,
                                                        stage.params,
                                                        stage.optimizer.state_dict())
            except StorageError as exc:  # a full disk is the run's problem: say so, go on
                return messages.Checkpointed(params_digest=params_digest, error=str(exc))
        hooks.current().checkpoint_phase(self.place, command.step, "segment_written")
        tracing.current().end("checkpoint", tracing.CHECKPOINT, span_ns, {"step": command.step})
        return messages.Checkpointed(params_digest=params_digest, file=file, sha256=sha256)

    # -- pieces that recovery rebuilds -------------------------------------------------------

    def start_loader(self, first_step: int) -> None:
        if self.workload is None:
            return
        config, stage = self.config, self.stage
        threads = config.loader_threads
        if threads < 0:
            threads = auto_threads(self.workload, replicas=config.replicas,
                                   microbatches=config.microbatches, augment=config.augment)
        self.loader = Loader(self.workload, replica=self.place.replica, replicas=config.replicas,
                             microbatches=config.microbatches, need_x=stage.is_first,
                             need_y=stage.is_last, threads=threads,
                             prefetch=config.prefetch, augment=config.augmentation,
                             seed=config.seed, dtype=np.dtype(config.dtype), place=self.place)
        self.loader.hold_slots()  # given back after each StepDone (release_loader_slots)
        self.loader.start(first_step, self.workload.total_steps)

    def open_links(self, links: dict[str, dict[str, Any]], grid: Grid) -> None:
        """Open the links of ``links`` (the transport's endpoints): the main thread reads a
        neighbour's link itself when the pipe holds a whole step of its frames, else a
        receiver thread reads it ahead; the replicas' links always have receivers."""
        peers = grid.links(Position(self.place.stage, self.place.replica))
        self.receivers = Receivers(self.inbox, op_timeout_s=self.op_timeout_s)
        in_flight = inbound_bytes_per_step(self.config.model_spec(), self.stage.pieces,
                                           HEADER_SIZE)
        for name, endpoint in links.items():
            if name not in peers:
                raise ProtocolError(f"{self.place}: told of a link {name!r} it has no peer for")
            peer = peers[name]
            channel = self.transport.open_link(name, endpoint, self.op_timeout_s)
            self.channels[name] = hooks.current().wrap_channel(
                self.place, hooks.Place(hooks.STAGE, peer.stage, peer.replica,
                                        self.place.generation), channel)
            channel = self.channels[name]
            if peer.replica == self.place.replica and reads_directly(channel, in_flight):
                self.inbox.read_directly(name, channel, op_timeout_s=self.op_timeout_s)
            else:
                self.receivers.start(name, channel)
        if self.config.replicas > 1:
            place, chain = self.place, self._chain
            self.reducer = ReduceThread(
                place.replica, self.config.replicas, lambda step: chain.links(Kind.REDUCE, step),
                before_reduce=lambda step, names: hooks.current().before_reduce(place, step,
                                                                                names))

    def close_links(self) -> None:
        """Stop everything that uses the links, then the links: helpers waiting for a frame
        give up (their sources fail), the all-reduce thread and receivers are joined."""
        for source in self.channels:
            self.inbox.fail(InboxClosed(f"{self.place}: link {source} closed"), source)
        if self.reducer is not None:
            self.reducer.close()
            self.reducer = None
        if self.receivers is not None:
            self.receivers.stop()
            self.receivers = None
        for channel in self.channels.values():
            channel.close()
        self.inbox.discard(list(self.channels))
        self.channels.clear()

    def release_loader_slots(self) -> None:
        """After the step's reply: the loader threads go on, or the main thread loads ahead."""
        if self.loader is not None:
            self.loader.release_taken()
            self.loader.fill()

    def stop_loader(self) -> None:
        if self.loader is not None:
            self.loader.stop()
            self.loader = None

    def snapshot(self, step: int) -> None:
        """Copy the state of ``step`` into the region, in the background."""
        self.applied_step = step
        if self.snapshots is not None:
            self.snapshots.submit(step)

    def wait_snapshot(self) -> None:
        """Until the last copy is done (before the next update changes what it reads)."""
        if self.snapshots is not None:
            self.snapshots.wait(interrupted=self.alive)

    def sync_state(self, root: int) -> None:
        """Every replica of this stage takes replica ``root``'s state (after a start, a
        restart, a resume or a replacement: they agree by construction, this makes sure)."""
        if self.config.replicas == 1 or root < 0:
            return
        links = self._chain.links(Kind.PARAMETER, 0)
        arrays = state_arrays(self.stage)  # the live arrays, but step_count is a copy
        allreduce.broadcast_from(list(arrays.values()), self.place.replica,
                                 self.config.replicas, root, send_next=links["send_next"],
                                 send_prev=links["send_prev"], recv_prev=links["recv_prev"],
                                 recv_next=links["recv_next"])
        self.stage.optimizer.step_count = int(arrays["optim.step_count"])

    def halt(self, drain_digests: Callable[[], None]) -> dict[str, int]:
        """Settle after another worker's failure: links closed (helpers waiting on them give
        up), the loader stopped, every pending digest sent and snapshot written. Returns the
        snapshot regions to hand to the coordinator (``region``, ``held:S.R``)."""
        self.close_links()
        self.stop_loader()
        drain_digests()
        self.wait_snapshot()
        fds = {"region": self.region.fd} if self.region is not None else {}
        fds.update({f"held:{key}": fd for key, fd in self.held.items()})
        return fds

    def restore(self, step: int, generation: int, links: dict[str, dict[str, Any]],
                state_root: int) -> None:
        """Continue from the end of ``step``: the state of that step (rolled back from the
        own snapshots if this worker got further), new links, a new loader."""
        self.place = dataclasses.replace(self.place, generation=generation)
        self.stage.discard_step()
        if step != self.applied_step:
            if self.region is None:
                raise SnapshotError(f"{self.place}: no snapshot to roll back to step {step}")
            load_arrays(self.stage, self.region.read(step))
        if self.region is not None:
            self.region.forget_after(step)
        self.applied_step = step
        self.open_links(links, Grid(self.config.stages, self.config.replicas,
                                    ring=self.config.ring))
        hooks.current().recovery_phase(self.place, step, "state_transfer")
        self.sync_state(state_root)
        hooks.current().state_restored(self.place, self.stage)
        self.start_loader(step + 1)

    def hold(self, fds: dict[str, int]) -> None:
        """Keep the regions of ``fds`` (named ``held:S.R``) open; replaces older ones."""
        for name, fd in fds.items():
            if name.startswith("held:"):
                key = name[5:]
                if key in self.held:
                    close_all([self.held[key]])
                self.held[key] = fd

    def close(self) -> None:
        """Stop every thread and close every link, in the reverse order of building."""
        self._undo.close()


class _Chain:
    """Send/receive callables for the chain among this stage's replicas: frames go straight to
    the replica channels (during a step only the all-reduce thread uses them, at start-up only
    the main thread); replies come through the inbox like every other frame."""

    def __init__(self, channels: dict[str, Channel], inbox: Inbox, op_timeout_s: float,
                 interrupted: Callable[[], bool], name: str) -> None:
        self.channels, self.inbox, self.op_timeout_s = channels, inbox, op_timeout_s
        self.interrupted, self.name = interrupted, name

    def links(self, kind: Kind, step: int) -> dict[str, Any]:
        def sender(direction: str):
            channel = self.channels.get(direction)
            if channel is None:
                return None
            return lambda index, data: channel.send_frame(kind, step, index, data,
                                                          timeout_s=self.op_timeout_s)

        def receiver(direction: str):
            if direction not in self.channels:
                return None
            return lambda index: receive_frame(self.inbox, direction, kind, step, index,
                                               what=kind.name, interrupted=self.interrupted,
                                               name=self.name)

        return {"send_next": sender(NEXT_REPLICA), "send_prev": sender(PREV_REPLICA),
                "recv_prev": receiver(PREV_REPLICA), "recv_next": receiver(NEXT_REPLICA)}


def build_parts(init: messages.Init, transport: Any, inbox: Inbox, report_digests: DigestReport,
                alive: Callable[[], bool]) -> Parts:
    """Everything the worker of ``init`` needs, started; ``alive`` is its liveness callback
    (called whenever the main thread waits), ``transport`` opens its links."""
    config = build_config(init.config, source="init")
    place = hooks.Place(hooks.STAGE, init.stage, init.replica, init.generation)
    grid = Grid(init.num_stages, config.replicas, ring=config.ring)
    pieces = stage_pieces(init.layers, init.stage, init.num_stages)
    is_first, is_last = init.stage == 0, init.stage == init.num_stages - 1
    fds = transport.take(init.fds)
    if init.trace_dir:  # --trace: this process's spans, written when its parts close
        tracing.install(tracing.Recorder(
            init.trace_dir, f"stage-{init.stage}-replica-{init.replica}-{os.getpid()}",
            f"stage {init.stage} replica {init.replica}",
            sort_index=1 + init.stage * 100 + init.replica))
    with contextlib.ExitStack() as undo:
        undo.callback(_write_trace)  # first in, so last out: after every thread has stopped
        undo.callback(lambda: close_all(fds))  # what was not taken over by the end
        workload = prepare(config.data_spec()) if is_first or is_last else None
        stage = Stage(model=config.model_spec(), index=init.stage, num_stages=init.num_stages,
                      pieces=pieces, num_pieces=init.num_stages * config.pieces_per_stage,
                      source=(lambda step, mb: parts.next_microbatch(step, mb))
                      if workload else None,
                      on_grads_final=lambda step, grads: parts.reducer.submit(step, grads),
                      replica=init.replica)
        digester = make_digester(report_digests,
                                 sum(array.nbytes for array in stage.params.values()))
        undo.callback(digester.close)
        actions = config.build_schedule()
        parts = Parts(place=place, config=config, workload=workload, stage=stage,
                      actions=actions[init.stage], inbox=inbox, transport=transport,
                      alive=alive, op_timeout_s=init.op_timeout_s, digester=digester,
                      applied_step=init.start_step)
        parts._chain = _Chain(parts.channels, inbox, init.op_timeout_s, alive, str(place))
        if config.replicas == 1:
            stage.on_grads_final = None
        undo.callback(parts.stop_loader)
        undo.callback(parts.close_links)
        undo.callback(lambda: close_all(parts.held))
        parts.hold({name: fds.pop(name) for name in list(fds) if name.startswith("held:")})
        if init.state_source == "checkpoint":
            manifest = checkpoint.verify(Path(init.resume_from))
            stage.load_state(*checkpoint.load_state(manifest, stage.names))
        if init.snapshots:
            arrays = state_arrays(stage)
            if init.state_source == "snapshot":
                parts.region = Region.attach(fds.pop("region"), arrays)
                load_arrays(stage, parts.region.read(init.start_step))
                parts.region.forget_after(init.start_step)
            else:
                parts.region = _new_region(place, arrays)
            if parts.region is not None:
                undo.callback(parts.region.close)
                parts.snapshots = make_snapshots(
                    parts.region, lambda: state_arrays(stage),
                    lambda step: hooks.current().snapshot_copy(parts.place, step),
                    sum(array.nbytes for array in arrays.values()))
                undo.callback(parts.snapshots.close)
        parts.open_links(init.links, grid)
        if init.state_source in ("peer", "snapshot"):  # a replacement, in place
            hooks.current().recovery_phase(place, init.start_step, "state_transfer")
        parts.sync_state(init.state_root)
        if init.state_source != "init":
            hooks.current().state_restored(place, stage)
        parts.start_loader(init.start_step + 1)
        parts.snapshot(init.start_step)
        parts._undo = undo.pop_all()
    return parts


def _write_trace() -> None:
    with contextlib.suppress(OSError):  # a trace is worth keeping, never worth failing for
        tracing.current().write()


def _new_region(place: hooks.Place, arrays: dict[str, np.ndarray]) -> Region | None:
    """A snapshot region; without one (memory or a file-size limit refused it) the worker
    runs on, and its failure falls back to the newest disk checkpoint."""
    try:
        return Region.create(region_name(place), arrays)
    except OSError as exc:
        import sys

        sys.stderr.write(f"{place}: no in-memory snapshot ({exc}); a failure of this worker "
                         "restarts the group from the newest checkpoint\n")
        return None


