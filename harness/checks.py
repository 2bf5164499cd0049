"""The checkers: each judges one expectation of a scenario after the run, from a RunOutcome.

A checker answers ``valid``, ``invalid`` or ``unknown`` (it cannot tell, for example because
the run left nothing to compare). A checker that raises is a bug in the checker or a run
directory it did not foresee: it becomes ``unknown`` with the exception text, never a crashed
harness and never a silent pass (after Jepsen's checkers).

The equivalence check compares against a single-process reference run of the same math
configuration, built once per ``TrainConfig.math_digest()`` by :func:`ensure_reference`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipetrain.config import MATH_KEYS, build_config
from pipetrain.nn.digest import DIGEST
from pipetrain.run.rundir import load_params, read_events, read_state

STATUSES = ("valid", "invalid", "unknown")


@dataclass
class RunOutcome:
    """Everything the checks judge, gathered by the runner once the run is over."""

    scenario: Any  # pipetrain_harness.scenario.Scenario
    run_dir: Path
    exit_status: int
    stderr: str
    wall_s: float
    history: Any  # pipetrain_harness.history.History
    monitor_samples: list[dict[str, Any]]
    peak_rss_mb: dict[int, float]
    leaks: list[str]
    launches: int
    reference_dir: Path | None

    def run_events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The run's events: from the history, or from events.jsonl if the history has none."""
        events = self.history.run_events() if self.history is not None else []
        if not events and (Path(self.run_dir) / "events.jsonl").exists():
            events = read_events(self.run_dir)
        return [e for e in events if name is None or e.get("event") == name]

    def roles(self) -> dict[int, str]:
        return {s["pid"]: s.get("role", "?") for s in self.monitor_samples}


@dataclass
class CheckResult:
    name: str
    status: str  # "valid" | "invalid" | "unknown"
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def _result(name: str, ok: bool, message: str, **details: Any) -> CheckResult:
    return CheckResult(name, "valid" if ok else "invalid", message, details)


# -- the checks ------------------------------------------------------------------------------


def check_exit_status(outcome: RunOutcome) -> CheckResult:
    want = outcome.scenario.expect.exit_status
    got = outcome.exit_status
    return _result("exit_status", got == want, f"exit status {got} (expected {want})",
                   expected=want, actual=got)


def check_error_matches(outcome: RunOutcome) -> CheckResult:
    pattern = outcome.scenario.expect.error_matches
    found = re.search(pattern, outcome.stderr)
    if found:
        return _result("error_matches", True, f"stderr matches {pattern!r}: {found.group(0)!r}")
    tail = outcome.stderr.strip().splitlines()[-3:]
    return _result("error_matches", False,
                   f"stderr does not match {pattern!r} (its end: {' | '.join(tail) or 'empty'})",
                   pattern=pattern)


def check_state(outcome: RunOutcome) -> CheckResult:
    want = outcome.scenario.expect.state
    try:
        got = read_state(outcome.run_dir).get("state")
    except FileNotFoundError:
        return CheckResult("state", "unknown", f"no run.json in {outcome.run_dir}")
    return _result("state", got == want, f"final state {got!r} (expected {want!r})",
                   expected=want, actual=got)


def check_restarts(outcome: RunOutcome) -> CheckResult:
    want = outcome.scenario.expect.restarts
    restarts = outcome.run_events("restart")
    got = len(restarts)
    return _result("restarts", got == want, f"{got} restart(s) (expected {want})",
                   expected=want, actual=got, from_steps=[e.get("from_step") for e in restarts])


def check_no_leaks(outcome: RunOutcome) -> CheckResult:
    if not outcome.leaks:
        return _result("no_leaks", True, "no process, zombie, fd or shared memory left behind")
    more = f" (and {len(outcome.leaks) - 5} more)" if len(outcome.leaks) > 5 else ""
    return _result("no_leaks", False, "; ".join(outcome.leaks[:5]) + more,
                   leaks=list(outcome.leaks))


def check_max_rss_mb(outcome: RunOutcome) -> CheckResult:
    limit = outcome.scenario.expect.max_rss_mb
    if not outcome.peak_rss_mb:
        return CheckResult("max_rss_mb", "unknown", "the monitor took no memory sample")
    pid, peak = max(outcome.peak_rss_mb.items(), key=lambda item: item[1])
    role = outcome.roles().get(pid, "?")
    return _result("max_rss_mb", peak <= limit,
                   f"peak RSS {peak:.1f} MB at pid {pid} ({role}) (limit {limit:g} MB)",
                   pid=pid, role=role, peak_mb=peak, limit_mb=limit)


