"""The stage worker process: one pipeline stage, its pipes and its threads.

::

    coordinator ──control──▶ [recv-control] ─┐
        ▲                                     ▼
        └──────── replies ─────────────── main thread ──activations──▶ next stage
                                             ▲   │
    previous stage ──activations──▶ [recv-upstream]  └──gradients───▶ previous stage
    next stage ─────gradients────▶ [recv-downstream]

Receiver threads (``system.inbox``) read every inbound pipe ahead into the inbox; the main
thread runs the schedule's actions for each ``step`` command and sends frames itself. Started as
``python -m system.worker CONTROL_IN_FD CONTROL_OUT_FD`` with only the fds it needs; the first
control message says who it is (``init``). It dies with the coordinator (PR_SET_PDEATHSIG, and
end-of-file on the control pipe as the portable backstop), ignores SIGINT (a Ctrl-C is the
coordinator's to handle) and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from system import allreduce, checkpoint, linkfaults, testhooks
from system.config import build_config
from system.data.loader import Loader, MicroBatch
from system.digest import array_digest, combine
from system.digester import Digester
from system.inbox import CONTROL_SIGNALS, Inbox, InboxFailure, PeerClosed, Receivers
from system.protocol import Kind, ProtocolError, decode_json, encode_json
from system.reducer import Reducer
from system.schedule import build as build_schedule
from system.stage import DOWNSTREAM, UPSTREAM, Stage
from system.transport import Channel, ChannelClosed, PipeChannel
from system.workload import augmentation, prepare

PR_SET_PDEATHSIG = 1
CONTROL = "control"
PREV_REPLICA, NEXT_REPLICA = "previous replica", "next replica"


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the coordinator dies (Linux only; EOF is the backstop)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class Worker:
    def __init__(self, control: Channel) -> None:
        self.control = control
        self.control_lock = threading.Lock()  # the main thread and the heartbeat thread reply
        self.inbox = Inbox()
        self.terminate = False
        self.last_alive = time.monotonic()
        self.stopping = threading.Event()  # ends the heartbeat thread
        self.sending = False  # the main thread is blocked writing to a neighbour
        self.heartbeat_thread: threading.Thread | None = None
        self.channels: dict[str, Channel] = {}
        self.receivers: Receivers | None = None
        self.stage: Stage | None = None
        self.loader: Loader | None = None
        self._data_wait_total = 0.0
        self.digester: Digester | None = None
        self.reducer: Reducer | None = None
        self.replica, self.replicas = 0, 1
        self.name = f"worker pid {os.getpid()}"

    # -- control messages ------------------------------------------------------------------

    def reply(self, message: dict[str, Any]) -> None:
        with self.control_lock:
            self.control.send_frame(Kind.CONTROL, 0, 0, encode_json(message))

    def alive(self) -> bool:
        """Called by the main thread whenever it makes progress or wakes from a wait: the
        heartbeat thread beats only while this stays fresh, so a stuck main thread goes silent.
        Returns whether to stop waiting (SIGTERM)."""
        self.last_alive = time.monotonic()
        return self.terminate

    def _heartbeat(self, interval_s: float, timeout_s: float) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
        while not self.stopping.wait(interval_s):
            stuck = time.monotonic() - self.last_alive > timeout_s
            if stuck and not self.sending:
                # The main thread is stuck in its own work: let the coordinator notice the
                # silence. Blocked sending to a neighbour is waiting, not hanging: the
                # neighbour that does not read is the one whose heartbeat stops.
                continue
            try:
                self.reply({"event": "heartbeat"})
            except Exception:  # noqa: BLE001 - the coordinator is gone; the main thread will see
                return

    def next_command(self) -> dict[str, Any]:
        frame = self.inbox.get(CONTROL, interrupted=self.alive)
        if frame.kind != Kind.CONTROL:
            raise ProtocolError(f"{self.name}: expected a control frame, got kind {frame.kind}")
        return decode_json(frame.array)

    # -- set-up ----------------------------------------------------------------------------

    def init(self, message: dict[str, Any]) -> None:
        config = build_config(message["config"], source="init")
        index, num_stages = message["stage"], message["num_stages"]
        self.name = f"stage {index}"
        first, stop = message["layers"]
        self.fault = testhooks.stage_fault(index, message.get("generation", 0))
        replica = message.get("replica", 0)
        self.replica, self.replicas = replica, config.replicas
        if config.replicas > 1:
            self.name = f"stage {index} replica {replica}"
        is_first, is_last = index == 0, index == num_stages - 1
        if is_first or is_last:
            workload = prepare(config)
            self.loader = Loader(
                workload, replica=replica, replicas=config.replicas,
                microbatches=config.microbatches, need_x=is_first, need_y=is_last,
                threads=config.loader_threads, prefetch=config.prefetch,
                augment=augmentation(config), seed=config.seed, dtype=np.dtype(config.dtype),
                test_delay_s=testhooks.loader_delay(self.fault),
            )
            self.loader.start(message.get("start_step", 0) + 1, workload.total_steps)
        self.stage = Stage(
            config=config, index=index, num_stages=num_stages, first_layer=first,
            stop_layer=stop, source=self._next_microbatch if self.loader else None,
            replica=replica,
        )
        self.actions = build_schedule(config.schedule, num_stages, config.microbatches)[index]
        self.digester = Digester(self._report_digests, blocked_signals=CONTROL_SIGNALS)
        self.op_timeout_s = message.get("op_timeout_s")
        fds = message["fds"]
        self.receivers = Receivers(self.inbox, op_timeout_s=self.op_timeout_s)
        generation = message.get("generation", 0)
        for direction, neighbour, (read_key, write_key) in (
            (UPSTREAM, index - 1, ("up_in", "up_out")),
            (DOWNSTREAM, index + 1, ("down_in", "down_out")),
        ):
            channel = self.open_link(fds, read_key, write_key, direction)
            if channel is None:
                continue
            self.receivers.start(direction, channel)
            plan = linkfaults.plan_for(index, neighbour, replica, generation)
            # Link faults are a shim on real pipes (the harness's); other transports run clean.
            self.channels[direction] = (
                linkfaults.FaultyChannel(channel, plan, seed=config.seed)
                if plan and isinstance(channel, PipeChannel) else channel
            )
        for direction, (read_key, write_key) in ((PREV_REPLICA, ("prev_in", "prev_out")),
                                                 (NEXT_REPLICA, ("next_in", "next_out"))):
            channel = self.open_link(fds, read_key, write_key, direction)
            if channel is not None:
                self.channels[direction] = channel
                self.receivers.start(direction, channel)
        if message.get("resume_from"):
            manifest = checkpoint.verify(Path(message["resume_from"]))
            params, optim = checkpoint.load_state(manifest, self.stage.names)
            if testhooks.planted("stale_restart") and generation > 0 and index == 0:
                optim = self.stage.optimizer.state_dict()  # the planted bug: state not restored
            self.stage.load_state(params, optim)
        if self.replicas > 1:
            self.sync_weights()
            self.reducer = Reducer(self.replica, self.replicas,
                                   lambda step: self._chain_links(Kind.REDUCE, step),
                                   blocked_signals=CONTROL_SIGNALS)
            grads = self.stage.segment.grads
            self.stage.on_grads_final = lambda names: self.reducer.submit(
                self.stage_step, [grads()[name] for name in names])

    def open_link(self, fds: dict[str, int], read_key: str, write_key: str,
                  name: str) -> Channel | None:
        """The channel to one neighbour, or None if this stage has no such neighbour. Here a
        pair of pipe fds; ``system.mpi_launch.MpiWorker`` opens MPI channels instead."""
        if read_key not in fds:
            return None
        return PipeChannel(fds[read_key], fds[write_key], name=name)

    # -- commands ----------------------------------------------------------------------------

    def receive(self, source: str, kind: Kind, step: int, index: int, what: str) -> np.ndarray:
        """The next frame from ``source``, which must be the expected one (pipes keep order)."""
        frame = self.inbox.get(source, interrupted=self.alive)
        if (frame.kind, frame.step, frame.microbatch) != (kind, step, index):
            raise ProtocolError(
                f"{self.name} at {what}: expected {kind.name} step {step} index {index} from "
                f"{source}, got kind {frame.kind} step {frame.step} index {frame.microbatch}"
            )
        return frame.array

    def send_to(self, direction: str, kind: Kind, step: int, index: int,
                data: np.ndarray) -> None:
        self.sending = True
        try:
            self.channels[direction].send_frame(kind, step, index, data,
                                                timeout_s=self.op_timeout_s)
        finally:
            self.sending = False
            self.alive()

    def _chain_links(self, kind: Kind, step: int) -> dict[str, Any]:
        """Send/receive callables for the chain among this stage's replicas: frames go straight
        to the replica channels (during a step only the reducer thread uses them; at start-up
        only the main thread), replies come through the inbox like every other frame."""
        def sender(direction: str):
            channel = self.channels.get(direction)
            if channel is None:
                return None
            return lambda index, data: channel.send_frame(kind, step, index, data,
                                                          timeout_s=self.op_timeout_s)

        def receiver(direction: str):
            if direction not in self.channels:
                return None
            return lambda index: self.receive(direction, kind, step, index, kind.name)

        return {"send_next": sender(NEXT_REPLICA), "send_prev": sender(PREV_REPLICA),
                "recv_prev": receiver(PREV_REPLICA), "recv_next": receiver(NEXT_REPLICA)}

    def sync_weights(self) -> None:
        """Replica 0's parameters to every replica (they agree by construction; this makes
        sure of it after a start, a restart or a resume)."""
        params = [self.stage.params[name] for name in self.stage.names]
        flat = allreduce.flatten(params)
        links = self._chain_links(Kind.PARAMETER, 0)
        allreduce.broadcast_from_first(flat, self.replica, self.replicas,
                                       send_next=links["send_next"], recv_prev=links["recv_prev"])
        allreduce.unflatten(flat, params)

    def _report_digests(self, step: int, digests: list[str | None]) -> None:
        self.reply({"event": "digests", "step": step, "digests": digests})

    def digest_share(self) -> list[np.ndarray | None]:
        """The gradients this worker hashes: after the all-reduce every replica holds the same
        ones, so replica r hashes the parameters at positions r, r + R, r + 2R, ... and the
        coordinator takes each digest from the replica that made it."""
        grads = self.stage.segment.grads()
        return [grads[name] if position % self.replicas == self.replica else None
                for position, name in enumerate(self.stage.names)]

    def _next_microbatch(self, step: int, microbatch: int) -> MicroBatch:
        self.alive()
        return self.loader.get(step, microbatch)

    def run_step(self, step: int) -> None:
        stage = self.stage
        assert stage is not None
        if self.fault and self.fault.get("step") == step:
            testhooks.trigger(self.fault, f"stage {stage.index} step {step}")
        testhooks.step_delay()
        started = time.perf_counter()
        waited = 0.0
        # begin_step swaps in the gradient arrays of two steps ago: they must be hashed by now
        # (they have had a whole step; this returns at once unless hashing fell behind).
        self.digester.wait(at_most_pending=1)
        self.stage_step = step
        stage.begin_step(step)
        for action in self.actions:
            source = stage.needs_input(action)
            received = None
            if source is not None:
                wait_start = time.perf_counter()
                expected = Kind.ACTIVATION if source == UPSTREAM else Kind.GRADIENT
                received = self.receive(source, expected, step, action.microbatch, str(action))
                waited += time.perf_counter() - wait_start
            self.alive()
            outgoing = stage.execute(action, received)
            if outgoing is not None:
                self.send_to(outgoing.direction, outgoing.kind, step, outgoing.microbatch,
                             outgoing.array)
        if self.reducer is not None:  # most of the all-reduce ran during backward already
            wait_start = time.perf_counter()
            self.reducer.wait(interrupted=self.alive)
            metrics_reduce_s = time.perf_counter() - wait_start
        else:
            metrics_reduce_s = 0.0
        self.digester.submit(step, self.digest_share())
        if self.fault and self.fault.get("kind") == "perturb" and self.fault.get("step") == step:
            self.digester.wait()  # the fault changes a gradient after its digest was taken
            testhooks.perturb(stage)
        stage.apply_update()
        elapsed = time.perf_counter() - started
        metrics = {"compute_s": elapsed - waited - metrics_reduce_s, "wait_neighbours_s": waited,
                   "allreduce_s": metrics_reduce_s}
        if self.loader is not None:
            stats = self.loader.stats()
            data_wait = stats["consumer_wait_s"] - self._data_wait_total
            self._data_wait_total = stats["consumer_wait_s"]
            metrics.update(wait_data_s=data_wait, loader_depth=stats["queue_depth"])
            metrics["compute_s"] -= data_wait
        self.reply({
            "event": "step_done", "step": step, "loss": stage.step_loss if stage.is_last else None,
            **metrics,
        })

    def send_params(self) -> None:
        stage = self.stage
        assert stage is not None
        names = stage.names
        with self.control_lock:  # header and frames back to back: no heartbeat in between
            self.control.send_frame(Kind.CONTROL, 0, 0,
                                    encode_json({"event": "params", "names": names}))
            for position, name in enumerate(names):
                self.control.send_frame(Kind.PARAMETER, 0, position, stage.params[name])

    def write_checkpoint(self, directory: Path) -> None:
        """Replica 0 writes the segment; every replica reports a digest of its parameters so
        the coordinator can check that the replicas have not drifted apart."""
        stage = self.stage
        assert stage is not None
        params_digest = combine(array_digest(stage.params[name]) for name in stage.names)
        reply = {"event": "checkpointed", "params_digest": params_digest}
        if self.replica == 0:
            reply["file"], reply["sha256"] = checkpoint.write_segment(
                directory, stage.index, stage.params, stage.optimizer.state_dict()
            )
        testhooks.checkpoint_delay()  # widens the write window for crash-during-write tests
        self.reply(reply)

    def serve(self) -> int:
        self.receivers_control = Receivers(self.inbox, op_timeout_s=None)
        self.receivers_control.start(CONTROL, self.control, fatal=True)
        try:
            message = self.next_command()
            if message.get("cmd") != "init":
                raise ProtocolError(f"first control message must be init, got {message}")
            self.init(message)
            self.heartbeat_thread = threading.Thread(
                target=self._heartbeat, name="heartbeat",
                args=(message["heartbeat_interval_s"], message["heartbeat_timeout_s"]),
            )
            self.heartbeat_thread.start()
            self.reply({"event": "ready", "pid": os.getpid()})
            while True:
                message = self.next_command()
                command = message.get("cmd")
                if command == "step":
                    self.run_step(int(message["step"]))
                elif command == "params":
                    self.send_params()
                elif command == "checkpoint":
                    self.write_checkpoint(Path(message["dir"]))
                elif command == "stop":
                    return 0
                else:
                    raise ProtocolError(f"{self.name}: unknown command {command!r}")
        except InterruptedError:
            return 0  # SIGTERM: leave quietly, the coordinator decides what happens next
        except (PeerClosed, ChannelClosed) as exc:
            if self.terminate:
                return 0
            # A neighbour's pipe closed: most likely a consequence of that neighbour's own
            # failure, which the coordinator is better placed to name.
            self._report(f"{exc}", consequence=True)
            return 1
        except InboxFailure as exc:  # a corrupt or stalled frame from a neighbour: our finding
            if self.terminate:
                return 0
            self._report(f"{exc}")
            return 1
        except Exception as exc:  # noqa: BLE001 - every failure must reach the coordinator
            if self.terminate:
                return 0  # SIGTERM interrupted whatever was in progress: a clean exit
            self._report(f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return 1
        finally:
            self.shutdown()

    def _report(self, message: str, trace: str = "", *, consequence: bool = False) -> None:
        sys.stderr.write(f"{self.name}: {message}\n{trace}")
        with contextlib.suppress(Exception):  # the coordinator may be gone already
            self.reply({"event": "error", "message": message, "traceback": trace,
                        "consequence": consequence})

    def shutdown(self) -> None:
        self.stopping.set()
        if self.digester is not None:
            self.digester.close()
        if self.reducer is not None:
            # It may be waiting in the inbox for a replica that is gone: wake it up first.
            self.inbox.fail(InterruptedError(f"{self.name} is shutting down"))
            self.reducer.close()
        if self.loader is not None:
            self.loader.stop()
        if self.heartbeat_thread is not None:
            self.heartbeat_thread.join()
        for receivers in (self.receivers, getattr(self, "receivers_control", None)):
            if receivers is not None:
                receivers.stop()
        for channel in self.channels.values():
            channel.close()
        self.close_control()

    def close_control(self) -> None:
        """Close the control channel (under MPI the worker still answers on it afterwards)."""
        self.control.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = PipeChannel(int(argv[0]), int(argv[1]), name="control")
    worker = Worker(control)

    def on_term(signum: int, frame: object) -> None:
        worker.terminate = True  # only the flag: the main thread acts on it

    signal.signal(signal.SIGTERM, on_term)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(int(os.environ.get("PIPETRAIN_BLAS_THREADS", "1"))):
        status = worker.serve()
    # Every thread this process started must be joined by now; say so if one was not.
    leftover = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if leftover:
        sys.stderr.write(f"{worker.name}: threads still alive at exit: {leftover}\n")
        return 4
    return status


if __name__ == "__main__":
    sys.exit(main())
