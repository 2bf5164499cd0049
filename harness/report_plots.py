"""The plots of a report, each a base64 PNG for the self-contained page.

Two axes, one story. Per-step quantities (loss, run minus reference) are drawn against the
step; quantities of time (throughput, CPU, memory) against seconds since the start, with the
steps marked along the top of the same axes, so a spike reads as "around step 40". Every plot
carries the same marks: restarts (red), checkpoints (green), faults invoked and healed, and
the point where each fault landed; steps that a restart ran again are shaded. Zombie samples
(a process already dead, waiting to be reaped) are left out, so memory does not seem to drop
to zero at a death.

matplotlib is used through its object API on the Agg canvas (no pyplot state, no display).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

from pipetrain.run.metrics import RateWindow, stage_timings

MB = 1024 * 1024
SPECIFIC_ROLES = ("stage", "coordinator", "reference")
MARK_STYLES = {  # kind -> (colour, line style, legend label)
    "restart": ("#cf222e", "--", "restart"),
    "checkpoint": ("#1a7f37", ":", "checkpoint"),
    "fault_invoke": ("#bc4c00", "-.", "fault invoked"),
    "fault_heal": ("#0a7ea4", ":", "fault healed"),
    "fault_landed": ("#8250df", "-", "fault landed"),
    "paused": ("#6e7781", "-.", "paused"),
}


@dataclass(frozen=True)
class Mark:
    kind: str
    t: float      # unix seconds
    step: float   # the step reached then (a restart: the step it went back to)


@dataclass
class Timeline:
    """What the plots share: the start time, the run's steps in time order, the marks."""

    t0: float
    t_end: float
    steps: list[tuple[float, int]]         # (unix t, step) of every step event, as they ran
    marks: list[Mark]
    replayed: list[tuple[int, int]]        # (first, last) steps that a restart ran again
    paused: list[tuple[float, float]] = field(default_factory=list)  # (from, to) unix t

    def step_at(self, t: float) -> int:
        reached = [step for when, step in self.steps if when <= t]
        return reached[-1] if reached else 0


def timeline(run_events: list[dict[str, Any]], history: list[dict[str, Any]],
             samples: list[dict[str, Any]]) -> Timeline:
    times = [e["t"] for e in run_events if "t" in e] + [s["t"] for s in samples] + \
        [h["t"] for h in history if "t" in h]
    t0 = min(times, default=0.0)
    steps = sorted((e["t"], e["step"]) for e in run_events if e.get("event") == "step")
    line = Timeline(t0, max(times, default=0.0), steps, [], [])
    last_done = 0
    for event in sorted(run_events, key=lambda e: e.get("t", 0.0)):
        name = event.get("event")
        if name == "step":
            last_done = max(last_done, event["step"])
        elif name == "checkpoint":
            line.marks.append(Mark("checkpoint", event["t"], event["step"]))
        elif name == "paused":
            line.marks.append(Mark("paused", event["t"], event["step"]))
            line.paused.append((event["t"], line.t_end))
        elif name == "resumed" and line.paused:
            line.paused[-1] = (line.paused[-1][0], event["t"])
        elif name == "restart":
            seen = event["t"] - float(event.get("recovery_s") or 0.0)
            line.marks.append(Mark("restart", seen, event["from_step"]))
            if last_done > event["from_step"]:
                line.replayed.append((event["from_step"] + 1, last_done))
    for entry in history:
        op = entry.get("op")
        if entry.get("source") == "harness" and op in ("fault_invoke", "fault_heal",
                                                       "fault_landed"):
            step = entry.get("step")
            line.marks.append(Mark(op, entry["t"], line.step_at(entry["t"]) if step is None
                                   else step))
    return line


def most_specific_role(own: list[dict[str, Any]]) -> str:
    """The role a process had at its most specific: a worker is named by stage once it knows
    it, and a dying one may show only its 15-character kernel name."""
    roles = [s.get("role", "?") for s in own]
    return next((r for r in reversed(roles) if r.startswith(SPECIFIC_ROLES)), roles[-1])


