"""The distributed training run: the step loop around the coordinator.

Between two steps (a *step boundary*) the loop acts on what the signals asked for, in this order:
abort (a second SIGINT: exit 130 at once), pause (SIGTSTP: every process idle until SIGCONT),
checkpoint (SIGUSR1, or periodic), stop (SIGTERM / SIGINT: checkpoint, exit 0), and at the end of
an epoch, epoch-stop (SIGUSR2: checkpoint, exit 0). Nothing happens inside a step, so every
checkpoint is consistent: all stages hold the parameters of the same step.

A failed worker is replaced in place (``pipetrain.runtime.recovery``): the others keep running,
and the run continues from the last step (R >= 2) or at most one step earlier (R = 1). When that
is impossible (the in-memory state is gone) the whole group restarts from the newest intact
checkpoint, as it does under MPI through the launcher's own loop. A worker that fails before it
is ready fails the run at once (no restart would help), and so does a write the run directory
cannot take (a full disk): one line naming the file, the half-written checkpoint removed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipetrain import hooks, tracing
from pipetrain.config import TrainConfig
from pipetrain.data.workload import Workload
from pipetrain.nn.digest import DIGEST
from pipetrain.run import checkpoint
from pipetrain.run.lock import start_ticks
from pipetrain.run.metrics import EpochLosses
from pipetrain.run.observers import observe
from pipetrain.run.progress import Progress
from pipetrain.run.rundir import RunDir, read_events, save_params
from pipetrain.run.storage import StorageError
from pipetrain.run.trace_file import finish_recording, start_recording
from pipetrain.runtime.control_loop import Aborted
from pipetrain.runtime.coordinator import Coordinator
from pipetrain.runtime.courier import CourierError
from pipetrain.runtime.diagnosis import StartupFailed, WorkerFailed
from pipetrain.runtime.launcher import Launcher, PipeLauncher
from pipetrain.runtime.proctitle import set_title
from pipetrain.runtime.recovery import RecoveryImpossible
from pipetrain.runtime.signals import SignalControl, signal_control
from pipetrain.runtime.snapshot import SnapshotError
from pipetrain.status import ExitCode, RunState
from pipetrain.training.evaluate import held_out_params, load_workload
from pipetrain.training.resume import dataset_digest, resume_point

STATE_UPDATE_INTERVAL_S = 0.5
# Builds the launcher of a run from its config: pipes by default, MPI ranks under mpirun.
LauncherFactory = Callable[[TrainConfig], Launcher]


def pipe_launcher(config: TrainConfig) -> Launcher:
    return PipeLauncher(config.blas_threads)


class TrainingRun:
    def __init__(self, config: TrainConfig, run: RunDir, signals: SignalControl,
                 workload: Workload, progress: Progress, launcher: Launcher) -> None:
        self.config = config
        self.run = run
        self.signals = signals
        self.workload = workload
        self.progress = progress
        self.launcher = launcher
        signals.requests.cont_checkpoints = launcher.cont_checkpoints
        self.coordinator = Coordinator(config, run, signals, launcher)
        self.last_checkpoint_step: int | None = None
        self.step = 0
        self.emitted_step = 0  # the last step whose event is written
        self.restarts = 0
        self.pending_restart: dict | None = None
        self._state_written = 0.0
        # The epoch's mean training loss; a resumed run's epoch began in the earlier launch.
        self.epoch_losses = EpochLosses(workload.steps_per_epoch)
        if run.events_path.exists():
            self.epoch_losses.prime(read_events(run.path))
        self._rate_window = (time.monotonic(), 0)

    # -- boundaries --------------------------------------------------------------------------

    def write_checkpoint(self, step: int) -> None:
        if self.last_checkpoint_step == step:
            return
        epoch = step // self.workload.steps_per_epoch
        with tracing.current().span("checkpoint", tracing.CHECKPOINT, {"step": step}):
            path = self.coordinator.checkpoint(step, epoch)
        checkpoint.prune(self.run.checkpoints, self.config.keep_checkpoints)
        self.last_checkpoint_step = step
        relative = str(path.relative_to(self.run.path))
        self.run.emit("checkpoint", step=step, epoch=epoch, path=relative)
        self.run.update_state(last_checkpoint=relative)

    def wait_while_paused(self, step: int) -> None:
        requests = self.signals.requests
        self.run.emit("paused", step=step)
        self.run.update_state(state=RunState.PAUSED, step=step)

        def unexpected(worker, message) -> None:
            raise WorkerFailed(f"{worker.role} sent {message.TYPE} while paused")

        # The same wait as during a step: heartbeats keep arriving and are absorbed, a worker
        # that dies or goes silent while paused is still a failure, signals wake us at once.
        self.coordinator.pump(unexpected, lambda: not requests.paused or requests.stop)
        requests.paused = False
        self.run.emit("resumed", step=step)
        self.run.update_state(state=RunState.RUNNING)

    def at_boundary(self, step: int) -> bool:
        """Act on pending requests; True when the run should stop here."""
        hooks.current().at_boundary(step)
        self.coordinator.check_signals()
        requests = self.signals.requests
        if requests.paused and not requests.stop:
            self.wait_while_paused(step)
        if requests.checkpoint:
            self.write_checkpoint(step)
            requests.checkpoint = False  # only once written: a failure in between keeps it
        epoch_done = step > 0 and step % self.workload.steps_per_epoch == 0
        if requests.stop or (requests.epoch_stop and epoch_done):
            self.write_checkpoint(step)
            reason = "signal" if requests.stop else "epoch_stop"
            self.run.emit("stop", step=step, reason=reason)
            return True
        return False

    # -- failures ----------------------------------------------------------------------------

    def supervise(self, start_step: int, resume_from: Path | None) -> RunState:
        """Train, recovering from worker failures up to max_restarts times."""
        step, group_start = start_step, True
        while True:
            try:
                if group_start:
                    self.coordinator.start(resume_from=resume_from, start_step=step)
                    self.record_workers()
                    if not (self.run.path / "initial.npz").exists():
                        save_params(self.run.path / "initial.npz",
                                    self.coordinator.gather_params())
                    if self.restarts == 0:
                        self.run.emit("run_start", command="train",
                                      total_steps=self.workload.total_steps, from_step=step,
                                      config=self.config.to_json(),
                                      segments=[list(b) for b in self.coordinator.bounds])
                return self.train(step)
            except StartupFailed:
                raise
            except WorkerFailed as exc:
                step, group_start, resume_from = self.recover(exc)

    def recover(self, exc: WorkerFailed) -> tuple[int, bool, Path | None]:
        """After ``exc``: replace the failed worker in place, or else restart the group from
        the newest checkpoint. Returns (the step to continue after, whether the group was
        restarted, the checkpoint it starts from)."""
        failed_at = time.monotonic()
        if not self.launcher.restartable:  # MPI: the launcher's loop restarts
            self.report_exits(self.coordinator.shutdown(graceful=False))
            raise WorkerFailed(
                f"{exc} (--transport {self.config.transport} does not restart ranks in "
                "place: run the same command with --resume to continue from the "
                "newest checkpoint)") from exc
        if self.restarts >= self.config.max_restarts:
            self.report_exits(self.coordinator.shutdown(graceful=False))
            raise WorkerFailed(f"{exc} (after {self.restarts} restart(s); --max-restarts is "
                               f"{self.config.max_restarts})") from exc
        self.restarts += 1
        lost_from = self.emitted_step
        self.run.update_state(state=RunState.RECOVERING, restarts=self.restarts)
        pending = {"cause": str(exc), "restart": self.restarts, "failed_at": failed_at}
        fallback = None
        if self.launcher.replaceable:
            try:
                outcome = self.coordinator.recover(exc, lost_from)
            except StartupFailed:
                raise
            except (WorkerFailed, RecoveryImpossible, SnapshotError, CourierError,
                    OSError) as why:
                fallback = str(why)
            else:
                self.report_exits(self.coordinator.take_departed())
                self.record_workers()
                roles = ", ".join(worker.role for worker in outcome.replaced)
                self.progress.message(f"{exc}; replaced {roles}, continuing after step "
                                      f"{outcome.step} (restart {self.restarts} of "
                                      f"{self.config.max_restarts})")
                self.pending_restart = {
                    **pending, "from_step": outcome.step, "steps_lost": lost_from - outcome.step,
                    "mode": "in_place", "replaced": [w.role for w in outcome.replaced],
                    "state_from": sorted(set(outcome.sources.values())),
                    "survivor_steps": outcome.survivor_steps}
                return outcome.step, False, None
        departed = self.coordinator.take_departed()
        self.report_exits(departed + [worker for worker in self.coordinator.shutdown(
            graceful=False) if all(worker is not gone for gone in departed)])
        manifest, refused = checkpoint.find_intact(self.run.checkpoints)
        for reason in refused:
            print(f"pipetrain: refusing checkpoint: {reason}", file=sys.stderr)
        step = manifest.step if manifest else 0
        self.last_checkpoint_step = step if manifest else None
        why = f" (in place impossible: {fallback})" if fallback else ""
        self.progress.message(f"{exc}; restarting every worker from step {step}{why} "
                              f"(restart {self.restarts} of {self.config.max_restarts})")
        self.pending_restart = {**pending, "from_step": step, "steps_lost": lost_from - step,
                                "mode": "group", "state_from": ["checkpoint" if manifest
                                                                else "initial"]}
        return step, True, manifest.path if manifest else None

    def record_workers(self) -> None:
        self.run.update_state(state=RunState.RUNNING, worker_pids=self.coordinator.pids,
                              **self.launcher.state_fields(self.coordinator.workers))

    def report_exits(self, workers) -> None:
        for worker in workers:
            self.run.emit("worker_exit", pid=worker.process.pid, role=worker.role,
                          returncode=worker.returncode, error=worker.last_error)

    def report_recovery(self) -> None:
        """The ``restart`` event, once the new group has completed its first step: the recovery
        time it reports runs from the failure being seen to that first step done."""
        pending, self.pending_restart = self.pending_restart, None
        recovery_s = time.monotonic() - pending.pop("failed_at")
        self.run.emit("restart", recovery_s=round(recovery_s, 6), **pending)
        # Only now: a spare starting up would slow the first step the recovery time includes.
        self.launcher.keep_spare(self.run.path / "logs", self.coordinator.generation)

    # -- the loop ----------------------------------------------------------------------------

    def train(self, start_step: int) -> RunState:
        config, workload, run = self.config, self.workload, self.run
        steps_per_epoch, total = workload.steps_per_epoch, workload.total_steps
        step = start_step
        started = None  # a step already sent to the workers, ahead of its boundary
        trace = tracing.current()
        while True:
            # A boundary is acted on only when no step is in flight: a checkpoint or a pause
            # must see the parameters of the step it is labelled with.
            if started is None:
                if self.at_boundary(step):
                    return RunState.STOPPED
                if step == total:
                    return RunState.DONE
            step += 1
            self.step = step
            epoch = (step - 1) // steps_per_epoch
            if started != step:
                self.start_step(step)
            span_ns = trace.start()
            loss, replies = self.coordinator.finish_step(step)
            trace.end(f"wait step {step}", tracing.WAIT, span_ns, {"step": step})
            started = None
            if self.may_run_ahead(step):
                # Start the next step before this one's digests are in: the workers hash the
                # gradients on helper threads while the next step already runs.
                started = step + 1
                self.start_step(started)
            span_ns = trace.start()
            digest = self.coordinator.step_digest(step)
            trace.end("wait digests", tracing.WAIT, span_ns, {"step": step})
            if self.pending_restart is not None:
                self.report_recovery()
            metrics = [{"stage": worker.index, "replica": worker.replica, **reply.metrics()}
                       for worker, reply in zip(self.coordinator.workers, replies, strict=True)]
            run.emit("step", epoch=epoch, step=step, loss=loss, grad_digest=digest,
                     metrics=metrics)
            self.emitted_step = step
            self.epoch_losses.add(step, loss)
            self._note_progress(step, epoch, loss)
            if step % steps_per_epoch == 0:
                run.emit("epoch_end", epoch=epoch, step=step, loss=loss,
                         mean_loss=self.epoch_losses.mean(epoch))
                with trace.span("evaluate", tracing.CONTROL, {"step": step}):
                    scores = held_out_params(self.coordinator.gather_params(), config, workload)
                run.emit("evaluate", epoch=epoch, step=step, **scores)
                run.update_state(epoch=epoch + 1, accuracy=scores.get("accuracy"),
                                 eval_loss=scores["loss"], durable=False)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                self.write_checkpoint(step)

    def start_step(self, step: int) -> None:
        with tracing.current().span("send step", tracing.CONTROL, {"step": step}):
            self.coordinator.start_step(step)

    def may_run_ahead(self, step: int) -> bool:
        """Whether step ``step + 1`` may start before step ``step``'s boundary is handled: only
        when that boundary has nothing to do (no epoch end, no periodic checkpoint, no pending
        signal). A signal that arrives later is acted on at the next quiet boundary."""
        if step >= self.workload.total_steps or step % self.workload.steps_per_epoch == 0:
            return False
        if self.config.checkpoint_every and step % self.config.checkpoint_every == 0:
            return False
        if hooks.current().quiet_boundary(step):
            return False
        self.coordinator.check_signals()
        requests = self.signals.requests
        return not (requests.paused or requests.checkpoint or requests.stop)

    def _note_progress(self, step: int, epoch: int, loss: float) -> None:
        now = time.monotonic()
        last = step == self.workload.total_steps
        if now - self._state_written < STATE_UPDATE_INTERVAL_S and not last:
            return
        started, first_step = self._rate_window
        rate = None
        if first_step:
            rate = (step - first_step) * self.config.batch_size / (now - started)
        self._rate_window = (now, step)
        self._state_written = now
        self.run.update_state(step=step, epoch=epoch, last_loss=loss, samples_per_s=rate,
                              durable=False)


def run_training(config: TrainConfig, run_dir: Path, *, quiet: bool = False,
                 resume: bool = False, launcher_factory: LauncherFactory = pipe_launcher,
                 tensorboard: bool = False, workload: Workload | None = None) -> int:
    """The run; ``launcher_factory`` builds its launcher (``pipetrain.training.mpi_run`` passes
    one whose workers are the MPI ranks). ``workload``: the config's data, if already loaded
    and checked. Off the main thread there is no signal control (signals cannot be handled
    there): the run goes on to its end and says so."""
    with signal_control() as signals:
        if workload is None:  # bad data is refused before any run directory exists
            workload = load_workload(config)
        with RunDir(run_dir) as run:
            set_title(f"pipetrain: coordinator {run_dir}")
            if config.trace:
                start_recording(run.path)
            progress = observe(run, quiet=quiet, tensorboard=tensorboard)
            if not signals.installed:
                print("pipetrain: not on the main thread: running without signal control "
                      "(pause, checkpoint and stop requests are not heard)", file=sys.stderr)
            training = TrainingRun(config, run, signals, workload, progress,
                                   launcher_factory(config))
            return _run(training, resume)


def _run(training: TrainingRun, resume: bool) -> int:
    config, run, workload = training.config, training.run, training.workload
    coordinator = training.coordinator
    coordinator.data_digest = dataset_digest(config)
    manifest = resume_point(run, config, coordinator.data_digest) if resume else None
    start_step = manifest.step if manifest else 0
    try:
        checkpoint.remove_stale_temporaries(run.checkpoints)
        run.update_state(
            command="train", state=RunState.STARTING, config=config.to_json(),
            config_digest=config.math_digest(), grad_digest_hash=DIGEST,
            coordinator_pid=os.getpid(),
            coordinator_start_ticks=start_ticks(os.getpid()), worker_pids=[],
            step=start_step, epoch=start_step // workload.steps_per_epoch,
            total_steps=workload.total_steps, segments=[list(b) for b in coordinator.bounds],
        )
        if manifest is not None:
            training.last_checkpoint_step = manifest.step
        training.step = training.emitted_step = start_step
        outcome = training.supervise(start_step, manifest.path if manifest else None)
        if outcome == RunState.DONE:
            save_params(run.path / "final.npz", coordinator.gather_params())
        run.emit("run_end", status=outcome, step=training.step)
        run.update_state(state=outcome, step=training.step)
        return ExitCode.OK
    except WorkerFailed as exc:
        message = f"run failed: {exc}"
        run.emit("error", message=message)
        run.emit("run_end", status=RunState.FAILED)
        run.update_state(state=RunState.FAILED, error=message)
        print(f"pipetrain: {message}", file=sys.stderr)
        return ExitCode.FAILED
    except StorageError as exc:
        message = f"run failed: {exc}"
        # Say so wherever the disk still lets us (the events file may be the full one).
        with contextlib.suppress(StorageError):
            run.emit("error", message=message)
            run.emit("run_end", status=RunState.FAILED, step=training.emitted_step)
        with contextlib.suppress(StorageError):
            run.update_state(state=RunState.FAILED, error=message)
        print(f"pipetrain: {message}", file=sys.stderr)
        return ExitCode.FAILED
    except Aborted:
        run.emit("run_end", status=RunState.ABORTED)
        run.update_state(state=RunState.ABORTED)
        print("pipetrain: aborted (second interrupt); no checkpoint written", file=sys.stderr)
        return ExitCode.ABORTED
    finally:
        with contextlib.suppress(StorageError):  # a full disk: the workers still go
            training.report_exits(coordinator.shutdown())
        training.launcher.close()
        if config.trace:  # every worker has written its file by now (it exited)
            finish_recording(run.path)
