"""The coordinator's event loop: it waits in ``poll`` on every worker's control channel and
the signal pipe, and nowhere else.

Heartbeats are absorbed and step results filed as they come; a worker's death (end-of-file on
its control pipe), its ``Failed`` report or its silence becomes a
:class:`~pipetrain.runtime.diagnosis.WorkerFailed` at once, never a hang; a second SIGINT
becomes :class:`Aborted`. :class:`~pipetrain.runtime.coordinator.Coordinator` extends this loop
with the workers' lifecycle and the step protocol.

Silence is judged with care: only a worker with nothing waiting in its pipe can be silent, and
only time the coordinator spent watching counts. A ``poll`` that returns much later than asked,
or a long absence from the loop, means the coordinator was not running (SIGSTOP, a VM pause):
every worker's clock moves on by that gap instead of one being blamed.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable

from pipetrain.config import TrainConfig
from pipetrain.runtime import messages
from pipetrain.runtime.diagnosis import WorkerFailed, failure, root_cause
from pipetrain.runtime.launcher import Launcher, WorkerHandle
from pipetrain.runtime.signals import SignalControl
from pipetrain.runtime.spinning import COORDINATOR_SPIN_S, poll_spinning, spin_budget
from pipetrain.wire.channel import ChannelClosed, ChannelTimeout
from pipetrain.wire.frames import Kind, ProtocolError

# (worker, message) -> None: what pump() does with a message it does not absorb itself
Handler = Callable[[WorkerHandle, messages.Message], None]
# Unwatched time (the loop not running) beyond this moves the workers' silence clocks on.
GAP_S = 0.25


class Aborted(Exception):
    """The user insisted (a second SIGINT): stop now, without a checkpoint."""


class ControlLoop:
    """Messages to and from the workers of ``self.workers``, and the wait for them."""

    def __init__(self, config: TrainConfig, signals: SignalControl | None,
                 launcher: Launcher) -> None:
        self.config = config
        self.signals = signals
        self.launcher = launcher
        self.workers: list[WorkerHandle] = []
        self.op_timeout_s = config.op_timeout_s
        # Step results, filed by step and worker as they arrive: with the next step started
        # early (TrainingRun.may_run_ahead) a StepDone can come before the previous step's
        # digests, which the workers' digest threads send whenever they are ready.
        self._done: dict[int, dict[int, messages.StepDone]] = {}
        self._digests: dict[int, dict[int, list[str | None]]] = {}
        self._last_tick: float | None = None  # the loop last ran at this time
        self._poll_cache: tuple[tuple, select.poll] | None = None  # (fds, poll set): _poller
        # Poll before sleeping only when every worker has a CPU and one is left over for us.
        self.spin_s = spin_budget(COORDINATOR_SPIN_S, config.stages * config.replicas + 1)

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
        poller = self._poller(tuple(by_fd))
        self._tick(0.0)
        while not done():
            timeout_ms = self._heartbeat_poll_ms(workers)
            ready = poll_spinning(poller, self.spin_s, timeout_ms)
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
                        if message.digests is not None:
                            self._file(self._digests, step, worker, message.digests)
                    case messages.Digests(step=step, digests=digests):
                        self._file(self._digests, step, worker, digests)
                    case messages.Failed() as message:
                        worker.last_error = message.message
                        on_failed(worker, message)
                    case message:
                        handle(worker, message)
            self._check_heartbeats(workers)
        self._tick(0.0)

    def _poller(self, fds: tuple[int, ...]) -> select.poll:
        """A poll set of ``fds`` and the signal pipe; the last one is kept, since a step's
        two waits (results, digests) poll the same channels (poll registers fd numbers)."""
        key = (fds, self.signals.fileno() if self.signals is not None else None)
        if self._poll_cache is not None and self._poll_cache[0] == key:
            return self._poll_cache[1]
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        if key[1] is not None:
            poller.register(key[1], select.POLLIN)
        self._poll_cache = (key, poller)
        return poller

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
