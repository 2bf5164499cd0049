"""``RUN_DIR/trace.json``: the per-process trace files of a run, merged into one document.

Each process of a ``--trace`` run writes ``RUN_DIR/trace/<process>.json`` when it exits
(``pipetrain.tracing``); the coordinator merges them here at the end of the run. The result is
the Chrome trace-event format (a ``traceEvents`` list of complete "X" events in microseconds
and "M" name metadata), which Perfetto and chrome://tracing open as they are: one track per
process (sorted coordinator first, then stage by stage) and per thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipetrain import tracing

TRACE_DIR = "trace"
TRACE_FILE = "trace.json"


class TraceError(ValueError):
    """No trace, or one that cannot be read; the message names the file."""


def start_recording(run_dir: Path) -> None:
    """Trace this process (the coordinator) into ``run_dir``'s trace directory."""
    tracing.install(tracing.Recorder(run_dir / TRACE_DIR, f"coordinator-{os.getpid()}",
                                     "coordinator"))


def finish_recording(run_dir: Path) -> None:
    """Write this process's part, merge every part into ``trace.json`` and stop recording;
    the parts go once merged. A trace is worth keeping, never worth failing a run for."""
    with contextlib.suppress(OSError, ValueError):
        tracing.current().write()
        merge_trace(run_dir)
        shutil.rmtree(run_dir / TRACE_DIR, ignore_errors=True)
    tracing.install(tracing.NullRecorder())


def merge_trace(run_dir: Path | str) -> Path:
    """Merge every ``RUN_DIR/trace/*.json`` into ``RUN_DIR/trace.json`` (written atomically)."""
    run_dir = Path(run_dir)
    parts = sorted((run_dir / TRACE_DIR).glob("*.json"))
    events: list[dict[str, Any]] = []
    processes = []
    for path in parts:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a process killed while writing leaves no usable file: skip it
        events.extend(document.get("traceEvents", []))
        processes.append({"file": path.name, **document.get("otherData", {})})
    out = run_dir / TRACE_FILE
    temporary = out.with_suffix(".tmp")
    temporary.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                     "otherData": {"processes": processes}},
                                    separators=(",", ":")))
    os.replace(temporary, out)
    return out


def load_trace(run_dir: Path | str) -> list[dict[str, Any]]:
    """The events of ``RUN_DIR/trace.json`` (merged first if only the parts are there)."""
    run_dir = Path(run_dir)
    path = run_dir / TRACE_FILE
    if not path.exists() and (run_dir / TRACE_DIR).is_dir():
        path = merge_trace(run_dir)
    if not path.exists():
        raise TraceError(f"{run_dir}: no {TRACE_FILE} (train with --trace to record one)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TraceError(f"{path}: unreadable ({exc})") from None
    events = document.get("traceEvents") if isinstance(document, dict) else None
    if not isinstance(events, list):
        raise TraceError(f"{path}: not a trace-event document (no traceEvents list)")
    return events
