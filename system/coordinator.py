"""The coordinator: spawns the stage workers, drives the steps, writes the run directory.

::

                 ┌──────────── coordinator (this process) ─────────────┐
                 │ step k ──▶ every stage; waits for every step_done   │
                 └──┬──────────────────┬──────────────────┬────────────┘
              control pipe       control pipe       control pipe
                 ┌──▼──┐ activations ┌──▼──┐ activations ┌──▼──┐
                 │  0  │ ──────────▶ │  1  │ ──────────▶ │  2  │ (loss)
                 │     │ ◀────────── │     │ ◀────────── │     │
                 └─────┘  gradients  └─────┘  gradients  └─────┘

Steps run in lock-step: the coordinator sends ``step k`` to every stage and waits for all of their
``step_done`` replies (loss from the last stage) before the next step. The per-parameter gradient
digests come later in ``digests`` messages from the workers' helper threads; when the boundary
has nothing to do, ``step k + 1`` is sent before they arrive (``TrainingRun.may_run_ahead``).
Boundaries with no step in flight are where pauses, checkpoints and stops take effect. The main
thread only ever waits in ``poll`` on the control pipes, so a worker's death (end-of-file on its
control pipe) or error is seen at once and becomes a :class:`WorkerFailed`, never a hang.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import system
from system import checkpoint
from system.config import TrainConfig
from system.control import SignalControl
from system.digest import combine
from system.nn import parameter_names
from system.partition import layer_costs, measured_layer_costs, partition
from system.protocol import Kind, ProtocolError, decode_json, encode_json
from system.rundir import RunDir
from system.schedule import build as build_schedule
from system.schedule import validate as validate_schedule
from system.transport import ChannelClosed, ChannelTimeout, PipeChannel, open_pipe

STOP_GRACE_S = 3.0
ROOT_CAUSE_GRACE_S = 0.5


class WorkerFailed(RuntimeError):
    """A stage died, reported an error or stopped answering; the message names it."""


class Aborted(Exception):
    """The user insisted (a second SIGINT): stop now, without a checkpoint."""


@dataclass
class WorkerHandle:
    index: int
    layers: tuple[int, int]
    process: subprocess.Popen
    control: PipeChannel
    log_path: Path
    returncode: int | None = None
    last_error: str | None = field(default=None)
    last_seen: float = field(default_factory=time.monotonic)
    replica: int = 0
    replicated: bool = False

    @property
    def role(self) -> str:
        replica = f" replica {self.replica}" if self.replicated else ""
        return f"stage {self.index}{replica} (layers {self.layers[0]}-{self.layers[1] - 1})"


def _child_env(config: TrainConfig) -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(system.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    # BLAS threads are fixed before numpy loads in the child, for reproducible kernels.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(config.blas_threads)
    env["PIPETRAIN_BLAS_THREADS"] = str(config.blas_threads)
    return env


class Coordinator:
    # Whether a failed worker group can be replaced in place (--max-restarts). Processes this
    # coordinator spawned can; MPI ranks cannot (system.mpi_launch: the launcher restarts).
    restartable = True

    def __init__(self, config: TrainConfig, run: RunDir,
                 signals: SignalControl | None = None) -> None:
        self.config = config
        self.run = run
        self.signals = signals
        if config.balance == "time":
            microbatch = max(1, config.batch_size // (config.replicas * config.microbatches))
            costs = measured_layer_costs(list(config.layers), microbatch, config.dtype)
        else:
            costs = layer_costs(list(config.layers))
        self.bounds = partition(costs, config.stages)
        schedule = build_schedule(config.schedule, config.stages, config.microbatches)
        validate_schedule(schedule, config.stages, config.microbatches)
        self.workers: list[WorkerHandle] = []
        # Step results, filed by step and worker as they arrive: with the next step started
        # early (TrainingRun.may_run_ahead) a step_done can come before the previous step's
        # digests, which the workers' digest threads send whenever they are ready.
        self._done: dict[int, dict[int, dict[str, Any]]] = {}
        self._digests: dict[int, dict[int, list[str | None]]] = {}
        self.generation = 0  # how many worker groups were started: 0 first, then restarts
        self.op_timeout_s = max(60.0, 10 * config.heartbeat_timeout)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, resume_from: Path | None = None, start_step: int = 0) -> None:
        """Spawn every worker of the S x R grid with only its own fds, send each its init, and
        wait until all are ready.

        With ``resume_from`` (a verified checkpoint directory) every stage loads its parameters
        and optimizer state from it instead of initialising them from the seed.
        """
        stages, replicas = self.config.stages, self.config.replicas
        # Pipeline links (s, r) <-> (s+1, r): activations down, gradients up. Replica links
        # (s, r) <-> (s, r+1): the all-reduce chain. Each link is two one-way pipes.
        pipeline = {(s, r): (open_pipe(), open_pipe())
                    for s in range(stages - 1) for r in range(replicas)}
        chain = {(s, r): (open_pipe(), open_pipe())
                 for s in range(stages) for r in range(replicas - 1)}
        env = _child_env(self.config)
        try:
            for replica in range(replicas):
                for index, layers in enumerate(self.bounds):
                    fds: dict[str, int] = {}
                    if index > 0:
                        (act_r, _), (_, grad_w) = pipeline[index - 1, replica]
                        fds.update(up_in=act_r, up_out=grad_w)
                    if index < stages - 1:
                        (_, act_w), (grad_r, _) = pipeline[index, replica]
                        fds.update(down_in=grad_r, down_out=act_w)
                    if replica > 0:
                        (fwd_r, _), (_, back_w) = chain[index, replica - 1]
                        fds.update(prev_in=fwd_r, prev_out=back_w)
                    if replica < replicas - 1:
                        (_, fwd_w), (back_r, _) = chain[index, replica]
                        fds.update(next_in=back_r, next_out=fwd_w)
                    self.workers.append(self._spawn(index, replica, layers, fds, env,
                                                    resume_from, start_step))
        finally:
            for pair in (*pipeline.values(), *chain.values()):
                for read_fd, write_fd in pair:  # the children hold theirs; ours would hide EOFs
                    os.close(read_fd)
                    os.close(write_fd)
        self.collect("ready")
        self.generation += 1

    def _spawn(self, index: int, replica: int, layers: tuple[int, int], fds: dict[str, int],
               env: dict[str, str], resume_from: Path | None,
               start_step: int) -> WorkerHandle:
        to_child_r, to_child_w = open_pipe()
        from_child_r, from_child_w = open_pipe()
        log_path = self.log_path(index, replica)
        try:
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "system.worker", str(to_child_r), str(from_child_w)],
                    pass_fds=(to_child_r, from_child_w, *fds.values()),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        control = PipeChannel(from_child_r, to_child_w, name=f"control of stage {index}")
        handle = WorkerHandle(index, layers, process, control, log_path, replica=replica,
                              replicated=self.config.replicas > 1)
        self.send(handle, self.init_message(index, replica, layers, fds, resume_from,
                                            start_step))
        return handle

    def log_path(self, index: int, replica: int) -> Path:
        suffix = f"-replica-{replica}" if self.config.replicas > 1 else ""
        return self.run.path / "logs" / f"stage-{index}{suffix}.log"

    def init_message(self, index: int, replica: int, layers: tuple[int, int],
                     fds: dict[str, int], resume_from: Path | None,
                     start_step: int) -> dict[str, Any]:
        """What a worker is told first: who it is, its links (``fds``: pipe fds here, peer
        ranks under MPI) and where training starts."""
        return {
            "cmd": "init", "config": self.config.to_json(), "stage": index, "replica": replica,
            "num_stages": self.config.stages, "layers": list(layers), "fds": fds,
            "op_timeout_s": self.op_timeout_s,
            "resume_from": str(resume_from) if resume_from else None,
            "generation": self.generation,
            "start_step": start_step,
            "heartbeat_interval_s": min(1.0, self.config.heartbeat_timeout / 5),
            "heartbeat_timeout_s": self.config.heartbeat_timeout,
        }

    def shutdown(self, *, graceful: bool = True) -> list[WorkerHandle]:
        """Stop every worker, reap it and close its pipes; returns the handles, now exited.

        Graceful: a ``stop`` command, then SIGKILL after a grace period. Not graceful (after a
        failure, when nothing in the group can be trusted): SIGKILL at once, which is also what
        makes a restart fast.
        """
        for worker in self.workers:
            if worker.process.poll() is None:
                if graceful:
                    with contextlib.suppress(ChannelClosed, ChannelTimeout, ProtocolError, OSError):
                        self.send(worker, {"cmd": "stop"})
                else:
                    worker.process.kill()
        deadline = time.monotonic() + (STOP_GRACE_S if graceful else 0)
        for worker in self.workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.returncode = worker.process.returncode
            worker.control.close()
        stopped, self.workers = self.workers, []
        # A new group reports afresh (and the ids of new handles may even be reused).
        self._done.clear()
        self._digests.clear()
        return stopped

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self.workers]

    # -- messages ----------------------------------------------------------------------------

    def send(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        worker.control.send_frame(Kind.CONTROL, 0, 0, encode_json(message),
                                  timeout_s=self.op_timeout_s)

    def broadcast(self, message: dict[str, Any]) -> None:
        for worker in self.workers:
            try:
                self.send(worker, message)
            except (ChannelClosed, ChannelTimeout) as exc:
                raise self._failure(worker, str(exc)) from exc

    def collect(self, event: str) -> list[dict[str, Any]]:
        """Wait for ``event`` from every worker, failing fast if any dies or reports an error."""
        replies: dict[int, dict[str, Any]] = {}

        def handle(worker: WorkerHandle, message: dict[str, Any]) -> None:
            if message.get("event") != event or id(worker) in replies:
                raise self._failure(worker, f"expected {event}, got {message.get('event')}")
            replies[id(worker)] = message

        self.pump(handle, lambda: len(replies) == len(self.workers))
        return [replies[id(worker)] for worker in self.workers]

    def pump(self, handle: Callable[[WorkerHandle, dict[str, Any]], None],
             done: Callable[[], bool]) -> None:
        """Wait in ``poll`` on every control pipe and the signal pipe until ``done()``.

        Heartbeats are absorbed here; an error report, an end-of-file (the worker died) or a
        worker silent for longer than the heartbeat timeout raises :class:`WorkerFailed`; a
        second SIGINT raises :class:`Aborted`. Other messages go to ``handle``.
        """
        by_fd = {worker.control.fileno(): worker for worker in self.workers}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        if self.signals is not None:
            poller.register(self.signals.fileno(), select.POLLIN)
        while not done():
            ready = poller.poll(self._heartbeat_poll_ms())
            for fd, _ in ready:
                if fd not in by_fd:
                    self.check_signals()
                    continue
                worker = by_fd[fd]
                message = self.receive(worker)
                kind = message.get("event")
                if kind == "heartbeat":
                    continue
                if kind in ("digests", "step_done"):
                    store = self._digests if kind == "digests" else self._done
                    by_worker = store.setdefault(int(message["step"]), {})
                    if id(worker) in by_worker:
                        raise self._failure(worker, f"sent {kind} of step {message['step']} "
                                                    "twice")
                    by_worker[id(worker)] = message.get("digests", message)
                    continue
                if kind == "error":
                    worker.last_error = message.get("message")
                    if message.get("consequence"):
                        raise self._root_cause(worker)
                    raise self._failure(worker, worker.last_error or "unknown error")
                handle(worker, message)
            # Only workers with nothing waiting in their pipe can be silent: messages queued
            # while this loop was busy elsewhere are read first, so they never count as silence.
            self._check_heartbeats(skip={fd for fd, _ in ready})

    def _root_cause(self, reporter: WorkerHandle) -> WorkerFailed:
        """A worker lost a neighbour's pipe: blame the neighbour that died, if one did.

        Its exit closes its pipes an instant before it becomes reapable, so allow that instant.
        """
        deadline = time.monotonic() + ROOT_CAUSE_GRACE_S
        while True:
            dead = [w for w in self.workers if w is not reporter and w.process.poll() is not None]
            if dead:
                # Prefer a worker that found a problem itself, then one that died silently.
                words = [(w, *self._last_words(w)) for w in dead]
                words.sort(key=lambda item: {False: 0, None: 1, True: 2}[item[2]])
                worker, last_words, _ = words[0]
                return self._failure(worker, f"{last_words or 'exited without a word'}; "
                                     f"{reporter.role} lost its pipe as a result")
            if time.monotonic() > deadline:
                return self._failure(reporter, reporter.last_error or "unknown error")
            time.sleep(0.01)

    def _last_words(self, worker: WorkerHandle) -> tuple[str | None, bool | None]:
        """(error message, whether it was a consequence) a dead worker left in its pipe."""
        with contextlib.suppress(ChannelClosed, ChannelTimeout, ProtocolError, ValueError):
            while True:
                frame = worker.control.recv_frame(timeout_s=0.05)
                if frame.kind == Kind.CONTROL:
                    message = decode_json(frame.array)
                    if message.get("event") == "error":
                        worker.last_error = message.get("message")
                        return worker.last_error, bool(message.get("consequence"))
        return None, None

    def _heartbeat_poll_ms(self) -> int:
        oldest = min((worker.last_seen for worker in self.workers), default=time.monotonic())
        remaining = oldest + self.config.heartbeat_timeout - time.monotonic()
        return max(10, int(remaining * 1000) + 10)

    def _check_heartbeats(self, skip: set[int] = frozenset()) -> None:
        now = time.monotonic()
        # When several are silent, the one silent longest is the likeliest cause.
        for worker in sorted(self.workers, key=lambda w: w.last_seen):
            if worker.control.fileno() in skip:
                continue
            silent_s = now - worker.last_seen
            if silent_s > self.config.heartbeat_timeout:
                raise self._failure(
                    worker, f"no heartbeat for {silent_s:.1f}s (hung or frozen; "
                    f"--heartbeat-timeout is {self.config.heartbeat_timeout}s)")

    def check_signals(self) -> None:
        """Fold pending signals into requests; a second SIGINT aborts right away."""
        if self.signals is not None and self.signals.drain().abort:
            raise Aborted("aborted by a second interrupt")

    def receive(self, worker: WorkerHandle) -> dict[str, Any]:
        try:
            frame = worker.control.recv_frame(timeout_s=self.op_timeout_s)
        except ChannelClosed:
            raise self._failure(worker, "exited without a word") from None
        except (ChannelTimeout, ProtocolError) as exc:
            raise self._failure(worker, str(exc)) from exc
        worker.last_seen = time.monotonic()
        if frame.kind != Kind.CONTROL:
            raise self._failure(worker, f"sent a frame of kind {frame.kind} out of turn")
        return decode_json(frame.array)

    def _failure(self, worker: WorkerHandle, reason: str) -> WorkerFailed:
        code = worker.process.poll()
        if code is None and "exited" in reason:
            try:
                code = worker.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                code = None
        status = ""
        if code is not None:
            status = (f" (killed by signal {-code})" if code < 0 else f" (exit status {code})")
        return WorkerFailed(f"{worker.role}, pid {worker.process.pid}: {reason}{status}; "
                            f"log: {worker.log_path}")

    # -- training ----------------------------------------------------------------------------

    def start_step(self, step: int) -> None:
        self.broadcast({"cmd": "step", "step": step})

    def finish_step(self, step: int) -> tuple[float, list[dict[str, Any]]]:
        """Wait for every ``step_done`` of ``step``; the loss and the replies. The digests may
        still be on their way (:meth:`step_digest`), so the next step can start meanwhile."""
        self._wait_for(self._done, step, "step_done")
        done = self._done.pop(step)
        replies = [done[id(worker)] for worker in self.workers]
        loss = 0.0
        for worker, reply in zip(self.workers, replies, strict=True):
            if worker.index == self.config.stages - 1:  # workers are in replica order
                loss += float(reply["loss"])
        return loss, replies

    def step_digest(self, step: int) -> str:
        """The step's ``grad_digest``, once every worker has sent its share: per stage, per
        parameter, the digest made by replica ``position % R`` (they all hold the same
        all-reduced gradients), combined in canonical order."""
        self._wait_for(self._digests, step, "digests")
        shares = self._digests.pop(step)
        replicas = self.config.replicas
        parts: list[bytes] = []
        for index in range(self.config.stages):
            stage_shares = {worker.replica: shares[id(worker)] for worker in self.workers
                            if worker.index == index}
            for position in range(len(stage_shares[0])):
                digest = stage_shares[position % replicas][position]
                if digest is None:
                    raise WorkerFailed(f"no digest of parameter {position} of stage {index} "
                                       f"in step {step}")
                parts.append(bytes.fromhex(digest))
        return combine(parts)

    def _wait_for(self, store: dict[int, dict[int, Any]], step: int, what: str) -> None:
        def unexpected(worker: WorkerHandle, message: dict[str, Any]) -> None:
            raise self._failure(worker, f"expected {what} of step {step}, got "
                                        f"{message.get('event')}")

        self.pump(unexpected, lambda: len(store.get(step, ())) == len(self.workers))

    def gather_params(self) -> dict[str, np.ndarray]:
        """Every parameter, from replica 0's stages."""
        primary = [worker for worker in self.workers if worker.replica == 0]
        for worker in primary:
            try:
                self.send(worker, {"cmd": "params"})
            except (ChannelClosed, ChannelTimeout) as exc:
                raise self._failure(worker, str(exc)) from exc
        params: dict[str, np.ndarray] = {}
        answered: set[int] = set()

        def handle(worker: WorkerHandle, header: dict[str, Any]) -> None:
            if header.get("event") != "params" or worker.index in answered or worker.replica:
                raise self._failure(worker, f"expected params, got {header.get('event')}")
            # The worker sends its parameter frames right behind the header, under one lock.
            for position, name in enumerate(header["names"]):
                frame = worker.control.recv_frame(timeout_s=self.op_timeout_s)
                if frame.kind != Kind.PARAMETER or frame.microbatch != position:
                    raise self._failure(worker, f"bad parameter frame for {name}")
                params[name] = frame.array
            answered.add(worker.index)

        self.pump(handle, lambda: len(answered) == len(primary))
        return {name: params[name] for name in parameter_names(self.config.num_layers)}

    def checkpoint(self, step: int, epoch: int) -> Path:
        """Every stage writes its segment into a temporary directory, then it is committed."""
        tmp = checkpoint.begin(self.run.checkpoints, step)
        self.broadcast({"cmd": "checkpoint", "dir": str(tmp)})
        replies = self.collect("checkpointed")
        files = {reply["file"]: reply["sha256"] for reply in replies if "file" in reply}
        digests: dict[int, str] = {}
        for worker, reply in zip(self.workers, replies, strict=True):
            expected = digests.setdefault(worker.index, reply["params_digest"])
            if reply["params_digest"] != expected:
                raise self._failure(worker, f"parameters differ from replica 0's at step {step} "
                                    "(replicas drifted apart)")
        return checkpoint.commit(tmp, step=step, epoch=epoch, files=files,
                                 config=self.config.math_config(),
                                 config_digest=self.config.math_digest())