def check_max_wall_s(outcome: RunOutcome) -> CheckResult:
    limit = outcome.scenario.expect.max_wall_s
    return _result("max_wall_s", outcome.wall_s <= limit,
                   f"wall time {outcome.wall_s:.1f} s (limit {limit:g} s)",
                   wall_s=outcome.wall_s, limit_s=limit)


def check_equivalence(outcome: RunOutcome) -> CheckResult:
    expect = outcome.scenario.expect
    if outcome.reference_dir is None:
        return CheckResult("equivalence", "unknown", "no reference run to compare with")
    reference_steps = [e for e in read_events(outcome.reference_dir) if e.get("event") == "step"]
    step_diff = first_differing_step(outcome.run_events("step"), reference_steps)
    run_final = Path(outcome.run_dir) / "final.npz"
    details: dict[str, Any] = {"mode": expect.equivalence, "steps": len(reference_steps),
                               "first_differing_step": step_diff}
    parts = []
    # Digests are exact; under "tolerance" differing bits are allowed, so they only inform.
    steps_fail = step_diff is not None and expect.equivalence == "bitwise"
    if step_diff is not None:
        parts.append(_describe_step(step_diff))
    if not run_final.exists():
        parts.append(f"the run wrote no final.npz (exit status {outcome.exit_status})")
        return CheckResult("equivalence", "invalid" if steps_fail else "unknown",
                           "; ".join(parts), details)
    run_params = load_params(run_final)
    ref_params = load_params(Path(outcome.reference_dir) / "final.npz")
    param_diff = compare_params(run_params, ref_params, expect.equivalence, expect.tolerance)
    details["first_differing_parameter"] = param_diff
    if param_diff is not None:
        parts.append(f"final parameters differ first at {param_diff['name']} "
                     f"({param_diff['why']})")
    if steps_fail or param_diff is not None:
        if step_diff is None:
            parts.insert(0, "every step's grad_digest matches the reference")
        return CheckResult("equivalence", "invalid", "; ".join(parts), details)
    if expect.equivalence == "bitwise":
        message = (f"{len(reference_steps)} steps and {len(ref_params)} parameters bitwise "
                   f"equal to the reference")
    else:
        message = (f"{len(ref_params)} parameters within relative tolerance "
                   f"{expect.tolerance:g} of the reference")
        if step_diff is not None:
            message += f" (bits differ from step {step_diff['step']})"
    return CheckResult("equivalence", "valid", message, details)


