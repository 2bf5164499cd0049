"""Reports of one scenario run: ``report.json`` for machines, ``report.html`` for people.

The HTML file stands alone (inline CSS, plots as base64 PNG) so it can be attached to an issue
or opened from a CI artifact. Plots need matplotlib (the ``harness`` extra); it is imported only
here and only when a report is written, through its object API and the Agg canvas (no pyplot
global state, no display). Without it the page says so and keeps every table.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipetrain.run.rundir import read_events
from pipetrain_harness.checks import CheckResult, RunOutcome, verdict

MB = 1024 * 1024
COLOURS = {"valid": "#1a7f37", "invalid": "#cf222e", "unknown": "#9a6700"}


def write_report(outcome: RunOutcome, results: list[CheckResult], report_dir: Path,
                 reproduce: str) -> dict[str, Any]:
    """Writes ``report_dir/<scenario name>/report.json`` and ``report.html``; returns the
    report (its ``summary`` is one row for :func:`summary_table`)."""
    scenario = outcome.scenario
    out_dir = Path(report_dir) / scenario.name
    out_dir.mkdir(parents=True, exist_ok=True)
    history = outcome.history.sorted() if outcome.history is not None else []
    processes = process_summaries(outcome.monitor_samples)
    restarts = len(outcome.run_events("restart"))
    overall = verdict(results)
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
        "history": history,
        "summary": {
            "scenario": scenario.name, "verdict": overall, "wall_s": round(outcome.wall_s, 1),
            "restarts": restarts,
            "peak_rss_mb": round(max((p["peak_rss_mb"] for p in processes), default=0.0), 1),
            "failed": [result.name for result in results if result.status != "valid"],
        },
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "report.html").write_text(render_html(report, outcome), encoding="utf-8")
    return report


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
            "pid": pid, "role": own[0].get("role", "?"), "samples": len(own),
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
code { font-size: 12px; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _badge(status: str) -> str:
    colour = COLOURS.get(status, "#656d76")
    return f'<span class="status" style="background:{colour}">{_esc(status)}</span>'


def render_html(report: dict[str, Any], outcome: RunOutcome) -> str:
    scenario = report["scenario"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(scenario['name'])}: {_esc(report['verdict'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{_esc(scenario['name'])} {_badge(report['verdict'])}</h1>",
        f"<p>{_esc(scenario['description'])}</p>",
        f"<p class=note>{_esc(scenario['path'])} &middot; seed {_esc(scenario['seed'])} "
        f"&middot; exit status {_esc(report['exit_status'])} &middot; {report['wall_s']:.1f} s "
        f"&middot; {_esc(report['launches'])} launch(es) &middot; "
        f"{_esc(report['restarts'])} restart(s)</p>",
        "<h2>Reproduce</h2>", f"<pre>{_esc(report['reproduce'])}</pre>",
        "<h2>Checks</h2>", "<table><tr><th>check</th><th>status</th><th>message</th></tr>",
    ]
    for check in report["checks"]:
        parts.append(f"<tr><td>{_esc(check['name'])}</td><td>{_badge(check['status'])}</td>"
                     f"<td>{_esc(check['message'])}</td></tr>")
    parts.append("</table>")
    if report["leaks"]:
        parts += ["<h2>Left behind</h2>", "<ul>"]
        parts += [f"<li>{_esc(leak)}</li>" for leak in report["leaks"]]
        parts.append("</ul>")
    parts.append("<h2>Plots</h2>")
    parts += _plots_html(report, outcome)
    parts += ["<h2>Processes</h2>",
              "<table><tr><th>pid</th><th>role</th><th>samples</th><th>peak RSS MB</th>"
              "<th>mean CPU %</th><th>max CPU %</th><th>max fds</th></tr>"]
    for proc in report["processes"]:
        parts.append(
            f"<tr><td class=num>{_esc(proc['pid'])}</td><td>{_esc(proc['role'])}</td>"
            f"<td class=num>{proc['samples']}</td><td class=num>{proc['peak_rss_mb']:.1f}</td>"
            f"<td class=num>{proc['mean_cpu_percent']:.1f}</td>"
            f"<td class=num>{proc['max_cpu_percent']:.1f}</td>"
            f"<td class=num>{_esc('-' if proc['max_fds'] is None else proc['max_fds'])}</td></tr>")
    parts.append("</table>")
    parts += _history_html(report["history"])
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _history_html(history: list[dict[str, Any]]) -> list[str]:
    t0 = history[0].get("t", 0.0) if history else 0.0
    parts = ["<h2>History</h2>",
             "<table><tr><th>t (s)</th><th>source</th><th>what</th><th>fields</th></tr>"]
    for entry in history:
        what = entry.get("event") if entry.get("source") == "run" else entry.get("op")
        fields = {k: v for k, v in entry.items() if k not in ("t", "source", "event", "op")}
        cls = ' class="harness"' if entry.get("source") == "harness" else ""
        parts.append(
            f"<tr{cls}><td class=num>{entry.get('t', t0) - t0:.3f}</td>"
            f"<td>{_esc(entry.get('source', '?'))}</td><td>{_esc(what)}</td>"
            f"<td><code>{_esc(json.dumps(fields, default=str))}</code></td></tr>")
    parts.append("</table>")
    return parts


# -- plots -----------------------------------------------------------------------------------


def _plots_html(report: dict[str, Any], outcome: RunOutcome) -> list[str]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return ["<p class=note>matplotlib is not installed, so there are no plots "
                "(<code>pip install matplotlib</code>, or the <code>harness</code> extra).</p>"]
    try:
        images = [_loss_plot(Figure, report, outcome),
                  _process_plot(Figure, report, outcome, "cpu_percent", 1.0, "CPU %"),
                  _process_plot(Figure, report, outcome, "rss", MB, "RSS MB")]
    except Exception as exc:  # noqa: BLE001 - a plot failure must not lose the report
        return [f"<p class=note>the plots failed: {_esc(type(exc).__name__)}: {_esc(exc)}</p>"]
    finally:
        _release_fonts()
    return [f'<p><img alt="{_esc(title)}" src="data:image/png;base64,{data}"></p>'
            for title, data in images]


def _release_fonts() -> None:
    """matplotlib caches its fonts with their files open; a harness that checks for leaked fds
    (and the test suite's leak check) must not find them, so the cache is emptied after use."""
    import gc

    from matplotlib import font_manager

    cached = getattr(font_manager, "_get_font", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
        gc.collect()  # the font objects close their files when collected


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _faults(history: list[dict[str, Any]]) -> list[tuple[str, float, str]]:
    return [(entry["op"], entry["t"], str(entry.get("fault", "")))
            for entry in history
            if entry.get("source") == "harness" and entry.get("op") in ("fault_invoke",
                                                                       "fault_heal")]


def _mark_faults(axes: Any, marks: list[tuple[str, float, str]]) -> None:
    labelled = set()
    for op, x, _fault in marks:
        style = {"fault_invoke": ("#cf222e", "--"), "fault_heal": ("#1a7f37", ":")}[op]
        label = op.replace("_", " ") if op not in labelled else None
        labelled.add(op)
        axes.axvline(x, color=style[0], linestyle=style[1], linewidth=1.2, label=label)


def _loss_plot(Figure: Any, report: dict[str, Any], outcome: RunOutcome) -> tuple[str, str]:
    figure = Figure(figsize=(10, 3.6))
    axes = figure.subplots()
    steps = [e for e in outcome.run_events("step") if e.get("loss") is not None]
    last = {e["step"]: e for e in steps}  # after a restart, the repeated steps' last run
    if last:
        xs = sorted(last)
        axes.plot(xs, [last[x]["loss"] for x in xs], label="run", linewidth=1.4)
    if outcome.reference_dir is not None and (Path(outcome.reference_dir) /
                                              "events.jsonl").exists():
        ref = [e for e in read_events(outcome.reference_dir) if e.get("event") == "step"]
        axes.plot([e["step"] for e in ref], [e["loss"] for e in ref], label="reference",
                  linewidth=1, linestyle="--", color="black")
    # A fault's time becomes the step the run had reached then.
    ordered = sorted(steps, key=lambda e: e.get("t", 0.0))
    marks = []
    for op, t, fault in _faults(report["history"]):
        reached = [e["step"] for e in ordered if e.get("t", 0.0) <= t]
        marks.append((op, reached[-1] if reached else 0, fault))
    _mark_faults(axes, marks)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("loss per step: run vs reference")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    return "loss per step", _png(figure)


def _process_plot(Figure: Any, report: dict[str, Any], outcome: RunOutcome, key: str,
                  scale: float, label: str) -> tuple[str, str]:
    figure = Figure(figsize=(10, 3.6))
    axes = figure.subplots()
    samples = outcome.monitor_samples
    times = [s["t"] for s in samples] + [e["t"] for e in report["history"] if "t" in e]
    t0 = min(times, default=0.0)
    series: dict[int, list[dict[str, Any]]] = {}
    for sample in samples:
        series.setdefault(sample["pid"], []).append(sample)
    for pid, own in series.items():
        points = [(s["t"] - t0, s[key] / scale) for s in own if s.get(key) is not None]
        if points:
            axes.plot(*zip(*points, strict=True), label=f"{own[0].get('role', '?')} {pid}",
                      linewidth=1)
    _mark_faults(axes, [(op, t - t0, fault) for op, t, fault in _faults(report["history"])])
    axes.set_xlabel("seconds since start")
    axes.set_ylabel(label)
    axes.set_title(f"{label} per process")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, ncol=4)
    return f"{label} per process", _png(figure)
