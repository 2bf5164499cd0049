"""The history section of a report: one timestamped list of the run's events and the
harness's operations, grouped and folded so that it reads.

A run of consecutive step events is one row (first and last step, the loss from and to), opened
on demand into one short line per step; every other entry is a row of its own, with its fields
as ``key value`` pairs (floats to 6 significant digits, long values cut). Harness operations are
highlighted, restarts, errors and failed worker exits marked. The whole section is folded away
behind its summary line.
"""

from __future__ import annotations

import html
import json
from typing import Any

from pipetrain.run.metrics import stage_timings


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fields(entry: dict[str, Any], limit: int = 160) -> str:
    shown = []
    for key, value in entry.items():
        if key in ("t", "source", "event", "op"):
            continue
        if isinstance(value, float):
            text = f"{value:.6g}"
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > limit:
            text = text[:limit] + "…"
        shown.append(f'<span class="kv">{esc(key)}</span> {esc(text)}')
    return " &middot; ".join(shown)


def _step_fields(event: dict[str, Any]) -> str:
    """A step in one short line: its loss, digest prefix and each stage's milliseconds."""
    parts = [f"loss {event['loss']:.6g}" if isinstance(event.get("loss"), float) else ""]
    if event.get("grad_digest"):
        parts.append(f"digest {event['grad_digest'][:12]}…")
    for stage, timing in stage_timings(event.get("metrics")).items():
        parts.append(f"stage {stage}: {1000 * timing['compute_s']:.2f} ms compute, "
                     f"{1000 * timing['wait_s']:.2f} ms waiting")
    return esc(" · ".join(part for part in parts if part))


def _groups(history: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive step events together; everything else alone."""
    groups: list[list[dict[str, Any]]] = []
    for entry in history:
        is_step = entry.get("source") == "run" and entry.get("event") == "step"
        if is_step and groups and groups[-1][0].get("event") == "step" \
                and groups[-1][0].get("source") == "run":
            groups[-1].append(entry)
        else:
            groups.append([entry])
    return groups


def history_html(history: list[dict[str, Any]]) -> list[str]:
    t0 = history[0].get("t", 0.0) if history else 0.0
    groups = _groups(history)
    parts = ["<h2>History</h2>",
             f"<details><summary>{len(history)} entries in {len(groups)} rows (runs of steps "
             "grouped; harness operations highlighted): show</summary>",
             "<table><tr><th>t (s)</th><th>source</th><th>what</th><th>details</th></tr>"]
    for group in groups:
        first = group[0]
        t = f"{first.get('t', t0) - t0:.3f}"
        if first.get("event") == "step" and first.get("source") == "run":
            loss = (f"loss {group[0].get('loss', 0):.4f} → {group[-1].get('loss', 0):.4f}"
                    if all(isinstance(e.get("loss"), float) for e in (group[0], group[-1]))
                    else "")
            label = (f"step {first['step']}" if len(group) == 1 else
                     f"steps {first['step']}–{group[-1]['step']} ({len(group)})")
            rows = "".join(f"<tr><td class=num>{e.get('t', t0) - t0:.3f}</td><td class=num>"
                           f"{esc(e.get('step'))}</td><td>{_step_fields(e)}</td></tr>"
                           for e in group)
            parts.append(f"<tr><td class=num>{t}</td><td>run</td><td>{esc(label)}</td><td>"
                         f"<details><summary>{esc(loss)}</summary><table>{rows}</table>"
                         "</details></td></tr>")
            continue
        harness = first.get("source") == "harness"
        what = first.get("op") if harness else first.get("event")
        alert = what in ("restart", "error", "fault_error", "timeout") or (
            what == "worker_exit" and first.get("returncode") not in (0, None))
        cls = ' class="harness"' if harness else ' class="alert"' if alert else ""
        parts.append(f"<tr{cls}><td class=num>{t}</td><td>{esc(first.get('source', '?'))}"
                     f"</td><td>{esc(what)}</td><td>{_fields(first)}</td></tr>")
    parts += ["</table>", "</details>"]
    return parts
