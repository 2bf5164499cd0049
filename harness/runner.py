"""Runs one scenario: launches the real system, fires the faults on schedule, judges afterwards.

::

    runner loop (every 20 ms) ── tails events.jsonl ──▶ progress (step, checkpoints)
        │                                                   │
        ├── fires each fault when its trigger is reached ◀──┘
        ├── heals it when its span is over (and always at the end)
        └── relaunches with --resume after a requested stop (resume_after_stop)
    monitor thread ── psutil samples of every process of the run
    after the run: leak report, reference run (cached), checks, report

The run is started in its own session so that a timeout can end its whole process tree, through
the harness's entry point (``pipetrain_harness.entry``), which installs the harness's hooks from
the plan the faults prepared; it runs in the scenario's work directory, so nothing in the
directory the harness was started from can shadow a module.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipetrain_harness.checks import CheckResult, RunOutcome, ensure_reference, run_checks, verdict
from pipetrain_harness.faults.base import Context, Fault, Launch, Target
from pipetrain_harness.history import History
from pipetrain_harness.monitor import Baseline, Monitor
from pipetrain_harness.plan import Plan
from pipetrain_harness.report import write_report
from pipetrain_harness.scenario import Scenario, scenario_to_toml

TICK_S = 0.02
MAX_RESUMES = 5
ENTRY = [sys.executable, "-P", "-m", "pipetrain_harness.entry"]


class EventTail:
    """Reads the lines appended to events.jsonl since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # an incomplete last line waits for the rest
        new = [json.loads(line) for line in lines if line.strip()]
        self.events.extend(new)
        return new


@dataclass
class ArmedFault:
    fault: Fault
    fired_at_s: float | None = None
    fired_at_step: int | None = None
    healed: bool = False
    error: str | None = field(default=None)


