"""The stage worker process: one pipeline stage, its links and its threads.

::

    coordinator ──control──────────────────┐
        ▲                                  ▼
        └──────── replies ─────────── main thread ──activations──▶ next stage
                                         ▲   ▲  │
    previous stage ──activations─────────┘   │  └──gradients───▶ previous stage
    next stage ─────gradients────────────────┘   (or through [recv-*] threads)

The main thread reads the control pipe and its neighbours' links itself, polling the one it
waits for together with the control pipe (``pipetrain.runtime.inbox``); a link whose step of
frames would not fit in its pipe gets a receiver thread that reads it ahead instead, as does
every link of an MPI rank. The main thread runs the schedule's actions for each ``Step`` and
sends frames itself; helper threads hash the gradients (a small stage hashes them itself) and,
in a replicated stage, all-reduce them (``pipetrain.runtime.background``); a heartbeat thread
reports liveness. The first control message (:class:`~pipetrain.runtime.messages.Init`) says
who the worker is; what it builds from it is in ``pipetrain.runtime.worker_setup``. How links
are opened is the transport's (:class:`Transport`: pipe fds here, MPI ranks in
``pipetrain.runtime.mpi_launcher``).

Started by the pipe launcher as ``python -P -m pipetrain.runtime.worker CONTROL_IN CONTROL_OUT
COURIER``; links and snapshot regions come on the courier (``pipetrain.runtime.courier``).
When another worker fails the coordinator halts this one (``Halt``: the step is abandoned,
the links closed) and restores it (``Restore``: state rolled back from its own snapshots if
need be, new links); process and state stay (``pipetrain.runtime.recovery``).
It dies with the coordinator (PR_SET_PDEATHSIG, and end-of-file on
the control pipe as the portable backstop), ignores SIGINT and the terminal's job-control stops
(a Ctrl-C or Ctrl-Z is the coordinator's to act on, at a step boundary) and exits cleanly on
SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np

from pipetrain import hooks, tracing
from pipetrain.pipeline.stage import UPSTREAM
from pipetrain.runtime import messages
from pipetrain.runtime.background import JobFailed
from pipetrain.runtime.courier import Courier
from pipetrain.runtime.inbox import Inbox, InboxClosed, InboxFailure, PeerClosed, Receivers
from pipetrain.runtime.proctitle import set_title, stage_title
from pipetrain.runtime.signals import ignore_job_control
from pipetrain.runtime.snapshot import peek_steps
from pipetrain.runtime.spinning import WORKER_SPIN_S, spin_budget
from pipetrain.runtime.topology import Position
from pipetrain.runtime.transport import PipeTransport, Transport, die_with_parent
from pipetrain.runtime.worker_setup import Parts, build_parts, receive_frame
from pipetrain.status import ExitCode
from pipetrain.threads import leftover_threads, start_helper
from pipetrain.wire.channel import Channel, ChannelClosed
from pipetrain.wire.frames import Kind, ProtocolError
from pipetrain.wire.pipe import PipeChannel

CONTROL = "control"


class Worker:
    def __init__(self, control: Channel, transport: Transport) -> None:
        self.control = control
        self.transport = transport
        self.control_lock = threading.Lock()  # the main thread and helper threads reply
        self.inbox = Inbox()
        self.terminate = False
        self.last_alive = time.monotonic()
        self.stopping = threading.Event()  # ends the heartbeat thread
        self.sending = False  # the main thread is blocked writing to a neighbour
        self.heartbeat_thread: threading.Thread | None = None
        self.control_receivers: Receivers | None = None
        self.parts: Parts | None = None
        self.stopped = False  # a Stop was received
        self.name = f"worker pid {os.getpid()}"
        self._data_wait_total = 0.0
        self.main_thread: int | None = None  # the one that reads the control pipe (serve)

    # -- control messages ------------------------------------------------------------------

    def reply(self, message: messages.Message) -> None:
        with self.control_lock:
            self.control.send_frame(Kind.CONTROL, 0, 0, messages.encode(message))

    def alive(self) -> bool:
        """Called by the main thread whenever it makes progress or wakes from a wait: the
        heartbeat thread beats only while this stays fresh, so a stuck main thread goes silent.

        Returns whether to stop waiting: on SIGTERM, or when a command arrives while the main
        thread waits inside a step. Steps run in lock-step, so the coordinator sends nothing
        during a step but a ``Stop`` after a failure elsewhere (a pipe worker is killed then,
        an MPI rank must leave its wait to find the ``Stop``)."""
        self.last_alive = time.monotonic()
        return self.terminate or bool(self.inbox.depth(CONTROL))

    def waiting(self) -> bool:
        """:meth:`alive` for a wait on anything but a link the main thread reads itself (a
        helper thread, a receiver thread's inbox): the main thread reads a command that came
        meanwhile, so that it interrupts the wait."""
        if threading.get_ident() == self.main_thread:
            self.inbox.pump()
        return self.alive()

    def _heartbeat(self, interval_s: float, timeout_s: float) -> None:
        while not self.stopping.wait(interval_s):
            stuck = time.monotonic() - self.last_alive > timeout_s
            if stuck and not (self.sending or self.inbox.reading):
                # The main thread is stuck in its own work: let the coordinator notice the
                # silence. Blocked sending to a neighbour (or reading a frame it is sending) is
                # waiting, not hanging: the neighbour that does not go on is the one whose
                # heartbeat stops.
                continue
            try:
                self.reply(messages.Heartbeat())
            except Exception:  # noqa: BLE001 - the coordinator is gone; the main thread will see
                return

    def idle(self) -> bool:
        """The liveness callback while waiting for the next command: whether to stop (SIGTERM)."""
        self.last_alive = time.monotonic()
        return self.terminate

    def next_command(self) -> messages.Message:
        frame = self.inbox.get(CONTROL, interrupted=self.idle)
        if frame.kind != Kind.CONTROL:
            raise ProtocolError(f"{self.name}: expected a control frame, got kind {frame.kind}")
        return messages.decode(frame.array)

    # -- commands ----------------------------------------------------------------------------

    def run_step(self, step: int) -> None:
        parts = self.parts
        stage, place, hooks_now = parts.stage, parts.place, hooks.current()
        trace = tracing.current()
        if hooks_now.quiet_boundary(step - 1):  # a fault is planned in this step: the last
            parts.wait_snapshot()  # step's copy completes first, so what recovery finds replays
        hooks_now.before_step(place, step)
        self._leave_if_terminated()
        started = time.perf_counter()
        step_ns = trace.start()
        waited = 0.0
        # begin_step swaps in the gradient arrays of two steps ago: they must be hashed by now
        # (they have had a whole step; this returns at once unless hashing fell behind).
        span_ns = trace.start()
        parts.digester.wait(at_most_pending=1)
        trace.end("wait digester", tracing.WAIT, span_ns)
        stage.begin_step(step)
        for action in parts.actions:
            hooks_now.before_action(place, step, action)
            self._leave_if_terminated()
            source = stage.needs_input(action)
            received = None
            if source is not None:
                wait_start = time.perf_counter()
                span_ns = trace.start()
                expected = Kind.ACTIVATION if source == UPSTREAM else Kind.GRADIENT
                received = receive_frame(self.inbox, source, expected, step, action.microbatch,
                                         what=action, interrupted=self.waiting, name=self.name)
                waited += time.perf_counter() - wait_start
                trace.waited(source, action, span_ns)
            self.alive()
            span_ns = trace.start()
            outgoing = stage.execute(action, received)
            trace.action(action, step, span_ns)
            if outgoing is not None:
                self.send_to(outgoing.direction, outgoing.kind, step, outgoing.microbatch,
                             outgoing.array)
        reduce_s = 0.0
        if parts.reducer is not None:  # most of the all-reduce ran during backward already
            wait_start = time.perf_counter()
            span_ns = trace.start()
            parts.reducer.wait(interrupted=self.waiting)
            reduce_s = time.perf_counter() - wait_start
            trace.end("wait all-reduce", tracing.WAIT, span_ns)
        parts.digester.submit(step, parts.digest_share())
        span_ns = trace.start()
        parts.wait_snapshot()  # the copy of the last step's state reads what the update writes
        trace.end("wait snapshot", tracing.WAIT, span_ns)
        span_ns = trace.start()
        stage.apply_update()
        trace.end("update", tracing.COMPUTE, span_ns, {"step": step})
        hooks_now.after_update(place, step, stage)
        elapsed = time.perf_counter() - started
        trace.end(f"step {step}", tracing.STEP, step_ns, {"step": step})
        data_wait, depth = None, None
        if parts.loader is not None:
            stats = parts.loader.stats()
            data_wait = stats["consumer_wait_s"] - self._data_wait_total
            self._data_wait_total = stats["consumer_wait_s"]
            depth = stats["queue_depth"]
        self.reply(messages.StepDone(
            step=step, loss=stage.step_loss if stage.is_last else None,
            compute_s=elapsed - waited - reduce_s - (data_wait or 0.0),
            wait_neighbours_s=waited, allreduce_s=reduce_s, wait_data_s=data_wait,
            loader_depth=depth, digests=parts.digester.take(step)))
        parts.snapshot(step)  # after the reply: the copy must not delay the next step's start
        parts.release_loader_slots()  # the loaders make the next step's items meanwhile

    def _leave_if_terminated(self) -> None:
        """A SIGTERM before a step or an action ends the worker there, before that work
        starts: else whether it got done would depend on whether its input was queued already
        (a queued frame is taken without looking at the flag)."""
        if self.terminate:
            raise InterruptedError("SIGTERM")

    def send_to(self, direction: str, kind: Kind, step: int, index: int,
                data: np.ndarray) -> None:
        self.sending = True
        trace = tracing.current()
        span_ns = trace.start()
        try:
            self.parts.channels[direction].send_frame(kind, step, index, data,
                                                      timeout_s=self.parts.op_timeout_s)
        finally:
            self.sending = False
            trace.frame("send", direction, span_ns, kind, step, index, data.nbytes)
            self.alive()

    def send_params(self) -> None:
        stage = self.parts.stage
        with self.control_lock:  # header and frames back to back: no heartbeat in between
            self.control.send_frame(Kind.CONTROL, 0, 0,
                                    messages.encode(messages.ParamsFollow(names=stage.names)))
            for position, name in enumerate(stage.names):
                self.control.send_frame(Kind.PARAMETER, 0, position, stage.params[name])

    # -- recovery ----------------------------------------------------------------------------

    def halt(self) -> None:
        """Another worker failed: settle, hand over the snapshot regions, report the state."""
        parts = self.parts
        fds = parts.halt(lambda: parts.digester.wait(interrupted=self.idle))
        self.transport.send(fds)
        region = parts.region
        self.reply(messages.Halted(
            step=parts.applied_step, snapshots=region.valid_steps() if region else [],
            held={key: peek_steps(fd) for key, fd in parts.held.items()}, fds=list(fds)))

    def restore(self, command: messages.Restore) -> None:
        """Continue from step ``command.step`` with new links (see :class:`Parts`)."""
        fds = self.transport.take(command.fds)
        self.parts.hold(fds)
        self.parts.restore(command.step, command.generation, command.links, command.state_root)
        self.name = str(self.parts.place)
        self.reply(messages.Restored(step=command.step))

    def step_abandoned(self, exc: Exception) -> bool:
        """Whether ``exc`` only ends the step, not the worker: the coordinator interrupted it
        (a command arrived), or a link closed (a neighbour failed; said as a consequence).
        Either way the coordinator decides what comes next."""
        if self.terminate:
            return False
        cause = exc.__cause__ if isinstance(exc, JobFailed) else exc
        if isinstance(cause, InterruptedError):
            return True
        if isinstance(cause, PeerClosed | ChannelClosed) and not isinstance(cause, InboxClosed):
            self._report(str(exc), consequence=True)
            return True
        return isinstance(cause, InboxClosed)

    # -- the loop ----------------------------------------------------------------------------

    def serve(self) -> int:
        self.main_thread = threading.get_ident()
        if self.control.read_capacity() is not None:  # a pipe: this thread reads it
            self.inbox.read_directly(CONTROL, self.control, op_timeout_s=None, fatal=True)
        else:
            self.control_receivers = Receivers(self.inbox, op_timeout_s=None)
            self.control_receivers.start(CONTROL, self.control, fatal=True)
        try:
            init = self.next_command()
            if isinstance(init, messages.Stop):  # released before it started (MPI: rank 0
                self.stopped = True               # refused the run and says why)
                return ExitCode.OK
            if not isinstance(init, messages.Init):
                raise ProtocolError(f"the first control message must be init, got {init}")
            self.transport.prepare(init)
            self.parts = build_parts(init, self.transport, self.inbox, self._report_digests,
                                     self.waiting)
            self.inbox.spin_s = spin_budget(WORKER_SPIN_S,
                                            init.num_stages * self.parts.config.replicas)
            self.name = str(self.parts.place)
            set_title(stage_title(Position(init.stage, init.replica), init.num_stages))
            self.heartbeat_thread = start_helper(
                self._heartbeat, name="heartbeat",
                args=(init.heartbeat_interval_s, init.heartbeat_timeout_s))
            hooks.current().worker_ready(self.parts.place)
            region = self.parts.region
            self.transport.send({"region": region.fd} if region is not None else {})
            self.reply(messages.Ready(pid=os.getpid(), region=region is not None))
            while True:
                match self.next_command():
                    case messages.Step(step=step):
                        try:
                            self.run_step(step)
                        except Exception as exc:
                            if not self.step_abandoned(exc):
                                raise
                    case messages.Halt():
                        self.halt()
                    case messages.Restore() as command:
                        self.restore(command)
                    case messages.Hold(fds=names):
                        self.parts.hold(self.transport.take(names))
                    case messages.SendParams():
                        self.send_params()
                    case messages.WriteCheckpoint() as command:
                        self.reply(self.parts.write_checkpoint(command))
                    case messages.Stop():
                        self.stopped = True
                        return ExitCode.OK
                    case other:
                        raise ProtocolError(f"{self.name}: unexpected command {other}")
        except InterruptedError:
            return ExitCode.OK  # SIGTERM or a stop: leave quietly, the coordinator decides
        except Exception as exc:  # noqa: BLE001 - every failure must reach the coordinator
            return self._fail(exc)
        finally:
            self.shutdown()

    def _fail(self, exc: Exception) -> int:
        if self.terminate:
            return ExitCode.OK  # SIGTERM interrupted whatever was in progress: a clean exit
        cause = exc.__cause__ if isinstance(exc, JobFailed) else exc
        if isinstance(cause, PeerClosed | ChannelClosed):
            # A neighbour's link closed: most likely a consequence of that neighbour's own
            # failure, which the coordinator is better placed to name.
            self._report(str(exc), consequence=True)
        elif isinstance(cause, InboxFailure):  # a corrupt or stalled frame: our finding
            self._report(str(exc))
        else:
            self._report(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        return ExitCode.FAILED

    def _report_digests(self, step: int, digests: list[str | None]) -> None:
        self.reply(messages.Digests(step=step, digests=digests))

    def _report(self, message: str, trace: str = "", *, consequence: bool = False) -> None:
        # The coordinator first: the log may be on a full disk.
        with contextlib.suppress(Exception):  # the coordinator may be gone already
            self.reply(messages.Failed(message=message, traceback=trace,
                                       consequence=consequence))
        with contextlib.suppress(OSError):
            sys.stderr.write(f"{self.name}: {message}\n{trace}")
            sys.stderr.flush()

    def shutdown(self) -> None:
        self.stopping.set()
        if self.parts is not None:
            # A helper may be waiting in the inbox for a replica that is gone: wake it first.
            self.inbox.fail(InboxClosed(f"{self.name} is shutting down"))
            self.parts.close()
        if self.heartbeat_thread is not None:
            self.heartbeat_thread.join()
        if self.control_receivers is not None:
            self.control_receivers.stop()
        if not self.transport.keeps_control_open:
            self.control.close()
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    ignore_job_control()
    set_title("pipetrain: worker (starting)")
    worker = Worker(PipeChannel(int(argv[0]), int(argv[1]), name="control"),
                    PipeTransport(Courier.from_fd(int(argv[2]), name="courier")))

    def on_term(signum: int, frame: object) -> None:
        worker.terminate = True  # only the flag: the main thread acts on it

    signal.signal(signal.SIGTERM, on_term)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(int(os.environ.get("PIPETRAIN_BLAS_THREADS", "1"))):
        status = worker.serve()
    leftover = leftover_threads()
    if leftover:  # every thread this process started must be joined by now
        sys.stderr.write(f"{worker.name}: threads still alive at exit: {leftover}\n")
        return ExitCode.THREADS_LEFT
    return status


if __name__ == "__main__":
    sys.exit(main())
