"""The pipeline timeline of a trace as a PNG: stage against time, coloured by action.

Top: what each stage worker's main thread did over a few consecutive steps (F, B, I, W per
micro-batch, the update, sends; white is bubble), with a thin lane under it for its helper
threads (all-reduce, digest, snapshot). Bottom: the ideal pipeline of the same steps' action
times (``pipetrain.run.timeline``), on the same time axis, so the gap between the two is what
the machinery costs. matplotlib through its object API on the Agg canvas, as in
``pipetrain.run.plot``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipetrain.run.timeline import tracks
from pipetrain.status import UserError

COLOURS = {"F": "#4c72b0", "B": "#dd8452", "I": "#c44e52", "W": "#55a868", "update": "#8c8c8c",
           "send": "#8172b3", "recv": "#b3b3b3", "allreduce": "#2a9d8f", "digest": "#e9c46a",
           "snapshot": "#cccccc", "checkpoint": "#000000"}
HELPERS = ("allreduce", "digest", "snapshot")


def _kind(event: dict[str, Any]) -> str | None:
    if event["cat"] == "compute":
        return str((event.get("args") or {}).get("op", "update"))  # F1@2 is coloured as F
    if event["cat"] in ("send", *HELPERS, "checkpoint"):
        return event["cat"]
    return None


def draw_timeline(events: Sequence[dict[str, Any]], summary: dict[str, Any], out: Path,
                  *, steps: tuple[int, int] | None = None, title: str = "") -> Path:
    """Write the PNG of ``steps`` (first, last; default: three steps from the middle of the
    timed ones) to ``out``."""
    figure = timeline_figure(events, summary, steps=steps, title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    return out


def timeline_figure(events: Sequence[dict[str, Any]], summary: dict[str, Any], *,
                    steps: tuple[int, int] | None = None, title: str = "") -> Any:
    """The timeline as a matplotlib Figure (the harness report embeds it)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise UserError("trace needs matplotlib to draw (pip install 'pipetrain[plot]')"
                        ) from None
    by_place = tracks(events)
    first, last = summary["steps"]
    if steps is None:
        middle = (first + last) // 2
        steps = (max(first, middle - 1), min(last, middle + 1))
    wanted = set(range(steps[0], steps[1] + 1))
    windows = []
    for track in by_place.values():
        for e in track.spans.get("main", []):
            if e["cat"] == "step" and e["args"]["step"] in wanted:
                windows.append((e["ts"], e["ts"] + e["dur"]))
    if not windows:
        raise UserError(f"the trace has no steps {steps[0]}-{steps[1]}")
    t0, t1 = min(w[0] for w in windows), max(w[1] for w in windows)
    ms = 1e-3  # trace times are in microseconds
    places = list(by_place)
    figure = Figure(figsize=(12, 1.2 + 0.75 * len(places) + 0.5 * summary["stages"]))
    top, bottom = figure.subplots(2, 1, sharex=True,
                                  gridspec_kw={"height_ratios": [len(places), summary["stages"]]})
    for row, place in enumerate(places):
        track = by_place[place]
        y = len(places) - 1 - row
        for thread, spans in track.spans.items():
            helper = thread != "main"
            for e in spans:
                kind = _kind(e)
                if kind is None or e["ts"] + e["dur"] < t0 or e["ts"] > t1:
                    continue
                if helper != (kind in HELPERS):
                    continue
                height, base = (0.18, y - 0.42) if helper else (0.62, y - 0.2)
                top.broken_barh([((e["ts"] - t0) * ms, e["dur"] * ms)], (base, height),
                                facecolors=COLOURS[kind], edgecolor="white", linewidth=0.3)
                label = str((e.get("args") or {}).get("microbatch", ""))
                if not helper and kind in "FBIW" and e["dur"] * ms > (t1 - t0) * ms / 90:
                    top.text((e["ts"] - t0 + e["dur"] / 2) * ms, y + 0.11, label, ha="center",
                             va="center", fontsize=6, color="white")
    for _, end in windows:
        top.axvline((end - t0) * ms, color="#999999", linewidth=0.4, linestyle=":")
    top.set_yticks(range(len(places)))
    top.set_yticklabels([f"stage {s}" + (f" r{r}" if summary["replicas"] > 1 else "")
                         for s, r in reversed(places)])
    top.set_title(title or f"measured: {summary['schedule']}, S={summary['stages']}, "
                  f"M={summary['microbatches']}, steps {steps[0]}-{steps[1]}; bubble "
                  f"{summary['measured_bubble']:.0%}, step {summary['window_s'] * 1e3:.1f} ms",
                  fontsize=9, loc="left")
    # The ideal pipeline: the same action times, back to back, one step after another.
    n_steps = steps[1] - steps[0] + 1
    span_s = summary["ideal_step_s"]
    for index in range(n_steps):
        offset = index * span_s * 1e3
        for action, start in summary["ideal_start"].items():
            finish = summary["ideal_finish"][action]
            kind = str(action.op)
            y = summary["stages"] - 1 - action.stage
            bottom.broken_barh([(offset + start * 1e3, (finish - start) * 1e3)], (y - 0.3, 0.6),
                               facecolors=COLOURS.get(kind, "#333333"), edgecolor="white",
                               linewidth=0.3)
        bottom.axvline(offset + span_s * 1e3, color="#999999", linewidth=0.4, linestyle=":")
    bottom.set_yticks(range(summary["stages"]))
    bottom.set_yticklabels([f"stage {s}" for s in reversed(range(summary["stages"]))])
    bottom.set_title(f"ideal pipeline (measured action times, no communication or fixed cost): "
                     f"bubble {summary['ideal_bubble']:.0%}, step "
                     f"{summary['ideal_step_s'] * 1e3:.1f} ms "
                     f"({summary['fraction_of_bound']:.0%} of it reached)",
                     fontsize=9, loc="left")
    bottom.set_xlabel("ms")
    legend = [Patch(color=COLOURS[k], label=k) for k in
              ("F", "B", "I", "W", "update", "send", *HELPERS)]
    figure.legend(handles=legend, loc="upper right", ncol=len(legend), fontsize=7,
                  frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    return figure
