"""The coordinator: its event loop and the step protocol with the workers.

::

                 ┌──────────── coordinator (this process) ─────────────┐
                 │ Step k ──▶ every stage; waits for every StepDone    │
                 └──┬──────────────────┬──────────────────┬────────────┘
              control channel    control channel    control channel
                 ┌──▼──┐ activations ┌──▼──┐ activations ┌──▼──┐
                 │  0  │ ──────────▶ │  1  │ ──────────▶ │  2  │ (loss)
                 │     │ ◀────────── │     │ ◀────────── │     │
                 └─────┘  gradients  └─────┘  gradients  └─────┘

Steps run in lock-step: the coordinator sends ``Step k`` to every stage and waits for all of their
``StepDone`` replies (loss from the last stage) before the next step. The per-parameter gradient
digests come later in ``Digests`` messages from the workers' helper threads; when the boundary
has nothing to do, ``Step k + 1`` is sent before they arrive (``TrainingRun.may_run_ahead``).
Boundaries with no step in flight are where pauses, checkpoints and stops take effect. The main
thread only ever waits in ``poll`` on the control channels and the signal pipe, so a worker's
death (end-of-file on its control pipe) or error is seen at once and becomes a
:class:`~pipetrain.runtime.diagnosis.WorkerFailed`, never a hang. Who starts the workers is the
:class:`~pipetrain.runtime.launcher.Launcher`'s business; who is to blame is
``pipetrain.runtime.diagnosis``'s; replacing one worker while the others run on is
``pipetrain.runtime.recovery``'s.

Silence is judged with care: only a worker with nothing waiting in its pipe can be silent, and
only time the coordinator spent watching counts. A ``poll`` that returns much later than asked,
or a long absence from the loop, means the coordinator was not running (SIGSTOP, a VM pause):
every worker's clock moves on by that gap instead of one being blamed.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipetrain import hooks
from pipetrain.config import TrainConfig
from pipetrain.nn.digest import combine
from pipetrain.pipeline.partition import canonical_positions
from pipetrain.pipeline.partition import stage_bounds as partition_stages
from pipetrain.pipeline.schedule import validate as validate_schedule
from pipetrain.run.rundir import RunDir
from pipetrain.runtime import messages
from pipetrain.runtime.checkpointing import write_checkpoint
from pipetrain.runtime.courier import close_all
from pipetrain.runtime.diagnosis import WorkerFailed, failure, root_cause
from pipetrain.runtime.launcher import Launcher, WorkerHandle
from pipetrain.runtime.recovery import Outcome, Recovery, hand_region
from pipetrain.runtime.signals import SignalControl
from pipetrain.runtime.topology import Grid, Position
from pipetrain.wire.channel import ChannelClosed, ChannelTimeout
from pipetrain.wire.frames import Kind, ProtocolError

COORDINATOR = hooks.Place(hooks.COORDINATOR)
# (worker, message) -> None: what pump() does with a message it does not absorb itself
Handler = Callable[[WorkerHandle, messages.Message], None]
# Unwatched time (the loop not running) beyond this moves the workers' silence clocks on.
GAP_S = 0.25


class Aborted(Exception):
    """The user insisted (a second SIGINT): stop now, without a checkpoint."""


def stage_bounds(config: TrainConfig) -> list[tuple[int, ...]]:
    """The layers ``[first, stop)`` of every stage (flattened pairs, one per piece, when
    interleaved), balanced by parameters or measured time."""
    return partition_stages(config.model_spec(), config.stages, config.balance,
                            config.pieces_per_stage)


class Coordinator:
    def __init__(self, config: TrainConfig, run: RunDir, signals: SignalControl | None,
                 launcher: Launcher) -> None:
        self.config = config
        self.run = run
        self.signals = signals
        self.launcher = launcher
        self.grid = Grid(config.stages, config.replicas, ring=config.ring)
        self.bounds = stage_bounds(config)
        validate_schedule(config.build_schedule(), config.stages, config.microbatches,
                          config.pieces_per_stage)
        self.digest_order = canonical_positions(config.model_spec(), self.bounds)
        self.workers: list[WorkerHandle] = []
        # Step results, filed by step and worker as they arrive: with the next step started
        # early (TrainingRun.may_run_ahead) a StepDone can come before the previous step's
        # digests, which the workers' digest threads send whenever they are ready.
        self._done: dict[int, dict[int, messages.StepDone]] = {}
        self._digests: dict[int, dict[int, list[str | None]]] = {}
        self.generation = 0  # how many worker groups were started: 0 first, then restarts
        self.op_timeout_s = config.op_timeout_s
        self.snapshots = launcher.replaceable  # in-memory snapshots, for in-place recovery
        # Snapshot regions this process holds: only a grid of one worker has no peer to do it.
        self.held_regions: dict[Position, int] = {}
        self._last_tick: float | None = None  # the loop last ran at this time
        self.data_digest: dict | None = None  # the dataset's content, for every manifest
        self.departed: list[WorkerHandle] = []  # failed in a recovery, exit not reported yet

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, resume_from: Path | None = None, start_step: int = 0) -> None:
        """Start every worker of the S x R grid, send each its ``Init``, and wait until all are
        ready. With ``resume_from`` (a verified checkpoint directory) every stage loads its
        parameters and optimizer state from it instead of initialising them from the seed."""
        self.release_regions()
        self.workers = self.launcher.start(self.grid, self.bounds, self.log_path,
                                           self.generation)
        for worker in self.workers:
            self.send(worker, self.init_message(
                worker, start_step=start_step,
                state_source="checkpoint" if resume_from else "init",
                resume_from=str(resume_from) if resume_from else None))
        self.await_ready(self.workers)
        self.generation += 1

    def await_ready(self, workers: list[WorkerHandle]) -> None:
        """Wait for the ``Ready`` of ``workers`` (just started), then place their regions."""
        replies = self.collect(messages.Ready, workers=workers)
        for worker, reply in zip(workers, replies, strict=True):
            worker.ready, worker.region = True, reply.region
        self.hand_regions(workers)

    def init_message(self, worker: WorkerHandle, **fields) -> messages.Init:
        config = self.config
        return messages.Init(
            config=config.to_json(), stage=worker.index, replica=worker.replica,
            num_stages=config.stages, layers=list(worker.layers), links=worker.endpoints,
            op_timeout_s=self.op_timeout_s,
            heartbeat_interval_s=min(1.0, config.heartbeat_timeout / 5),
            heartbeat_timeout_s=config.heartbeat_timeout, generation=self.generation,
            log_path=str(worker.log_path), fds=list(worker.fds), snapshots=self.snapshots,
            trace_dir=str(self.run.path / "trace") if config.trace else None, **fields)

    def hand_regions(self, workers: list[WorkerHandle]) -> None:
        """Give each new snapshot region to the worker that holds it (``hand_region``)."""
        for worker in workers:
            if worker.region:
                hand_region(self, worker)

    def release_regions(self) -> None:
        close_all(list(self.held_regions.values()))
        self.held_regions.clear()

    def take_departed(self) -> list[WorkerHandle]:
        """The workers a recovery took out (exited), each reported once."""
        departed, self.departed = self.departed, []
        return departed

    def clear_results(self) -> None:
        """Forget step results: a new or recovered group reports afresh."""
        self._done.clear()
        self._digests.clear()

    def log_path(self, at: Position) -> Path:
        suffix = f"-replica-{at.replica}" if self.config.replicas > 1 else ""
        return self.run.path / "logs" / f"stage-{at.stage}{suffix}.log"

    def shutdown(self, *, graceful: bool = True) -> list[WorkerHandle]:
        """Stop every worker, reap it and close its channels; returns the handles, now exited.

        Graceful: a ``Stop``, then force after a grace period. Not graceful (after a failure,
        when nothing in the group can be trusted): force at once, which also makes a restart
        fast.
        """
        stopped, self.workers = self.workers, []
        self.launcher.stop(stopped, graceful=graceful)
        self.release_regions()
        self.clear_results()
        return stopped

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self.workers]

    # -- messages ----------------------------------------------------------------------------

    def send(self, worker: WorkerHandle, message: messages.Message) -> None:
        try:
            worker.control.send_frame(Kind.CONTROL, 0, 0, messages.encode(message),
                                      timeout_s=self.op_timeout_s)
        except (ChannelClosed, ChannelTimeout) as exc:
            raise self._failure(worker, str(exc)) from exc

    def broadcast(self, message: messages.Message) -> None:
        for worker in self.workers:
            self.send(worker, message)

    def collect(self, kind: type[messages.Message], *,
                workers: list[WorkerHandle] | None = None) -> list[messages.Message]:
        """Wait for a ``kind`` message from every worker (of ``workers``), failing fast if
        any dies or fails."""
        workers = self.workers if workers is None else workers
        replies: dict[int, messages.Message] = {}

        def handle(worker: WorkerHandle, message: messages.Message) -> None:
            if not isinstance(message, kind) or id(worker) in replies:
                raise self._failure(worker, f"expected {kind.TYPE}, got {message.TYPE}")
            replies[id(worker)] = message

        self.pump(handle, lambda: len(replies) == len(workers), workers=workers)
        return [replies[id(worker)] for worker in workers]

    def pump(self, handle: Handler, done: Callable[[], bool], *,
             workers: list[WorkerHandle] | None = None,
             on_failed: Handler | None = None) -> None:
        """Wait in ``poll`` on the control channels (of ``workers``, by default all) and the
        signal pipe until ``done()``.

        Heartbeats are absorbed here and step results filed; a ``Failed`` report goes to
        ``on_failed`` (by default: raise :class:`WorkerFailed`, naming the root cause); an
        end-of-file (the worker died) or a worker silent for longer than the heartbeat
        timeout raises :class:`WorkerFailed`; a second SIGINT raises :class:`Aborted`. Other
        messages go to ``handle``.
        """
        workers = self.workers if workers is None else workers
        on_failed = on_failed or self._raise_failed
        by_fd = {worker.control.fileno(): worker for worker in workers}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        if self.signals is not None:
            poller.register(self.signals.fileno(), select.POLLIN)
        self._tick(0.0)
        while not done():
            timeout_ms = self._heartbeat_poll_ms(workers)
            ready = poller.poll(timeout_ms)
            self._tick(timeout_ms / 1000)
            for fd, _ in ready:
                if fd not in by_fd:
                    self.check_signals()
                    continue
                worker = by_fd[fd]
                match self.receive(worker):
                    case messages.Heartbeat():
                        pass
                    case messages.StepDone(step=step) as message:
                        self._file(self._done, step, worker, message)
                    case messages.Digests(step=step, digests=digests):
                        self._file(self._digests, step, worker, digests)
                    case messages.Failed() as message:
                        worker.last_error = message.message
                        on_failed(worker, message)
                    case message:
                        handle(worker, message)
            self._check_heartbeats(workers)
        self._tick(0.0)

    def _raise_failed(self, worker: WorkerHandle, message: messages.Message) -> None:
        if message.consequence:
            raise root_cause(worker, self.workers, self.launcher)
        raise self._failure(worker, message.message or "unknown error")

    def _tick(self, asked_s: float) -> None:
        """The loop runs again now, having asked to sleep ``asked_s``: if it was away much
        longer, it was not scheduled, and that time counts for no worker's silence."""
        now = time.monotonic()
        if self._last_tick is not None:
            gap = now - self._last_tick - asked_s
            if gap > GAP_S:
                for worker in self.workers:
                    worker.last_seen = min(now, worker.last_seen + gap)
        self._last_tick = now

    def _file(self, store: dict, step: int, worker: WorkerHandle, value: object) -> None:
        by_worker = store.setdefault(step, {})
        if id(worker) in by_worker:
            raise self._failure(worker, f"sent the results of step {step} twice")
        by_worker[id(worker)] = value

    def _heartbeat_poll_ms(self, workers: list[WorkerHandle]) -> int:
        oldest = min((worker.last_seen for worker in workers if worker.ready),
                     default=time.monotonic())
        remaining = oldest + self.config.heartbeat_timeout - time.monotonic()
        return max(10, int(remaining * 1000) + 10)

    def _check_heartbeats(self, workers: list[WorkerHandle]) -> None:
        now = time.monotonic()
        # When several are silent, the one silent longest is the likeliest cause.
        for worker in sorted(workers, key=lambda w: w.last_seen):
            silent_s = now - worker.last_seen
            # A worker beats once it is set up: until then only a stall as long as a frame's
            # (a Python start-up and a dataset load on a loaded machine can take seconds).
            allowed_s = self.config.heartbeat_timeout if worker.ready else self.op_timeout_s
            if silent_s <= allowed_s:
                continue
            # Only a worker with nothing waiting in its pipe is silent: what arrived while
            # this loop was busy elsewhere is read first (the next poll returns it).
            if select.select([worker.control.fileno()], [], [], 0)[0]:
                continue
            raise self._failure(
                worker, f"no heartbeat for {silent_s:.1f}s (hung or frozen; "
                f"--heartbeat-timeout is {self.config.heartbeat_timeout}s)" if worker.ready
                else f"not ready after {silent_s:.1f}s")

    def check_signals(self) -> None:
        """Fold pending signals into requests; a second SIGINT aborts right away."""
        if self.signals is not None and self.signals.drain().abort:
            raise Aborted("aborted by a second interrupt")

    def receive(self, worker: WorkerHandle) -> messages.Message:
        try:
            frame = worker.control.recv_frame(timeout_s=self.op_timeout_s)
        except ChannelClosed:
            raise self._failure(worker, "exited without a word") from None
        except (ChannelTimeout, ProtocolError) as exc:
            raise self._failure(worker, str(exc)) from exc
        worker.last_seen = time.monotonic()
        if frame.kind != Kind.CONTROL:
            raise self._failure(worker, f"sent a frame of kind {frame.kind} out of turn")
        try:
            return messages.decode(frame.array)
        except ProtocolError as exc:
            raise self._failure(worker, str(exc)) from exc

    def _failure(self, worker: WorkerHandle, reason: str) -> WorkerFailed:
        return failure(worker, reason, self.launcher)

    # -- training ----------------------------------------------------------------------------

    def start_step(self, step: int) -> None:
        self.broadcast(messages.Step(step=step))
        hooks.current().step_started(step)

    def finish_step(self, step: int) -> tuple[float, list[messages.StepDone]]:
        """Wait for every ``StepDone`` of ``step``; the loss and the replies. The digests may
        still be on their way (:meth:`step_digest`), so the next step can start meanwhile."""
        self._wait_for(self._done, step, "step_done")
        done = self._done.pop(step)
        replies = [done[id(worker)] for worker in self.workers]
        loss = 0.0
        for worker, reply in zip(self.workers, replies, strict=True):
            if worker.index == self.config.stages - 1:  # workers are in replica order
                loss += float(reply.loss)
        return loss, replies

    def step_digest(self, step: int) -> str:
        """The step's ``grad_digest``, once every worker has sent its share: per stage, per
        parameter, the digest made by replica ``position % R`` (they all hold the same
        all-reduced gradients), combined in canonical order."""
        self._wait_for(self._digests, step, "digests")
        shares = self._digests.pop(step)
        replicas = self.config.replicas
        parts: list[bytes] = []
        by_place = {(worker.index, worker.replica): shares[id(worker)] for worker in self.workers}
        for index, position in self.digest_order:
            digest = by_place[index, position % replicas][position]
            if digest is None:
                raise WorkerFailed(f"no digest of parameter {position} of stage {index} "
                                   f"in step {step}")
            parts.append(bytes.fromhex(digest))
        return combine(parts)

    def _wait_for(self, store: dict[int, dict], step: int, what: str) -> None:
        def unexpected(worker: WorkerHandle, message: messages.Message) -> None:
            raise self._failure(worker, f"expected {what} of step {step}, got {message.TYPE}")

        self.pump(unexpected, lambda: len(store.get(step, ())) == len(self.workers))

    def gather_params(self) -> dict[str, np.ndarray]:
        """Every parameter, from replica 0's stages."""
        primary = [worker for worker in self.workers if worker.replica == 0]
        for worker in primary:
            self.send(worker, messages.SendParams())
        params: dict[str, np.ndarray] = {}
        answered: set[int] = set()

        def handle(worker: WorkerHandle, message: messages.Message) -> None:
            if (not isinstance(message, messages.ParamsFollow) or worker.index in answered
                    or worker.replica):
                raise self._failure(worker, f"expected params, got {message.TYPE}")
            # The worker sends its parameter frames right behind the header, under one lock.
            for position, name in enumerate(message.names):
                frame = worker.control.recv_frame(timeout_s=self.op_timeout_s)
                if frame.kind != Kind.PARAMETER or frame.microbatch != position:
                    raise self._failure(worker, f"bad parameter frame for {name}")
                params[name] = frame.array
            answered.add(worker.index)

        self.pump(handle, lambda: len(answered) == len(primary))
        return {name: params[name] for name in self.config.model_spec().parameter_names()}

    def recover(self, failure: WorkerFailed, emitted: int) -> Outcome:
        """Replace the failed worker(s) while the others run on (``pipetrain.runtime.
        recovery``); raises when that is impossible and the group must restart instead."""
        return Recovery(self).run(failure, emitted)

    def checkpoint(self, step: int, epoch: int) -> Path:
        """Every stage writes its segment into a temporary directory, then it is committed
        (``pipetrain.runtime.checkpointing``)."""
        return write_checkpoint(self, step, epoch)