def alive_sample(sample: dict[str, Any]) -> bool:
    """A zombie, or a process tearing down its memory on the way out, has no RSS or CPU of its
    own any more: plotting it would show a fall to zero that did not happen while it lived."""
    return sample.get("status") not in ("zombie", "dead") and sample.get("rss") != 0


def png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _marks(axes: Any, line: Timeline, *, by_step: bool) -> None:
    labelled: set[str] = set()
    for mark in line.marks:
        colour, style, label = MARK_STYLES[mark.kind]
        x = mark.step if by_step else mark.t - line.t0
        axes.axvline(x, color=colour, linestyle=style, linewidth=1.1,
                     label=None if label in labelled else label)
        labelled.add(label)
    if not by_step:
        for start, end in line.paused:
            axes.axvspan(start - line.t0, end - line.t0, color="#6e7781", alpha=0.12,
                         label=None if "paused span" in labelled else "paused (span)")
            labelled.add("paused span")
    for first, last in line.replayed:
        if by_step:
            axes.axvspan(first - 0.5, last + 0.5, color="#cf222e", alpha=0.08,
                         label=None if "replayed" in labelled else "steps replayed")
            labelled.add("replayed")


def _steps_on_top(axes: Any, line: Timeline, ticks: int = 20) -> None:
    """Step numbers along the top of a time axis (a replayed step appears at both times), on
    the run's whole time span, the same for every time plot."""
    axes.set_xlim(0, max(line.t_end - line.t0, 1e-3) * 1.01)
    if not line.steps:
        return
    span = max(line.t_end - line.t0, 1e-3)
    chosen: list[tuple[float, int]] = []
    for t, step in line.steps:  # evenly in time, so that no two labels overlap
        if not chosen or t - chosen[-1][0] >= span / ticks:
            chosen.append((t, step))
    top = axes.secondary_xaxis("top")
    top.set_xticks([t - line.t0 for t, _ in chosen], labels=[str(s) for _, s in chosen],
                   fontsize=7)
    top.set_xlabel("step", fontsize=8)


def _finish(axes: Any, title: str, xlabel: str, ylabel: str) -> None:
    axes.set_title(title, fontsize=10, pad=14)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # beside the plot, never over the data
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def last_run_of_each_step(run_events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["step"]: e for e in run_events
            if e.get("event") == "step" and e.get("loss") is not None}


def loss_plot(Figure: Any, line: Timeline, run_events: list[dict[str, Any]],
              reference: list[dict[str, Any]] | None) -> str:
    figure = Figure(figsize=(10, 3.4))
    axes = figure.subplots()
    last = last_run_of_each_step(run_events)
    xs = sorted(last)
    axes.plot(xs, [last[x]["loss"] for x in xs], label="run", linewidth=1.4)
    if reference:
        ref = last_run_of_each_step(reference)
        axes.plot(sorted(ref), [ref[s]["loss"] for s in sorted(ref)], label="reference",
                  linewidth=1, linestyle="--", color="black")
    _marks(axes, line, by_step=True)
    if all(last[x]["loss"] > 0 for x in xs):
        axes.set_yscale("log")  # late steps differ by little: a linear axis hides them
    _finish(axes, "training loss per step" + (": run and reference" if reference else ""),
            "step", "loss (nats, log scale)")
    return png(figure)


def difference_plot(Figure: Any, line: Timeline, run_events: list[dict[str, Any]],
                    reference: list[dict[str, Any]]) -> tuple[str, str]:
    """Run minus reference, per step: the loss difference, digest mismatches marked."""
    figure = Figure(figsize=(10, 2.6))
    axes = figure.subplots()
    run, ref = last_run_of_each_step(run_events), last_run_of_each_step(reference)
    common = sorted(set(run) & set(ref))
    diffs = [run[s]["loss"] - ref[s]["loss"] for s in common]
    differing = [s for s in common if run[s].get("grad_digest") != ref[s].get("grad_digest")]
    axes.plot(common, diffs, linewidth=1.2, color="#0969da", label="loss: run − reference")
    if differing:
        axes.scatter(differing, [run[s]["loss"] - ref[s]["loss"] for s in differing],
                     color="#cf222e", s=12, zorder=3, label="gradient digest differs")
    _marks(axes, line, by_step=True)
    exact = sum(1 for d in diffs if d == 0.0)
    summary = (f"{len(common) - len(differing)} of {len(common)} steps with equal gradient "
               f"digests; loss difference exactly 0 at {exact}")
    _finish(axes, f"run minus reference: {summary}", "step", "Δ loss")
    return png(figure), summary


