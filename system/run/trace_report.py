"""``pipetrain trace RUN_DIR``: the timeline PNG and the per-stage summary of a traced run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipetrain.run.timeline import format_summary, summarize
from pipetrain.run.trace_file import TraceError, load_trace
from pipetrain.status import ExitCode, UserError


class TraceUsageError(UserError):
    """No trace, an unreadable one, or steps it does not hold: one line, exit 2."""


def run_config(run_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceUsageError(f"{run_dir}: not a run directory (no run.json)") from None
    except (OSError, ValueError) as exc:
        raise TraceUsageError(f"{run_dir}/run.json: unreadable ({exc})") from None
    config = state.get("config")
    if not isinstance(config, dict) or "stages" not in config:
        raise TraceUsageError(f"{run_dir}: run.json holds no train config (a reference run "
                              "has no pipeline to trace)")
    return config


def parse_steps(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        first, _, last = text.partition("-")
        steps = (int(first), int(last or first))
    except ValueError:
        raise TraceUsageError(f"--steps: expected A-B (e.g. 10-12), got {text!r}") from None
    if steps[0] < 1 or steps[1] < steps[0]:
        raise TraceUsageError(f"--steps: expected 1 <= A <= B, got {text!r}")
    return steps


def trace_summary(run_dir: Path | str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The trace's events and its summary (``pipetrain.run.timeline.summarize``)."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    try:
        events = load_trace(run_dir)
        return events, summarize(events, config)
    except (TraceError, ValueError) as exc:
        raise TraceUsageError(str(exc)) from None


def show_trace(run_dir: str, output: str | None, steps: str | None, *,
               as_json: bool = False) -> int:
    from pipetrain.run.trace_plot import draw_timeline

    events, summary = trace_summary(run_dir)
    out = Path(output) if output else Path(run_dir) / "timeline.png"
    png = draw_timeline(events, summary, out, steps=parse_steps(steps))
    if as_json:
        shown = {k: v for k, v in summary.items() if k not in ("ideal_start", "ideal_finish")}
        print(json.dumps({**shown, "png": str(png)}))
    else:
        print(format_summary(summary))
        print(f"timeline: {png}")
    return ExitCode.OK