class ScenarioRun:
    def __init__(self, scenario: Scenario, *, report_dir: Path, seed: int | None = None,
                 cache_dir: Path | None = None) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.rng = random.Random(self.seed)  # noqa: S311 - fault choices, not security
        self.report_dir = Path(report_dir).resolve()  # the run starts in its own directory
        self.work_dir = self.report_dir / scenario.name
        self.run_dir = self.work_dir / "run"
        self.cache_dir = Path(cache_dir) if cache_dir else self.report_dir / ".references"
        self.history = History()
        self.faults = [ArmedFault(fault) for fault in scenario.faults]
        self.step = 0
        self.checkpoints = 0
        self.running = False

    # -- launch --------------------------------------------------------------------------------

    def launch(self, resume: bool) -> subprocess.Popen:
        config_path = self.work_dir / "train.toml"
        args = [*ENTRY, "train", str(config_path), "--run-dir", str(self.run_dir), "--quiet"]
        if resume:
            args.append("--resume")
        env = dict(os.environ)
        env.update(self.baseline.env())  # a token every descendant inherits: finds orphans
        launch = Launch(args=args, env=env, plan=Plan(step_delay_s=self.scenario.step_delay_s,
                                                      seed=self.seed))
        for armed in self.faults:
            armed.fault.prepare(launch)
        launch.env.update(launch.plan.env())
        if launch.rlimits:
            # Limits are set in a tiny Python stub that then execs the run, instead of a
            # preexec_fn, which is unsafe in a process that has threads (the monitor's).
            limits = [(int(k), int(s), int(h)) for k, (s, h) in launch.rlimits.items()]
            stub = ("import os, resource, sys\n"
                    f"for k, s, h in {limits!r}: resource.setrlimit(k, (s, h))\n"
                    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
            launch.args = [sys.executable, "-c", stub, *launch.args[1:]]
        self.history.record("launch", args=launch.args[3:] if launch.rlimits else launch.args[1:],
                            resume=resume, plan=launch.plan.to_json())
        stderr_path = self.work_dir / f"stderr-{len(self.history.ops('launch'))}.txt"
        with open(stderr_path, "wb") as stderr:
            return subprocess.Popen(launch.args, env=launch.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr,
                                    cwd=self.work_dir,
                                    start_new_session=True)

    # -- faults --------------------------------------------------------------------------------

    def _due(self, armed: ArmedFault) -> bool:
        fault = armed.fault
        if fault.at_step is not None:
            return self.step >= fault.at_step
        if fault.after_checkpoint is not None:
            return self.checkpoints >= fault.after_checkpoint
        return self.running

    def _span_over(self, armed: ArmedFault) -> bool:
        fault = armed.fault
        if fault.duration_s is not None:
            return time.monotonic() - armed.fired_at_s >= fault.duration_s
        if fault.for_steps is not None and fault.for_steps > 0:
            return self.step >= armed.fired_at_step + fault.for_steps
        return False

    def fire_and_heal(self, ctx: Context) -> None:
        for armed in self.faults:
            if armed.fired_at_s is None and self._due(armed):
                armed.fired_at_s, armed.fired_at_step = time.monotonic(), self.step
                self.history.record("fault_invoke", fault=armed.fault.describe(), step=self.step)
                try:
                    armed.fault.invoke(ctx)
                except Exception as exc:  # noqa: BLE001 - a fault that cannot act is recorded
                    armed.error = f"{type(exc).__name__}: {exc}"
                    self.history.record("fault_error", fault=armed.fault.describe(),
                                        error=armed.error)
            elif armed.fired_at_s is not None and not armed.healed and self._span_over(armed):
                self.heal(armed, ctx)

    def heal(self, armed: ArmedFault, ctx: Context) -> None:
        armed.healed = True
        try:
            armed.fault.heal(ctx)
        except Exception as exc:  # noqa: BLE001 - healing must not stop the other heals
            self.history.record("fault_error", fault=armed.fault.describe(), error=str(exc))
        self.history.record("fault_heal", fault=armed.fault.describe(), step=self.step)

    # -- the run -------------------------------------------------------------------------------

    def execute(self) -> tuple[RunOutcome, list[CheckResult], dict[str, Any]]:
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True)
        (self.work_dir / "train.toml").write_text(scenario_to_toml(self.scenario.train))
        ctx = Context(self.run_dir, Target(self.run_dir, self.rng), self.history, self.rng,
                      progress=lambda: self.step)
        baseline = self.baseline = Baseline.capture()
        tail = EventTail(self.run_dir / "events.jsonl")
        started = time.monotonic()
        deadline = started + self.scenario.timeout_s
        proc = self.launch(resume=False)
        monitor = Monitor(proc.pid)
        monitor.start()
        launches, status, timed_out = 1, None, False
        try:
            while True:
                for event in tail.poll():
                    if event["event"] == "step":
                        self.step = max(self.step, event["step"])
                    elif event["event"] == "checkpoint":
                        self.checkpoints += 1
                self.running = self.running or self._state() in ("running", "paused")
                self.fire_and_heal(ctx)
                status = proc.poll()
                if status is not None:
                    tail.poll()
                    # resume_after_stop: a run that ended unfinished (stopped on request, or its
                    # coordinator killed) is continued with --resume, as an operator would.
                    unfinished = self._state() not in ("done", "failed", None)
                    if (self.scenario.resume_after_stop and unfinished and status <= 0
                            and launches <= MAX_RESUMES):
                        launches += 1
                        proc = self.launch(resume=True)
                        monitor.add_root(proc.pid)
                        continue
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    self.history.record("timeout", after_s=self.scenario.timeout_s)
                    _kill_tree(proc)
                    status = proc.wait()
                    break
                time.sleep(TICK_S)
        finally:
            for armed in self.faults:
                if armed.fired_at_s is not None and not armed.healed:
                    self.heal(armed, ctx)
            if proc.poll() is None:
                _kill_tree(proc)
                proc.wait()
            wall_s = time.monotonic() - started
            monitor.stop()
        leaks = monitor.leak_report(baseline)
        monitor.reap_leftovers()
        self.history.add_run_events(tail.events)
        stderr = "".join(p.read_text(errors="replace")
                         for p in sorted(self.work_dir.glob("stderr-*.txt")))
        if timed_out:
            stderr += f"\nharness: timed out after {self.scenario.timeout_s}s\n"
        reference_dir = None
        expect = self.scenario.expect
        if expect.equivalence != "none" and expect.exit_status == 0:
            try:
                reference_dir = ensure_reference(self.scenario.train, self.cache_dir)
            except RuntimeError as exc:  # the equivalence check will answer "unknown"
                self.history.record("reference_error", error=str(exc))
        outcome = RunOutcome(
            scenario=self.scenario, run_dir=self.run_dir, exit_status=status, stderr=stderr,
            wall_s=wall_s, history=self.history, monitor_samples=monitor.samples,
            peak_rss_mb=monitor.peak_rss_mb(), leaks=leaks, launches=launches,
            reference_dir=reference_dir,
        )
        results = run_checks(outcome)
        report = write_report(outcome, results, self.report_dir, self.reproduce_command())
        return outcome, results, report

    def _state(self) -> str | None:
        try:
            return json.loads((self.run_dir / "run.json").read_text()).get("state")
        except (FileNotFoundError, ValueError):
            return None

    def reproduce_command(self) -> str:
        return f"python -m pipetrain_harness run {self.scenario.path} --seed {self.seed}"


def _kill_tree(proc: subprocess.Popen) -> None:
    """End the run's whole session: the coordinator and anything it left behind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_scenario(scenario: Scenario, *, report_dir: Path, seed: int | None = None,
                 cache_dir: Path | None = None) -> tuple[str, list[CheckResult], dict[str, Any],
                                                          str]:
    """(verdict, check results, report, reproduce command) of one scenario."""
    run = ScenarioRun(scenario, report_dir=report_dir, seed=seed, cache_dir=cache_dir)
    _outcome, results, report = run.execute()
    return verdict(results), results, report, run.reproduce_command()