def first_differing_step(run_steps: list[dict[str, Any]],
                         reference_steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first reference step whose digest the run does not match (missing counts).

    After a restart the run repeats steps from its checkpoint: the last occurrence of each
    step is the one its final parameters are built on.
    """
    last = {e["step"]: e for e in run_steps}
    for ref in reference_steps:
        ours = last.get(ref["step"])
        if ours is None:
            return {"step": ref["step"], "run": None, "reference": ref.get("grad_digest")}
        if ours.get("grad_digest") != ref.get("grad_digest"):
            return {"step": ref["step"], "run": ours.get("grad_digest"),
                    "reference": ref.get("grad_digest"),
                    "run_loss": ours.get("loss"), "reference_loss": ref.get("loss")}
    extra = sorted(set(last) - {e["step"] for e in reference_steps})
    if extra:
        return {"step": extra[0], "run": last[extra[0]].get("grad_digest"), "reference": None}
    return None


def _describe_step(diff: dict[str, Any]) -> str:
    if diff["run"] is None:
        return f"first differing step {diff['step']} (missing from the run)"
    if diff["reference"] is None:
        return f"first differing step {diff['step']} (beyond the reference's last step)"
    return (f"first differing step {diff['step']} (grad_digest {diff['run'][:12]} vs "
            f"reference {diff['reference'][:12]})")


def _param_order(name: str) -> tuple[Any, ...]:
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        return (0, int(parts[1]), {"weight": 0, "bias": 1}.get(parts[2], 2), parts[2])
    return (1, 0, 0, name)


def compare_params(run: dict[str, np.ndarray], reference: dict[str, np.ndarray], mode: str,
                   tolerance: float | None = None) -> dict[str, Any] | None:
    """The first parameter (canonical order) that differs, with why; None when all agree."""
    for name in sorted(set(run) | set(reference), key=_param_order):
        if name not in run or name not in reference:
            where = "run" if name in reference else "reference"
            return {"name": name, "why": f"missing from the {where}"}
        a, b = run[name], reference[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            return {"name": name, "why": f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"}
        if mode == "bitwise":
            if np.array_equal(a, b) or a.tobytes() == b.tobytes():  # the latter: equal NaNs
                continue
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            return {"name": name, "why": f"max abs diff {diff:.2g}", "max_abs_diff": diff}
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        scale = float(np.max(np.abs(b.astype(np.float64)), initial=0.0))
        relative = diff / scale if scale > 0 else diff
        if not relative <= tolerance:  # also catches NaN
            return {"name": name, "why": f"relative max error {relative:.2g} > {tolerance:g}",
                    "relative_error": relative}
    return None


# -- running them ------------------------------------------------------------------------------

# (name, applies to this outcome?, check). Order: what a reader wants to see first.
CHECKS: list[tuple[str, Callable[[RunOutcome], bool], Callable[[RunOutcome], CheckResult]]] = [
    ("exit_status", lambda o: True, check_exit_status),
    ("error_matches", lambda o: o.scenario.expect.error_matches is not None,
     check_error_matches),
    ("state", lambda o: o.scenario.expect.state is not None, check_state),
    ("restarts", lambda o: o.scenario.expect.restarts is not None, check_restarts),
    ("equivalence", lambda o: o.scenario.expect.equivalence != "none"
     and o.scenario.expect.exit_status == 0, check_equivalence),
    ("no_leaks", lambda o: o.scenario.expect.no_leaks, check_no_leaks),
    ("max_rss_mb", lambda o: o.scenario.expect.max_rss_mb is not None, check_max_rss_mb),
    ("max_wall_s", lambda o: o.scenario.expect.max_wall_s is not None, check_max_wall_s),
]


def run_checks(outcome: RunOutcome,
               checks: list[tuple[str, Callable[[RunOutcome], bool],
                                  Callable[[RunOutcome], CheckResult]]] | None = None,
               ) -> list[CheckResult]:
    results = []
    for name, applies, check in CHECKS if checks is None else checks:
        try:
            if not applies(outcome):
                continue
            result = check(outcome)
            if result.status not in STATUSES:
                raise ValueError(f"answered {result.status!r}")
        except Exception as exc:  # noqa: BLE001 - a crashing checker yields unknown
            result = CheckResult(name, "unknown", f"the check crashed: {type(exc).__name__}: "
                                 f"{exc}", {"exception": type(exc).__name__})
        results.append(result)
    return results


def verdict(results: list[CheckResult]) -> str:
    statuses = {result.status for result in results}
    if "invalid" in statuses:
        return "invalid"
    if statuses <= {"valid"}:
        return "valid"
    return "unknown"


# -- the reference run -----------------------------------------------------------------------


def reference_config(train: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``train`` that decide the numbers (``MATH_KEYS``), fully resolved: how many
    stages, which schedule or transport never change the reference's result."""
    math = {key: value for key, value in train.items() if key in MATH_KEYS}
    return build_config({**math, "stages": 1}, source="scenario train").math_config()


def ensure_reference(train: dict[str, Any], cache_dir: Path, *, timeout_s: float = 900) -> Path:
    """The directory of a finished reference run for ``train``'s math, built if not cached.

    Built under a temporary name and renamed into place, so parallel scenario runs never see
    half a reference; when two build the same one, the first rename wins and both use it.
    """
    from pipetrain_harness.scenario import scenario_to_toml

    values = reference_config(train)
    digest = build_config({**values, "stages": 1}).math_digest()
    cache_dir = Path(cache_dir)
    # The gradient digest's hash is in the name: a reference hashed by another pipetrain
    # would differ from every step of the run under test, bits equal or not.
    final_dir = cache_dir / f"ref-{DIGEST}-{digest}"
    if (final_dir / "final.npz").exists():
        return final_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".ref-{digest[:12]}-", dir=cache_dir))
    try:
        config_path = work / "reference.toml"
        config_path.write_text(scenario_to_toml(values))  # `reference` runs one stage anyway
        run_dir = work / "run"
        try:  # plain pipetrain: no harness hooks, no plan
            result = subprocess.run(
                [sys.executable, "-P", "-m", "pipetrain", "reference", str(config_path),
                 "--run-dir", str(run_dir), "--quiet"],
                capture_output=True, text=True, env=dict(os.environ), stdin=subprocess.DEVNULL,
                cwd=work, timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the reference run took longer than {timeout_s:g}s") from None
        if result.returncode != 0 or not (run_dir / "final.npz").exists():
            raise RuntimeError(f"the reference run failed (exit {result.returncode}): "
                               f"{result.stderr.strip() or result.stdout.strip()}")
        shutil.copy(config_path, run_dir / "reference.toml")
        try:
            os.rename(run_dir, final_dir)
        except OSError:
            if not (final_dir / "final.npz").exists():
                raise
        return final_dir
    finally:
        shutil.rmtree(work, ignore_errors=True)
