"""Reports: ``report.json`` for machines and a self-contained ``report.html`` for people, of a
scenario run (:func:`write_report`) or of any run directory (:func:`write_run_report`, which
``pipetrain report RUN_DIR`` calls).

The HTML file stands alone (inline CSS, plots as base64 PNG) so it can be attached to an issue
or opened from a CI artifact. Plots need matplotlib (the ``harness`` extra); it is imported only
here and only when a report is written (``pipetrain_harness.report_plots``). Without it the page
says so and keeps every table. The history is grouped (a run of step events is one row, opened
on demand) and folded away, so the page leads with what a reader wants first: the verdict, the
checks, the plots.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipetrain.run.rundir import read_events, read_state
from pipetrain_harness import report_plots, report_trace
from pipetrain_harness.checks import CheckResult, RunOutcome, verdict
from pipetrain_harness.report_history import esc as _esc
from pipetrain_harness.report_history import history_html

MB = 1024 * 1024
COLOURS = {"valid": "#1a7f37", "invalid": "#cf222e", "unknown": "#9a6700"}


@dataclass
class ReportView:
    """What a page shows, whether of a scenario or of a plain run."""

    title: str
    description: str
    facts: list[str]
    history: list[dict[str, Any]]
    run_events: list[dict[str, Any]]
    reference_events: list[dict[str, Any]] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    verdict: str | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    reproduce: str | None = None
    run_dir: Path | None = None  # for its trace (a --trace run): the pipeline timeline


def _reference_events(reference_dir: Path | None) -> list[dict[str, Any]] | None:
    if reference_dir is None or not (Path(reference_dir) / "events.jsonl").exists():
        return None
    return read_events(reference_dir)


def write_report(outcome: RunOutcome, results: list[CheckResult], report_dir: Path,
                 reproduce: str) -> dict[str, Any]:
    """Writes ``report_dir/<scenario name>/report.json`` and ``report.html``; returns the
    report (its ``summary`` is one row for :func:`summary_table`, ``html`` the page's path)."""
    scenario = outcome.scenario
    out_dir = Path(report_dir) / scenario.name
    out_dir.mkdir(parents=True, exist_ok=True)
    history = outcome.history.sorted() if outcome.history is not None else []
    processes = process_summaries(outcome.monitor_samples)
    restarts = len(outcome.run_events("restart"))
    overall = verdict(results)
    page = out_dir / "report.html"
    report: dict[str, Any] = {
        "scenario": {"name": scenario.name, "path": str(scenario.path), "seed": scenario.seed,
                     "description": scenario.description},
        "verdict": overall,
        "checks": [asdict(result) for result in results],
        "exit_status": outcome.exit_status,
        "wall_s": round(outcome.wall_s, 3),
        "launches": outcome.launches,
        "restarts": restarts,
        "leaks": list(outcome.leaks),
        "processes": processes,
        "run_dir": str(outcome.run_dir),
        "reference_dir": None if outcome.reference_dir is None else str(outcome.reference_dir),
        "reproduce": reproduce,
        "html": str(page),
        "history": history,
        "summary": {
            "scenario": scenario.name, "verdict": overall, "wall_s": round(outcome.wall_s, 1),
            "restarts": restarts,
            "peak_rss_mb": round(max((p["peak_rss_mb"] for p in processes), default=0.0), 1),
            "failed": [result.name for result in results if result.status != "valid"],
        },
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    view = ReportView(
        title=scenario.name, description=scenario.description,
        facts=[str(scenario.path), f"seed {scenario.seed}",
               f"exit status {outcome.exit_status}", f"{outcome.wall_s:.1f} s",
               f"{outcome.launches} launch(es)", f"{restarts} restart(s)"],
        history=history, run_events=outcome.run_events(),
        reference_events=_reference_events(outcome.reference_dir),
        samples=outcome.monitor_samples, processes=processes, verdict=overall,
        checks=report["checks"], leaks=report["leaks"], reproduce=reproduce,
        run_dir=outcome.run_dir)
    page.write_text(render_html(view), encoding="utf-8")
    return report


def write_run_report(run_dir: Path, out: Path | None = None,
                     reference_dir: Path | None = None) -> Path:
    """``report.html`` of a plain run directory (no scenario, no monitor): its loss (against
    a reference run, if given), throughput, stages and history. Returns the page's path."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    events = read_events(run_dir)
    history = [{"source": "run", **event} for event in events]
    restarts = sum(1 for e in events if e.get("event") == "restart")
    starts = [e for e in events if e.get("event") == "run_start"]
    wall = events[-1]["t"] - starts[0]["t"] if starts and events else 0.0
    processes = [{"pid": e["pid"], "role": e.get("role", "?"), "returncode": e.get("returncode"),
                  "error": e.get("error")} for e in events if e.get("event") == "worker_exit"]
    config = state.get("config") or {}
    view = ReportView(
        title=str(run_dir),
        description=(f"pipetrain {state.get('command', 'train')}: {config.get('stages')} "
                     f"stage(s) x {config.get('replicas')} replica(s), schedule "
                     f"{config.get('schedule')}, {config.get('epochs')} epoch(s) of batch "
                     f"{config.get('batch_size')} on {config.get('dataset')}"),
        facts=[f"state {state.get('state')}", f"step {state.get('step')}/"
               f"{state.get('total_steps')}", f"{wall:.1f} s", f"{len(starts)} launch(es)",
               f"{restarts} restart(s)"] + ([f"compared with {reference_dir}"]
                                             if reference_dir else []),
        history=history, run_events=events, reference_events=_reference_events(reference_dir),
        processes=processes, run_dir=run_dir)
    page = Path(out) if out else run_dir / "report.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_html(view), encoding="utf-8")
    return page


def process_summaries(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per process (in order of first appearance): role, peak RSS, CPU mean and max."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for sample in samples:
        by_pid.setdefault(sample["pid"], []).append(sample)
    summaries = []
    for pid, own in by_pid.items():
        cpu = [s["cpu_percent"] for s in own if s.get("cpu_percent") is not None]
        rss = [s["rss"] for s in own if s.get("rss")]
        summaries.append({
            "pid": pid, "role": report_plots.most_specific_role(own), "samples": len(own),
            "first_t": own[0]["t"], "last_t": own[-1]["t"],
            "peak_rss_mb": round(max(rss, default=0) / MB, 2),
            "mean_cpu_percent": round(sum(cpu) / len(cpu), 1) if cpu else 0.0,
            "max_cpu_percent": round(max(cpu, default=0.0), 1),
            "max_fds": max((s["num_fds"] for s in own if s.get("num_fds") is not None),
                           default=None),
        })
    return summaries


# -- terminal --------------------------------------------------------------------------------


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table, one row per scenario (a report's ``summary``, or the report)."""
    header = ("scenario", "verdict", "wall s", "restarts", "peak RSS MB", "failed checks")
    lines = [header]
    for row in rows:
        row = row.get("summary", row)
        wall = row.get("wall_s")
        peak = row.get("peak_rss_mb")
        lines.append((
            str(row.get("scenario", "?")), str(row.get("verdict", "?")),
            "-" if wall is None else f"{wall:.1f}",
            str(row.get("restarts", "-")),
            "-" if peak is None else f"{peak:.1f}",
            ", ".join(row.get("failed", [])) or "-",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            .rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


# -- HTML ------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1f2328; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #eaeef2;
         vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { font-weight: 600; color: white; padding: 1px 8px; border-radius: 10px; }
pre { background: #f6f8fa; padding: .7em; overflow-x: auto; }
img { max-width: 100%; }
.note { color: #656d76; }
tr.harness td { background: #fff8c5; }
tr.alert td { background: #ffebe9; }
details > summary { cursor: pointer; font-weight: 600; margin: .4em 0; }
details details > summary { font-weight: normal; }
code { font-size: 12px; }
.kv { color: #656d76; }
"""


def _badge(status: str) -> str:
    colour = COLOURS.get(status, "#656d76")
    return f'<span class="status" style="background:{colour}">{_esc(status)}</span>'


def render_html(view: ReportView) -> str:
    badge = f" {_badge(view.verdict)}" if view.verdict else ""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(view.title)}{': ' + _esc(view.verdict) if view.verdict else ''}"
        "</title>", f"<style>{CSS}</style></head><body>",
        f"<h1>{_esc(view.title)}{badge}</h1>", f"<p>{_esc(view.description)}</p>",
        f"<p class=note>{' &middot; '.join(_esc(fact) for fact in view.facts)}</p>",
    ]
    if view.reproduce:
        parts += ["<h2>Reproduce</h2>", f"<pre>{_esc(view.reproduce)}</pre>"]
    if view.checks:
        parts += ["<h2>Checks</h2>",
                  "<table><tr><th>check</th><th>status</th><th>message</th></tr>"]
        for check in view.checks:
            parts.append(f"<tr><td>{_esc(check['name'])}</td><td>{_badge(check['status'])}"
                         f"</td><td>{_esc(check['message'])}</td></tr>")
        parts.append("</table>")
    if view.leaks:
        parts += ["<h2>Left behind</h2>", "<ul>"]
        parts += [f"<li>{_esc(leak)}</li>" for leak in view.leaks]
        parts.append("</ul>")
    parts.append("<h2>Plots</h2>")
    parts += _plots_html(view)
    parts += _processes_html(view)
    parts += history_html(view.history)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _processes_html(view: ReportView) -> list[str]:
    if not view.processes:
        return []
    parts = ["<h2>Processes</h2>"]
    if view.samples:
        parts.append("<table><tr><th>pid</th><th>role</th><th>samples</th><th>peak RSS MB</th>"
                     "<th>mean CPU %</th><th>max CPU %</th><th>max fds</th></tr>")
        for proc in view.processes:
            parts.append(
                f"<tr><td class=num>{_esc(proc['pid'])}</td><td>{_esc(proc['role'])}</td>"
                f"<td class=num>{proc['samples']}</td>"
                f"<td class=num>{proc['peak_rss_mb']:.1f}</td>"
                f"<td class=num>{proc['mean_cpu_percent']:.1f}</td>"
                f"<td class=num>{proc['max_cpu_percent']:.1f}</td>"
                f"<td class=num>{_esc('-' if proc['max_fds'] is None else proc['max_fds'])}"
                "</td></tr>")
    else:
        parts.append("<p class=note>Worker exits as the run recorded them (no monitor sampled "
                     "this run: CPU and memory come with a scenario run).</p>")
        parts.append("<table><tr><th>pid</th><th>role</th><th>exit status</th><th>error</th>"
                     "</tr>")
        for proc in view.processes:
            cls = ' class="alert"' if proc.get("returncode") not in (0, None) else ""
            parts.append(f"<tr{cls}><td class=num>{_esc(proc['pid'])}</td>"
                         f"<td>{_esc(proc['role'])}</td><td class=num>"
                         f"{_esc(proc.get('returncode'))}</td>"
                         f"<td>{_esc(proc.get('error') or '')}</td></tr>")
    parts.append("</table>")
    return parts


# -- plots -----------------------------------------------------------------------------------


def _plots_html(view: ReportView) -> list[str]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return ["<p class=note>matplotlib is not installed, so there are no plots "
                "(<code>pip install matplotlib</code>, or the <code>harness</code> extra).</p>"]
    plots = report_plots
    notes: list[str] = []
    try:
        line = plots.timeline(view.run_events, view.history, view.samples)
        images: list[tuple[str, str | None]] = []
        if any(e.get("event") == "step" for e in view.run_events):
            images.append(("loss per step",
                           plots.loss_plot(Figure, line, view.run_events, view.reference_events)))
            if view.reference_events:
                image, summary = plots.difference_plot(Figure, line, view.run_events,
                                                       view.reference_events)
                images.append(("run minus reference", image))
                notes.append(summary)
            images.append(("throughput over time",
                           plots.throughput_plot(Figure, line, view.run_events)))
            images.append(("per-stage compute and wait", plots.stage_plot(Figure,
                                                                          view.run_events)))
            timeline, note = report_trace.pipeline_timeline(view.run_dir)
            if timeline is not None:
                images.append(("pipeline timeline", timeline))
            if note:
                notes.append(note)
        if view.samples:
            images.append(("CPU per process", plots.process_plot(
                Figure, line, view.samples, "cpu_percent", 1.0, "CPU %")))
            images.append(("memory per process", plots.process_plot(
                Figure, line, view.samples, "rss", MB, "RSS MB")))
    except Exception as exc:  # noqa: BLE001 - a plot failure must not lose the report
        return [f"<p class=note>the plots failed: {_esc(type(exc).__name__)}: {_esc(exc)}</p>"]
    finally:
        _release_fonts()
    if not images:
        return ["<p class=note>no step finished: nothing to plot</p>"]
    parts = [f"<p class=note>{_esc(note)}</p>" for note in notes]
    parts += [f'<p><img alt="{_esc(title)}" src="data:image/png;base64,{data}"></p>'
              for title, data in images if data is not None]
    return parts


def _release_fonts() -> None:
    """matplotlib caches its fonts with their files open; a harness that checks for leaked fds
    (and the test suite's leak check) must not find them, so the cache is emptied after use."""
    import gc

    from matplotlib import font_manager, mathtext

    # The font cache, and mathtext's cache of parsed labels (log-axis ticks are mathtext),
    # whose entries hold fonts of their own.
    for cached in (getattr(font_manager, "_get_font", None),
                   getattr(mathtext.MathTextParser, "_parse_cached", None)):
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()
    gc.collect()  # the font objects close their files when collected