def throughput_plot(Figure: Any, line: Timeline, run_events: list[dict[str, Any]]) -> str:
    figure = Figure(figsize=(10, 3.0))
    axes = figure.subplots()
    batch = next(((e.get("config") or {}).get("batch_size", 1) for e in run_events
                  if e.get("event") == "run_start"), 1)
    rate = RateWindow()
    points = []
    for event in sorted(run_events, key=lambda e: e.get("t", 0.0)):
        name = event.get("event")
        if name == "step":
            rate.add(event["t"], event["step"])
            steps_per_s = rate.steps_per_s()
            # No rate yet (the start, or a restart's new window): a gap, not a bridge
            points.append((event["t"] - line.t0,
                           float("nan") if steps_per_s is None else steps_per_s * batch))
        elif name == "paused":
            rate.pause(event["t"])
        elif name == "resumed":
            rate.resume(event["t"])
    if points:
        axes.plot(*zip(*points, strict=True), color="#0969da", linewidth=1.2,
                  label="samples/s over the last 5 s (pauses excluded)")
    axes.set_ylim(bottom=0)
    _marks(axes, line, by_step=False)
    _steps_on_top(axes, line)
    _finish(axes, "throughput over time", "seconds since start", "samples/s")
    return png(figure)


def stage_plot(Figure: Any, run_events: list[dict[str, Any]]) -> str | None:
    """Per stage, the mean seconds of a step spent computing, waiting and all-reducing."""
    totals: dict[int, dict[str, float]] = {}
    counts: dict[int, int] = {}
    for event in run_events:
        if event.get("event") != "step":
            continue
        for stage, timing in stage_timings(event.get("metrics")).items():
            into = totals.setdefault(stage, {"compute_s": 0.0, "wait_s": 0.0,
                                             "allreduce_s": 0.0})
            for key, value in timing.items():
                into[key] += value
            counts[stage] = counts.get(stage, 0) + 1
    if not totals:
        return None
    stages = sorted(totals)
    figure = Figure(figsize=(10, 0.6 + 0.55 * len(stages)))
    axes = figure.subplots()
    left = [0.0] * len(stages)
    for key, colour, label in (("compute_s", "#0969da", "compute"),
                               ("wait_s", "#d4a72c", "waiting (neighbours, data)"),
                               ("allreduce_s", "#8250df", "all-reduce")):
        widths = [1000 * totals[s][key] / counts[s] for s in stages]
        axes.barh([f"stage {s}" for s in stages], widths, left=left, color=colour,
                  label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    axes.invert_yaxis()
    _finish(axes, "per stage: where a step's time goes (mean over steps and replicas)",
            "milliseconds per step", "")
    return png(figure)


def process_plot(Figure: Any, line: Timeline, samples: list[dict[str, Any]], key: str,
                 scale: float, label: str) -> str:
    figure = Figure(figsize=(10, 3.4))
    axes = figure.subplots()
    series: dict[tuple[int, Any], list[dict[str, Any]]] = {}
    for sample in samples:
        if not alive_sample(sample):
            continue
        series.setdefault((sample["pid"], sample.get("create_time")), []).append(sample)
    for (pid, _), own in series.items():
        points = [(s["t"] - line.t0, s[key] / scale) for s in own if s.get(key) is not None]
        if points:
            role = most_specific_role(own)
            axes.plot(*zip(*points, strict=True), label=f"{role} (pid {pid})", linewidth=1)
    _marks(axes, line, by_step=False)
    _steps_on_top(axes, line)
    _finish(axes, f"{label} per process", "seconds since start", label)
    return png(figure)
