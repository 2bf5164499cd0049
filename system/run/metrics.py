"""What a run's events add up to: recent throughput, epoch means, and ``metrics.csv``.

Everything here is computed from the events themselves (their ``t`` and ``step``), so the
terminal, ``metrics.csv``, TensorBoard and ``pipetrain plot`` agree, and the same numbers come
out of a finished run's ``events.jsonl`` as came out live. Listeners are called by
:meth:`pipetrain.run.rundir.RunDir.emit` with each event just written.

Throughput is measured over the steps of the last few seconds, not since the start: an average
since the start falls after a pause and reads thousands of steps per second after a resume
(the first step then seems to have taken no time). Time spent paused is cut out of the window,
and a restart (steps going backwards) starts it afresh.
"""

from __future__ import annotations

import csv
import math
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Event = dict[str, Any]
Listener = Callable[[Event], None]

WINDOW_S = 5.0  # how far back "recent" throughput looks
FLUSH_S = 1.0   # metrics.csv reaches the disk at least this often while steps run


class RateWindow:
    """Steps per second over the last ``window_s`` seconds of running time (pauses excluded)."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._points: deque[tuple[float, int]] = deque()  # (running time, step)
        self._paused_total = 0.0
        self._paused_at: float | None = None

    def _running_time(self, t: float) -> float:
        return t - self._paused_total

    def add(self, t: float, step: int) -> None:
        if self._paused_at is not None:  # a step without a resumed event: the pause is over
            self.resume(t)
        if self._points and step <= self._points[-1][1]:
            self._points.clear()  # a restart replays from an earlier step: a new window
        now = self._running_time(t)
        self._points.append((now, step))
        while len(self._points) > 2 and now - self._points[1][0] >= self.window_s:
            self._points.popleft()

    def pause(self, t: float) -> None:
        if self._paused_at is None:
            self._paused_at = t

    def resume(self, t: float) -> None:
        if self._paused_at is not None:
            self._paused_total += max(0.0, t - self._paused_at)
            self._paused_at = None

    def reset(self) -> None:
        self._points.clear()

    def steps_per_s(self) -> float | None:
        if len(self._points) < 2:
            return None
        (t0, s0), (t1, s1) = self._points[0], self._points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None


class EpochLosses:
    """Each epoch's mean training loss; a step run twice (after a restart) counts once, with
    the loss of its last run."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = max(1, steps_per_epoch)
        self._losses: dict[int, float] = {}

    def add(self, step: int, loss: float) -> None:
        self._losses[step] = loss

    def mean(self, epoch: int) -> float:
        first = epoch * self.steps_per_epoch + 1
        values = [self._losses[s] for s in range(first, first + self.steps_per_epoch)
                  if s in self._losses]
        return math.fsum(values) / len(values) if values else float("nan")

    def prime(self, events: Iterable[Event]) -> EpochLosses:
        """Take the steps of an earlier launch of the run (a resumed run's epoch began there)."""
        for event in events:
            if event.get("event") == "step" and event.get("loss") is not None:
                self.add(event["step"], event["loss"])
        return self


def stage_timings(metrics: list[dict[str, Any]] | None) -> dict[int, dict[str, float]]:
    """Per stage, the mean over its replicas of compute, wait (neighbours + data) and
    all-reduce seconds of one step, from a step event's ``metrics``."""
    by_stage: dict[int, list[dict[str, Any]]] = {}
    for position, entry in enumerate(metrics or []):
        by_stage.setdefault(int(entry.get("stage", position)), []).append(entry)
    timings = {}
    for stage, entries in sorted(by_stage.items()):
        n = len(entries)
        timings[stage] = {
            "compute_s": sum(e.get("compute_s", 0.0) for e in entries) / n,
            "wait_s": sum(e.get("wait_neighbours_s", 0.0) + (e.get("wait_data_s") or 0.0)
                          for e in entries) / n,
            "allreduce_s": sum(e.get("allreduce_s", 0.0) for e in entries) / n,
        }
    return timings


