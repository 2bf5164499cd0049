"""The pipeline timeline of a traced run (``--trace``, or ``trace = true`` in a scenario's
``[train]`` table) for the report: the same picture and summary as ``pipetrain trace RUN_DIR``
(``pipetrain.run.trace_plot``), embedded in the page."""

from __future__ import annotations

from pathlib import Path

from pipetrain.run.timeline import summarize
from pipetrain.run.trace_file import TRACE_DIR, TRACE_FILE, TraceError, load_trace
from pipetrain.run.trace_plot import timeline_figure
from pipetrain.run.trace_report import TraceUsageError, run_config
from pipetrain_harness.report_plots import png


def pipeline_timeline(run_dir: Path | None) -> tuple[str | None, str | None]:
    """(the timeline as base64 PNG, a one-line summary), or (None, None) for an untraced run,
    or (None, why not) when the trace cannot be drawn (a run that stopped before its steps)."""
    if run_dir is None or not ((run_dir / TRACE_FILE).exists()
                               or (run_dir / TRACE_DIR).is_dir()):
        return None, None
    try:
        events = load_trace(run_dir)
        summary = summarize(events, run_config(run_dir))
        image = png(timeline_figure(events, summary))
    except (TraceError, TraceUsageError, ValueError, KeyError) as exc:
        return None, f"the trace could not be drawn: {exc}"
    return image, (f"pipeline timeline ({TRACE_FILE}): step {summary['window_s'] * 1e3:.1f} ms, "
                   f"ideal pipeline {summary['ideal_step_s'] * 1e3:.1f} ms "
                   f"({summary['fraction_of_bound']:.0%} of it reached); bubble "
                   f"{summary['measured_bubble']:.0%} measured against "
                   f"{summary['ideal_bubble']:.0%} ideal and "
                   f"{summary['schedule_bubble']:.0%} the schedule's own")
