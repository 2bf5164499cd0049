"""``pipetrain status``: what a run directory says about its run, for people and for scripts.

Read from ``run.json`` and ``events.jsonl`` only, so it works for a run that is going, one that
ended and one whose coordinator was killed. Pids are listed only while the process lives: a
dead coordinator's pid is no handle for anything, and a recycled one would name a stranger.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import psutil

from pipetrain.run.metrics import RateWindow
from pipetrain.run.progress import duration

ACTIVE = ("starting", "running", "paused", "recovering")


def alive(pid: Any) -> bool:
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, TypeError, ValueError):
        return False


def _finite(value: Any) -> float | None:
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def summarize(state: dict[str, Any], events: list[dict[str, Any]],
              now: float | None = None) -> dict[str, Any]:
    """The status of a run: ``run.json``'s state with elapsed time, ETA, restarts and the live
    pids. ``elapsed_s`` counts the current (or last) launch, from its ``run_start``."""
    now = time.time() if now is None else now
    active = state.get("state") in ACTIVE
    starts = [e for e in events if e.get("event") == "run_start"]
    elapsed = None
    if starts:
        end = now if active else events[-1].get("t", now)
        elapsed = max(0.0, end - starts[-1]["t"])
    total = state.get("total_steps")
    batch = (state.get("config") or {}).get("batch_size") or 1
    # The events are fresher than run.json (rewritten every half second): the step and the
    # rate come from them, with the window the terminal uses (pauses cut out).
    window = RateWindow()
    step, loss = state.get("step") or 0, state.get("last_loss")
    for event in events[events.index(starts[-1]):] if starts else events:
        name = event.get("event")
        if name == "step":
            step, loss = event["step"], event.get("loss")
            window.add(event["t"], step)
        elif name == "paused":
            window.pause(event["t"])
        elif name == "resumed":
            window.resume(event["t"])
    steps_per_s = window.steps_per_s()
    rate = steps_per_s * batch if steps_per_s else _finite(state.get("samples_per_s"))
    eta = None
    if active and state.get("state") == "running" and rate and total is not None:
        eta = max(0, total - step) * batch / rate
    evaluations = [e for e in events if e.get("event") == "evaluate"]
    scored = [e for e in evaluations if _finite(e.get("accuracy")) is not None]
    coordinator = state.get("coordinator_pid")
    return {
        "state": state.get("state"),
        "command": state.get("command"),
        "step": step, "total_steps": total,
        "epoch": state.get("epoch"), "epochs": (state.get("config") or {}).get("epochs"),
        "last_loss": _finite(loss),
        "samples_per_s": None if rate is None else round(rate, 1),
        "accuracy": _finite(state.get("accuracy")),
        "eval_loss": _finite(state.get("eval_loss")),
        "best_accuracy": max((e["accuracy"] for e in scored), default=None),
        "elapsed_s": None if elapsed is None else round(elapsed, 3),
        "eta_s": None if eta is None else round(eta, 3),
        "restarts": state.get("restarts", 0),
        "coordinator_pid": coordinator if coordinator and alive(coordinator) else None,
        "worker_pids": [pid for pid in state.get("worker_pids", []) if alive(pid)],
        "last_checkpoint": state.get("last_checkpoint"),
        "error": state.get("error"),
    }


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary(summary: dict[str, Any], run_dir: str | Path) -> str:
    """The summary as aligned lines, numbers rounded, nothing printed as ``None``."""
    step, total = summary["step"], summary["total_steps"]
    progress = f"{step}/{total}" if total else str(step)
    if total:
        progress += f" ({100 * step / total:.0f}%)"
    epochs = summary.get("epochs")
    rows = [
        ("run", f"{run_dir} ({summary.get('command') or '?'})"),
        ("state", str(summary["state"])),
        ("step", progress),
        ("epoch", f"{summary['epoch']}/{epochs}" if epochs else str(summary["epoch"] or 0)),
        ("loss", _fixed(summary["last_loss"], 4)),
        ("held-out", f"loss {_fixed(summary['eval_loss'], 4)}, accuracy "
                     f"{_fixed(summary['accuracy'], 4)} (best "
                     f"{_fixed(summary['best_accuracy'], 4)})"),
        ("samples/s", "-" if summary["samples_per_s"] is None
         else f"{summary['samples_per_s']:,.0f}"),
        ("elapsed", duration(summary["elapsed_s"])),
        ("ETA", duration(summary["eta_s"]) if summary["eta_s"] is not None else "-"),
        ("restarts", str(summary["restarts"])),
        ("checkpoint", summary["last_checkpoint"] or "-"),
        ("coordinator", str(summary["coordinator_pid"] or "not running")),
        ("workers", " ".join(map(str, summary["worker_pids"])) or "none running"),
    ]
    if summary.get("error"):
        rows.append(("error", summary["error"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