BASE_COLUMNS = ("t", "step", "epoch", "loss", "samples_per_s", "eval_loss", "eval_accuracy")
STAGE_FIELDS = ("compute_s", "wait_s", "allreduce_s")


def stage_columns(stages: int) -> list[str]:
    return [f"stage{s}_{name}" for s in range(stages) for name in STAGE_FIELDS]


class MetricsCsv:
    """``metrics.csv``: one row per step run (a replayed step again), in the order run.

    Columns: ``t, step, epoch, loss, samples_per_s`` (recent throughput, pauses excluded),
    ``eval_loss, eval_accuracy`` (on the last step of an epoch), then per stage ``stageN_
    compute_s, stageN_wait_s, stageN_allreduce_s`` (seconds of that step, mean over replicas;
    absent for the one-process reference). A resumed run appends; if it runs on a different
    number of stages the file is rewritten with the wider header.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.batch_size = 1
        self.stages = 0
        self.rate = RateWindow()
        self._pending: dict[str, Any] | None = None
        self._flushed_t = 0.0
        self._handle = None
        self._writer: csv.DictWriter | None = None

    def __call__(self, event: Event) -> None:
        name = event.get("event")
        if name == "run_start":
            config = event.get("config") or {}
            self.batch_size = int(config.get("batch_size", 1))
            self.stages = int(config.get("stages", 1)) if event.get("command") == "train" else 0
            self._open()
        elif name == "step":
            # Written at once, flushed at most once a second and at every other event: a
            # write per step would cost more than the row (events.jsonl has every step anyway).
            due = event["t"] - self._flushed_t >= FLUSH_S
            self._flush(to_disk=due)
            if due:
                self._flushed_t = event["t"]
            self.rate.add(event["t"], event["step"])
            steps_per_s = self.rate.steps_per_s()
            row = {"t": event["t"], "step": event["step"], "epoch": event.get("epoch"),
                   "loss": event.get("loss"),
                   "samples_per_s": None if steps_per_s is None else
                   round(steps_per_s * self.batch_size, 1)}
            for stage, timing in stage_timings(event.get("metrics")).items():
                for key, value in timing.items():
                    row[f"stage{stage}_{key}"] = round(value, 6)
            self._pending = row
        elif name == "evaluate" and self._pending is not None:
            self._pending["eval_loss"] = event.get("loss")
            self._pending["eval_accuracy"] = event.get("accuracy")
        elif name == "paused":
            self.rate.pause(event["t"])
        elif name == "resumed":
            self.rate.resume(event["t"])
        elif name not in ("epoch_end",):
            self._flush()

    def _open(self) -> None:
        self.close()
        header = [*BASE_COLUMNS, *stage_columns(self.stages)]
        rows: list[dict[str, str]] = []
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                old = list(reader.fieldnames or [])
                if old != header:
                    rows = list(reader)
                    header = [*BASE_COLUMNS, *stage_columns(max(self.stages,
                                                                _stages_in(old)))]
                else:
                    header = old
            mode = "w" if rows or old != header else "a"
        else:
            mode = "w"
        self._handle = open(self.path, mode, newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.DictWriter(self._handle, fieldnames=header, extrasaction="ignore")
        if mode == "w":
            self._writer.writeheader()
            self._writer.writerows(rows)
        self._handle.flush()

    def _flush(self, *, to_disk: bool = True) -> None:
        if self._pending is not None and self._writer is not None:
            self._writer.writerow(self._pending)
        self._pending = None
        if to_disk and self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        self._flush()
        if self._handle is not None:
            self._handle.close()
            self._handle = self._writer = None


def _stages_in(header: list[str]) -> int:
    stages = [int(name[5:].split("_")[0]) for name in header
              if name.startswith("stage") and name[5:].split("_")[0].isdigit()]
    return max(stages) + 1 if stages else 0


def read_metrics(path: Path) -> list[dict[str, float | None]]:
    """``metrics.csv`` as rows of numbers (empty cells are None)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [{key: (float(value) if value not in ("", None) else None)
                 for key, value in row.items()} for row in csv.DictReader(handle)]
