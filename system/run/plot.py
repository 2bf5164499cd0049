"""``pipetrain plot RUN_DIR``: one PNG of a run: loss, held-out metric, throughput, by step.

Drawn from ``events.jsonl`` (so any run directory works, finished or not) with the same
throughput window as the terminal and ``metrics.csv``. matplotlib (the ``plot`` extra) is
used through its object API on the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipetrain.run.metrics import RateWindow
from pipetrain.status import UserError

INSTALL_HINT = "pip install 'pipetrain[plot]'"


def series(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The plotted data: per step the loss of its last run and the recent samples/s; per epoch
    the mean training loss, held-out loss and accuracy; the steps of checkpoints, restarts,
    pauses."""
    batch = 1
    rate = RateWindow()
    loss: dict[int, float] = {}
    throughput: dict[int, float] = {}
    epochs: dict[int, dict[str, Any]] = {}
    marks: dict[str, list[int]] = {"checkpoint": [], "restart": [], "paused": []}
    for event in events:
        name = event.get("event")
        if name == "run_start":
            batch = int((event.get("config") or {}).get("batch_size", 1))
        elif name == "step":
            step = event["step"]
            loss[step] = event["loss"]
            rate.add(event["t"], step)
            steps_per_s = rate.steps_per_s()
            if steps_per_s is not None:
                throughput[step] = steps_per_s * batch
        elif name == "epoch_end":
            epochs.setdefault(event["epoch"], {})["mean_loss"] = event.get("mean_loss")
        elif name == "evaluate":
            entry = epochs.setdefault(event["epoch"], {})
            entry.update(step=event["step"], eval_loss=event.get("loss"),
                         accuracy=event.get("accuracy"))
        elif name == "paused":
            rate.pause(event["t"])
            marks["paused"].append(event["step"])
        elif name == "resumed":
            rate.resume(event["t"])
        elif name == "checkpoint":
            marks["checkpoint"].append(event["step"])
        elif name == "restart":
            marks["restart"].append(event["from_step"])
    return {"loss": loss, "throughput": throughput, "epochs": epochs, "marks": marks}


def _finite(values: list[Any]) -> bool:
    return any(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _mark(axes: Any, marks: dict[str, list[int]], legend: bool) -> None:
    styles = {"checkpoint": ("#1a7f37", ":"), "restart": ("#cf222e", "--"),
              "paused": ("#9a6700", "-.")}
    for kind, steps in marks.items():
        colour, style = styles[kind]
        for index, step in enumerate(steps):
            axes.axvline(step, color=colour, linestyle=style, linewidth=1,
                         label=kind if legend and index == 0 else None)


def plot_run(events: list[dict[str, Any]], out: Path, title: str) -> Path:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"plot needs matplotlib ({INSTALL_HINT})") from None
    data = series(events)
    if not data["loss"]:
        raise UserError(f"{title}: no step has finished yet; nothing to plot")
    figure = Figure(figsize=(10, 8.5))
    loss_axes, metric_axes, rate_axes = figure.subplots(3, 1, sharex=True)
    steps = sorted(data["loss"])
    loss_axes.plot(steps, [data["loss"][s] for s in steps], linewidth=0.8, alpha=0.5,
                   label="training loss (each step)")
    by_epoch = [data["epochs"][e] | {"epoch": e} for e in sorted(data["epochs"])
                if "step" in data["epochs"][e]]
    ends = [e["step"] for e in by_epoch]
    if _finite([e.get("mean_loss") for e in by_epoch]):
        loss_axes.plot(ends, [e.get("mean_loss") for e in by_epoch], marker="o", markersize=3,
                       label="training loss (epoch mean)")
    if _finite([e.get("eval_loss") for e in by_epoch]):
        loss_axes.plot(ends, [e.get("eval_loss") for e in by_epoch], marker="s", markersize=3,
                       label="held-out loss")
    loss_axes.set_ylabel("loss (nats, log scale)")
    if all(v > 0 for v in data["loss"].values()):
        loss_axes.set_yscale("log")  # the late epochs are where the differences are small
    loss_axes.set_title(title)
    if _finite([e.get("accuracy") for e in by_epoch]):
        metric_axes.plot(ends, [e.get("accuracy") for e in by_epoch], marker="o",
                         markersize=3, color="#8250df", label="held-out accuracy")
        metric_axes.set_ylabel("held-out accuracy")
    else:
        metric_axes.text(0.5, 0.5, "no held-out metric (nothing held out, or no epoch ended)",
                         ha="center", va="center", transform=metric_axes.transAxes)
    rate_steps = sorted(data["throughput"])
    rate_axes.plot(rate_steps, [data["throughput"][s] for s in rate_steps], linewidth=1,
                   color="#0969da", label="samples/s (recent steps, pauses excluded)")
    rate_axes.set_ylabel("samples/s")
    rate_axes.set_xlabel("step")
    rate_axes.set_ylim(bottom=0)
    for index, axes in enumerate((loss_axes, metric_axes, rate_axes)):
        _mark(axes, data["marks"], legend=index == 0)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=100)
    return out
