"""The distributed training run: the step loop around the coordinator.

Between two steps (a *step boundary*) the loop acts on what the signals asked for, in this order:
abort (a second SIGINT: exit 130 at once), pause (SIGTSTP: every process idle until SIGCONT),
checkpoint (SIGUSR1, or periodic), stop (SIGTERM / SIGINT: checkpoint, exit 0), and at the end of
an epoch, epoch-stop (SIGUSR2: checkpoint, exit 0). Nothing happens inside a step, so every
checkpoint is consistent: all stages hold the parameters of the same step.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipetrain import hooks
from pipetrain.config import ConfigError, TrainConfig
from pipetrain.data.workload import Workload
from pipetrain.run import checkpoint
from pipetrain.run.metrics import EpochLosses
from pipetrain.run.observers import observe
from pipetrain.run.progress import Progress
from pipetrain.run.rundir import RunDir, read_events, save_params
from pipetrain.runtime.coordinator import Aborted, Coordinator
from pipetrain.runtime.diagnosis import WorkerFailed
from pipetrain.runtime.launcher import Launcher, PipeLauncher
from pipetrain.runtime.proctitle import set_title
from pipetrain.runtime.signals import SignalControl, signal_control
from pipetrain.status import ExitCode, RunState
from pipetrain.train.evaluate import held_out_params, load_workload

STATE_UPDATE_INTERVAL_S = 0.5
# Builds the launcher of a run from its config: pipes by default, MPI ranks under mpirun.
LauncherFactory = Callable[[TrainConfig], Launcher]


def pipe_launcher(config: TrainConfig) -> Launcher:
    return PipeLauncher(config.blas_threads)


def resume_point(run: RunDir, config: TrainConfig) -> checkpoint.Manifest | None:
    """The newest intact checkpoint (damaged ones are reported and skipped)."""
    manifest, refused = checkpoint.find_intact(run.checkpoints)
    for reason in refused:
        print(f"pipetrain: refusing checkpoint: {reason}", file=sys.stderr)
    if manifest is not None:
        differing = checkpoint.config_differences(manifest, config.math_config())
        if "epochs" in differing and config.epochs >= manifest.config.get("epochs", 0):
            # More epochs only add steps: batches are pure functions of (seed, epoch, step),
            # so the steps done so far are the same either way.
            differing.remove("epochs")
        if differing:
            raise ConfigError(
                f"{manifest.path}: written with a different config (differing keys: "
                f"{', '.join(differing)}); resume with the same values or use a new --run-dir"
            )
    return manifest


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
            requests.checkpoint = False
            self.write_checkpoint(step)
        epoch_done = step > 0 and step % self.workload.steps_per_epoch == 0
        if requests.stop or (requests.epoch_stop and epoch_done):
            self.write_checkpoint(step)
            reason = "signal" if requests.stop else "epoch_stop"
            self.run.emit("stop", step=step, reason=reason)
            return True
        return False

    # -- failures ----------------------------------------------------------------------------

    def supervise(self, start_step: int, resume_from: Path | None) -> RunState:
        """Train, restarting the whole worker group after a failure, up to max_restarts."""
        step = start_step
        while True:
            try:
                self.coordinator.start(resume_from=resume_from, start_step=step)
                self.run.update_state(state=RunState.RUNNING, worker_pids=self.coordinator.pids,
                                      **self.launcher.state_fields(self.coordinator.workers))
                if not (self.run.path / "initial.npz").exists():
                    save_params(self.run.path / "initial.npz", self.coordinator.gather_params())
                if self.restarts == 0:
                    self.run.emit("run_start", command="train",
                                  total_steps=self.workload.total_steps, from_step=step,
                                  config=self.config.to_json(),
                                  segments=[list(b) for b in self.coordinator.bounds])
                return self.train(step)
            except WorkerFailed as exc:
                failed_at = time.monotonic()
                self.report_exits(self.coordinator.shutdown(graceful=False))
                if not self.launcher.restartable:  # MPI: the launcher's loop restarts
                    raise WorkerFailed(
                        f"{exc} (--transport {self.config.transport} does not restart ranks in "
                        "place: run the same command with --resume to continue from the "
                        "newest checkpoint)") from exc
                if self.restarts >= self.config.max_restarts:
                    raise WorkerFailed(
                        f"{exc} (after {self.restarts} restart(s); --max-restarts is "
                        f"{self.config.max_restarts})") from exc
                self.restarts += 1
                manifest, refused = checkpoint.find_intact(self.run.checkpoints)
                for reason in refused:
                    print(f"pipetrain: refusing checkpoint: {reason}", file=sys.stderr)
                step = manifest.step if manifest else 0
                resume_from = manifest.path if manifest else None
                self.last_checkpoint_step = step if manifest else None
                self.run.update_state(state=RunState.RECOVERING, restarts=self.restarts)
                self.progress.message(f"{exc}; restarting from step {step} "
                                      f"(restart {self.restarts} of {self.config.max_restarts})")
                self.pending_restart = {"from_step": step, "cause": str(exc),
                                        "restart": self.restarts, "failed_at": failed_at}

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

    # -- the loop ----------------------------------------------------------------------------

    def train(self, start_step: int) -> RunState:
        config, workload, run = self.config, self.workload, self.run
        steps_per_epoch, total = workload.steps_per_epoch, workload.total_steps
        step = start_step
        started = None  # a step already sent to the workers, ahead of its boundary
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
                self.coordinator.start_step(step)
            loss, replies = self.coordinator.finish_step(step)
            started = None
            if self.may_run_ahead(step):
                # Start the next step before this one's digests are in: the workers hash the
                # gradients on helper threads while the next step already runs.
                started = step + 1
                self.coordinator.start_step(started)
            digest = self.coordinator.step_digest(step)
            if self.pending_restart is not None:
                self.report_recovery()
            metrics = [{"stage": worker.index, "replica": worker.replica, **reply.metrics()}
                       for worker, reply in zip(self.coordinator.workers, replies, strict=True)]
            run.emit("step", epoch=epoch, step=step, loss=loss, grad_digest=digest,
                     metrics=metrics)
            self.epoch_losses.add(step, loss)
            self._note_progress(step, epoch, loss)
            if step % steps_per_epoch == 0:
                run.emit("epoch_end", epoch=epoch, step=step, loss=loss,
                         mean_loss=self.epoch_losses.mean(epoch))
                scores = held_out_params(self.coordinator.gather_params(), config, workload)
                run.emit("evaluate", epoch=epoch, step=step, **scores)
                run.update_state(epoch=epoch + 1, accuracy=scores.get("accuracy"),
                                 eval_loss=scores["loss"], durable=False)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                self.write_checkpoint(step)

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
    """The run; ``launcher_factory`` builds its launcher (``pipetrain.train.mpi_run`` passes
    one whose workers are the MPI ranks). ``workload``: the config's data, if already loaded
    and checked. Off the main thread there is no signal control (signals cannot be handled
    there): the run goes on to its end and says so."""
    with signal_control() as signals:
        if workload is None:  # bad data is refused before any run directory exists
            workload = load_workload(config)
        with RunDir(run_dir) as run:
            set_title(f"pipetrain: coordinator {run_dir}")
            progress = observe(run, quiet=quiet, tensorboard=tensorboard)
            if not signals.installed:
                print("pipetrain: not on the main thread: running without signal control "
                      "(pause, checkpoint and stop requests are not heard)", file=sys.stderr)
            training = TrainingRun(config, run, signals, workload, progress,
                                   launcher_factory(config))
            return _run(training, resume)


def _run(training: TrainingRun, resume: bool) -> int:
    config, run, workload = training.config, training.run, training.workload
    checkpoint.remove_stale_temporaries(run.checkpoints)
    manifest = resume_point(run, config) if resume else None
    start_step = manifest.step if manifest else 0
    coordinator = training.coordinator
    run.update_state(
        command="train", state=RunState.STARTING, config=config.to_json(),
        config_digest=config.math_digest(), coordinator_pid=os.getpid(), worker_pids=[],
        step=start_step, epoch=start_step // workload.steps_per_epoch,
        total_steps=workload.total_steps, segments=[list(b) for b in coordinator.bounds],
    )
    try:
        if manifest is not None:
            training.last_checkpoint_step = manifest.step
        training.step = start_step
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
    except Aborted:
        run.emit("run_end", status=RunState.ABORTED)
        run.update_state(state=RunState.ABORTED)
        print("pipetrain: aborted (second interrupt); no checkpoint written", file=sys.stderr)
        return ExitCode.ABORTED
    finally:
        training.report_exits(coordinator.shutdown())
