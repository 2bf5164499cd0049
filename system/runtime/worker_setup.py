"""What a worker builds from its ``Init``: its stage, loader, links and helper threads.

:func:`build_parts` builds them in dependency order and, if any step fails, takes down what it
had built (threads joined, channels closed) before the error leaves, so a worker that cannot
start leaves nothing running. :class:`Parts` owns them afterwards and closes them in reverse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipetrain import hooks
from pipetrain.config import TrainConfig, build_config
from pipetrain.data.loader import Loader, MicroBatch
from pipetrain.data.workload import prepare
from pipetrain.pipeline.schedule import Action
from pipetrain.pipeline.schedule import build as build_schedule
from pipetrain.pipeline.stage import Stage
from pipetrain.run import checkpoint
from pipetrain.runtime import messages
from pipetrain.runtime.background import DigestReport, DigestThread, ReduceThread
from pipetrain.runtime.inbox import Inbox, Receivers
from pipetrain.runtime.topology import NEXT_REPLICA, PREV_REPLICA, Grid, Position
from pipetrain.wire import allreduce
from pipetrain.wire.channel import Channel
from pipetrain.wire.frames import Kind, ProtocolError


def receive_frame(inbox: Inbox, source: str, kind: Kind, step: int, index: int, *, what: str,
                  interrupted: Callable[[], bool], name: str) -> np.ndarray:
    """The next frame from ``source``, which must be the expected one (links keep order)."""
    frame = inbox.get(source, interrupted=interrupted)
    if (frame.kind, frame.step, frame.microbatch) != (kind, step, index):
        raise ProtocolError(
            f"{name} at {what}: expected {kind.name} step {step} index {index} from "
            f"{source}, got kind {frame.kind} step {frame.step} index {frame.microbatch}")
    return frame.array


@dataclass
class Parts:
    place: hooks.Place
    config: TrainConfig
    stage: Stage
    actions: list[Action]
    loader: Loader | None
    digester: DigestThread
    reducer: ReduceThread | None
    channels: dict[str, Channel]
    receivers: Receivers
    op_timeout_s: float
    _undo: contextlib.ExitStack

    def digest_share(self) -> list[np.ndarray | None]:
        """The gradients this worker hashes: after the all-reduce every replica holds the same
        ones, so replica r hashes the parameters at positions r, r + R, r + 2R, ... and the
        coordinator takes each digest from the replica that made it."""
        grads = self.stage.segment.grads()
        replica, replicas = self.place.replica, self.config.replicas
        return [grads[name] if position % replicas == replica else None
                for position, name in enumerate(self.stage.names)]

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
    grid = Grid(init.num_stages, config.replicas)
    first, stop = init.layers
    is_first, is_last = init.stage == 0, init.stage == init.num_stages - 1
    with contextlib.ExitStack() as undo:
        loader = None
        if is_first or is_last:
            workload = prepare(config.data_spec())
            loader = Loader(workload, replica=init.replica, replicas=config.replicas,
                            microbatches=config.microbatches, need_x=is_first, need_y=is_last,
                            threads=config.loader_threads, prefetch=config.prefetch,
                            augment=config.augmentation, seed=config.seed,
                            dtype=np.dtype(config.dtype), place=place)
            undo.callback(loader.stop)
            loader.start(init.start_step + 1, workload.total_steps)
        digester = DigestThread(report_digests)
        undo.callback(digester.close)
        channels: dict[str, Channel] = {}
        undo.callback(lambda: [channel.close() for channel in channels.values()])
        receivers = Receivers(inbox, op_timeout_s=init.op_timeout_s)
        undo.callback(receivers.stop)  # before the channels are closed: it polls their fds
        peers = grid.links(Position(init.stage, init.replica))
        for name, endpoint in init.links.items():
            if name not in peers:
                raise ProtocolError(f"{place}: init names a link {name!r} it has no peer for")
            peer = peers[name]
            channel = transport.open_link(name, endpoint, init.op_timeout_s)
            channels[name] = channel
            channels[name] = hooks.current().wrap_channel(
                place, hooks.Place(hooks.STAGE, peer.stage, peer.replica, init.generation),
                channel)
            receivers.start(name, channels[name])

        def next_microbatch(step: int, microbatch: int) -> MicroBatch:
            alive()
            return loader.get(step, microbatch)

        chain = _Chain(channels, inbox, init.op_timeout_s, alive, str(place))
        reducer = None
        if config.replicas > 1:
            reducer = ReduceThread(
                init.replica, config.replicas, lambda step: chain.links(Kind.REDUCE, step),
                before_reduce=lambda step, names: hooks.current().before_reduce(place, step,
                                                                                names))
            undo.callback(reducer.close)
        stage = Stage(model=config.model_spec(), index=init.stage, num_stages=init.num_stages,
                      first_layer=first, stop_layer=stop,
                      source=next_microbatch if loader else None,
                      on_grads_final=reducer.submit if reducer else None,
                      replica=init.replica)
        if init.resume_from:
            manifest = checkpoint.verify(Path(init.resume_from))
            stage.load_state(*checkpoint.load_state(manifest, stage.names))
            hooks.current().state_restored(place, stage)
        if reducer is not None:
            sync_weights(stage, chain, init.replica, config.replicas)
        actions = build_schedule(config.schedule, init.num_stages, config.microbatches)
        parts = Parts(place=place, config=config, stage=stage, actions=actions[init.stage],
                      loader=loader, digester=digester, reducer=reducer, channels=channels,
                      receivers=receivers, op_timeout_s=init.op_timeout_s,
                      _undo=undo.pop_all())
    return parts


def sync_weights(stage: Stage, chain: _Chain, replica: int, replicas: int) -> None:
    """Replica 0's parameters to every replica (they agree by construction; this makes sure of
    it after a start, a restart or a resume)."""
    params = [stage.params[name] for name in stage.names]
    flat = allreduce.flatten(params)
    links = chain.links(Kind.PARAMETER, 0)
    allreduce.broadcast_from_first(flat, replica, replicas, send_next=links["send_next"],
                                   recv_prev=links["recv_prev"])
    allreduce.unflatten(flat, params)
