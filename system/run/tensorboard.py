"""TensorBoard scalars of a run (``--tensorboard``), written by tensorboardX (the
``tensorboard`` extra) into ``RUN_DIR/tensorboard``: ``tensorboard --logdir RUN_DIR`` shows them.

Scalars, by step: ``train/loss``, ``train/samples_per_s``, ``eval/loss``, ``eval/accuracy``
and per stage ``stageN/compute_s``, ``stageN/wait_s``, ``stageN/allreduce_s``; each at the
event's own wall time.

tensorboardX writes from a thread of its own. The coordinator must stay the only thread that
can take a control signal (``pipetrain.runtime.signals``), so the writer is created with those
signals blocked: the thread inherits the mask and the kernel leaves the signals to the main
thread.
"""

from __future__ import annotations

import signal
from pathlib import Path

from pipetrain.run.metrics import Event, RateWindow, stage_timings
from pipetrain.status import UserError
from pipetrain.threads import HELPER_BLOCKED

INSTALL_HINT = "pip install 'pipetrain[tensorboard]'"


class TensorBoardScalars:
    def __init__(self, log_dir: Path) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UserError(f"--tensorboard needs tensorboardX ({INSTALL_HINT})") from None
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELPER_BLOCKED)
        try:
            self.writer = SummaryWriter(logdir=str(log_dir), flush_secs=5)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.batch_size = 1
        self.rate = RateWindow()
        self.step = 0

    def __call__(self, event: Event) -> None:
        name, t = event.get("event"), event.get("t")
        if name == "run_start":
            self.batch_size = int((event.get("config") or {}).get("batch_size", 1))
        elif name == "step":
            self.step = step = event["step"]
            self.rate.add(t, step)
            self.writer.add_scalar("train/loss", event["loss"], step, walltime=t)
            steps_per_s = self.rate.steps_per_s()
            if steps_per_s is not None:
                self.writer.add_scalar("train/samples_per_s", steps_per_s * self.batch_size,
                                       step, walltime=t)
            for stage, timing in stage_timings(event.get("metrics")).items():
                for key, value in timing.items():
                    self.writer.add_scalar(f"stage{stage}/{key}", value, step, walltime=t)
        elif name == "evaluate":
            for key in ("loss", "accuracy"):
                if event.get(key) is not None:
                    self.writer.add_scalar(f"eval/{key}", event[key], event.get("step",
                                                                                self.step),
                                           walltime=t)
        elif name == "paused":
            self.rate.pause(t)
        elif name == "resumed":
            self.rate.resume(t)

    def close(self) -> None:
        self.writer.close()
