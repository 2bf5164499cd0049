"""The run on the terminal, drawn from its events (a listener of :class:`RunDir`).

On a terminal, one progress line drawn with rich: bar, step, epoch, loss, recent samples/s
(pauses excluded, see ``pipetrain.run.metrics``), elapsed time and ETA. rich clears and redraws
it in place, so nothing is left behind, and prints every other line (epochs, checkpoints,
pauses, restarts, a stop with the command that resumes it, and anything else written to
stderr meanwhile) above it. Not on a terminal (a log file, CI, a notebook), the same lines
come plain, without the bar. ``quiet`` prints nothing: the caller still prints the run
directory.

The line is redrawn from the step events, at most ten times a second, never by a timer: a
refresh thread would be a second thread in the coordinator, which must stay the only one that
can take a control signal (``pipetrain.runtime.signals``).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from pipetrain.run.metrics import Event, RateWindow

REDRAW_S = 0.1


def duration(seconds: float | None) -> str:
    """``0:07``, ``12:03``, ``1:02:03``; ``-:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


class Progress:
    """Renders a run's events. Call it with each event; ``close()`` at the end."""

    def __init__(self, run_dir: str | Path, *, quiet: bool = False,
                 stream: TextIO | None = None, live: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.live = (not quiet and self.stream.isatty()) if live is None else live
        self.rate = RateWindow()
        self.command = "train"
        self.total = 0
        self.epochs = 1
        self.batch_size = 1
        self.step = 0
        self.loss: float | None = None
        self.started = time.time()  # this launch's start: elapsed and wall time count from it
        self.mean_loss: dict[int, float] = {}
        self.evaluations: list[Event] = []
        self.last_step_seen = 0
        self.paused_at: float | None = None
        self._drawn = 0.0
        self._live: Any = None  # rich.live.Live while the bar is shown
        self._bar: Any = None

    # -- output ------------------------------------------------------------------------------

    def message(self, text: str) -> None:
        """A line of its own (above the bar, which stays)."""
        if self.quiet:
            return
        if self._live is not None:
            self._live.console.print(text, highlight=False, markup=False, soft_wrap=True)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.stream, stderr=True)
        # transient: the bar is erased when the run ends; stderr written by anything else
        # (a refused checkpoint, a warning) goes above it instead of into it.
        self._live = Live(console=console, auto_refresh=False, transient=True,
                          redirect_stdout=False, redirect_stderr=True)
        self._live.start()

    def _draw(self, now: float, force: bool = False) -> None:
        if self._live is None or (not force and now - self._drawn < REDRAW_S):
            return
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        self._drawn = now
        steps_per_s = self.rate.steps_per_s()
        samples = "-" if steps_per_s is None else f"{steps_per_s * self.batch_size:,.0f}"
        eta = (self.total - self.step) / steps_per_s if steps_per_s else None
        epoch = min(self.epochs, (self.step - 1) // self.steps_per_epoch + 1) if self.step else 1
        line = Table.grid(padding=(0, 1))
        line.add_row(
            ProgressBar(total=max(self.total, 1), completed=self.step, width=24),
            f"step {self.step}/{self.total}", f"epoch {epoch}/{self.epochs}",
            f"loss {_number(self.loss)}", f"{samples} samples/s",
            f"{duration(now - self.started)} elapsed", f"ETA {duration(eta)}")
        self._live.update(line, refresh=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.total // max(self.epochs, 1))

    # -- events ------------------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        handler = getattr(self, f"on_{event.get('event')}", None)
        if handler is not None:
            handler(event)
        if event.get("event") != "step" and self._live is not None:
            self._draw(event["t"], force=True)  # a throttled bar may show an older step

    def on_run_start(self, event: Event) -> None:
        config = event.get("config") or {}
        self.command = event.get("command", "train")
        self.total = int(event.get("total_steps", 0))
        self.epochs = int(config.get("epochs", 1))
        self.batch_size = int(config.get("batch_size", 1))
        self.step = self.last_step_seen = int(event.get("from_step", 0))
        where = (f"{config.get('stages')} stage(s) x {config.get('replicas')} replica(s)"
                 if self.command == "train" else "one process")
        start = f", from step {self.step}" if self.step else ""
        self.message(f"{self.command}: {self.total} steps ({self.epochs} epochs of "
                     f"{self.steps_per_epoch}), {where}{start}")
        if self.live and self._live is None:
            self._start_live()

    def on_step(self, event: Event) -> None:
        self.step, self.loss = event["step"], event.get("loss")
        self.last_step_seen = max(self.last_step_seen, self.step)
        self.rate.add(event["t"], self.step)
        self._draw(event["t"], force=self.step == self.total)

    def on_epoch_end(self, event: Event) -> None:
        self.mean_loss[event["epoch"]] = event.get("mean_loss", event.get("loss"))

    def on_evaluate(self, event: Event) -> None:
        epoch = event["epoch"]
        again = any(e["epoch"] == epoch for e in self.evaluations)
        self.evaluations.append(event)
        accuracy = event.get("accuracy")
        metric = "" if accuracy is None else f"  accuracy {_number(accuracy)}"
        self.message(f"epoch {epoch + 1}/{self.epochs}  train loss "
                     f"{_number(self.mean_loss.get(epoch))}  held-out loss "
                     f"{_number(event.get('loss'))}{metric}"
                     + ("  (run again after the restart)" if again else ""))

    def on_checkpoint(self, event: Event) -> None:
        self.message(f"checkpoint at step {event['step']}: {self.run_dir / event['path']}")

    def on_paused(self, event: Event) -> None:
        self.rate.pause(event["t"])
        self.paused_at = event["t"]
        self.message(f"paused at step {event['step']} (`pipetrain resume {self.run_dir}` or "
                     "SIGCONT to go on)")

    def on_resumed(self, event: Event) -> None:
        self.rate.resume(event["t"])
        waited = event["t"] - (self.paused_at or event["t"])
        self.message(f"resumed at step {event['step']} after {waited:.1f} s paused")

    def on_restart(self, event: Event) -> None:
        lost = event.get("steps_lost")
        if lost is None:  # the steps done before the failure that the restart repeats
            lost = max(0, self.last_step_seen - event["from_step"])
        self.message(f"restarted from step {event['from_step']} (restart "
                     f"{event.get('restart', '?')}): {lost} step(s) lost, recovered in "
                     f"{event.get('recovery_s', 0.0):.2f} s")

    def on_stop(self, event: Event) -> None:
        why = "end of epoch, as asked" if event.get("reason") == "epoch_stop" else "on request"
        self.message(f"stopped at step {event['step']} ({why}); continue with: "
                     f"pipetrain {self.command} --resume --run-dir {self.run_dir}")

    def on_run_end(self, event: Event) -> None:
        self._draw(event["t"], force=True)
        self.close()
        status = event.get("status")
        if status not in ("done", "stopped"):
            return  # a failure or an abort has said why already
        wall_s = event["t"] - self.started
        wall = f"{wall_s:.1f} s" if wall_s < 60 else duration(wall_s)
        parts = [f"{status} in {wall} at step {event.get('step', self.step)}/{self.total}"]
        scored = [e for e in self.evaluations if e.get("accuracy") is not None
                  and math.isfinite(e["accuracy"])]
        if self.evaluations:
            final = self.evaluations[-1]
            metric = f"held-out loss {_number(final.get('loss'))}"
            if scored:
                best = max(scored, key=lambda e: e["accuracy"])
                metric += (f", accuracy {_number(scored[-1]['accuracy'])} (best "
                           f"{_number(best['accuracy'])} at epoch {best['epoch'] + 1})")
            parts.append(metric)
        final_npz = self.run_dir / "final.npz"
        if status == "done" and final_npz.exists():
            parts.append(f"parameters: {final_npz}")
        self.message("; ".join(parts))
