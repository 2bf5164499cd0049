"""Runs one scenario: launches the real system, lands each fault at its point, judges afterwards.

::

    rendezvous thread ◀── a process parked at a fault point ── FaultBook.handle: land it
    runner loop (every 20 ms) ── tails events.jsonl ──▶ progress (step)
        ├── heals each fault when its span is over (and always at the end)
        └── relaunches with --resume after a requested stop (resume_after_stop)
    monitor thread ── psutil samples of every process of the run (CPU, memory for the report)
    after the run: leak report (with each process's own start and exit samples), reference
    run (cached), checks, canonical history and its digest, report

The run is started in its own session so that a timeout can end its whole process tree, through
the harness's entry point (``pipetrain_harness.entry``), which installs the harness's hooks from
the plan: which points each process parks at, which boundaries stay quiet, the in-system faults.
It runs in the scenario's work directory, so nothing in the directory the harness was started
from can shadow a module.
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
from pathlib import Path
from typing import Any

from pipetrain_harness import probes
from pipetrain_harness.canonical import canonical_history, digest, replayed_ranges
from pipetrain_harness.checks import CheckResult, RunOutcome, ensure_reference, run_checks, verdict
from pipetrain_harness.faults.base import Context, Launch
from pipetrain_harness.history import History
from pipetrain_harness.landing import FaultBook, count_events, run_shape
from pipetrain_harness.monitor import MARKER_ENV, Baseline, Monitor
from pipetrain_harness.plan import PLAN_ENV, Plan
from pipetrain_harness.rendezvous import Rendezvous
from pipetrain_harness.report import write_report
from pipetrain_harness.scenario import Scenario

TICK_S = 0.02
MAX_RESUMES = 5
ENTRY = [sys.executable, "-P", "-m", "pipetrain_harness.entry"]
# The environment a replay needs besides the scenario: what picks BLAS kernels and threads.
REPLAY_ENV_PREFIXES = ("OPENBLAS_", "OMP_", "MKL_", "PIPETRAIN_")


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


def replay_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of this environment a replay must set the same way."""
    environ = os.environ if environ is None else environ
    return {key: value for key, value in sorted(environ.items())
            if key.startswith(REPLAY_ENV_PREFIXES) and key not in (PLAN_ENV, MARKER_ENV)}


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
        self.probe_path = self.work_dir / "probes.jsonl"
        self.step = 0

    # -- launch --------------------------------------------------------------------------------

    def launch(self, book: FaultBook, socket_path: str, resume: bool) -> subprocess.Popen:
        config_path = self.work_dir / "train.toml"
        args = [*ENTRY, "train", str(config_path), "--run-dir", str(self.run_dir), "--quiet"]
        if resume:
            args.append("--resume")
        env = dict(os.environ)
        env.update(self.baseline.env())  # a token every descendant inherits: finds orphans
        launch = Launch(args=args, env=env, plan=Plan(step_delay_s=self.scenario.step_delay_s,
                                                      seed=self.seed,
                                                      probe_path=str(self.probe_path)))
        book.prepare(launch, socket_path)
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
                            resume=resume, plan=launch.plan.to_json(),
                            at_event=count_events(self.run_dir / "events.jsonl"))
        stderr_path = self.work_dir / f"stderr-{len(self.history.ops('launch'))}.txt"
        with open(stderr_path, "wb") as stderr:
            return subprocess.Popen(launch.args, env=launch.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr,
                                    cwd=self.work_dir,
                                    start_new_session=True)

    # -- the run -------------------------------------------------------------------------------

    def execute(self) -> tuple[RunOutcome, list[CheckResult], dict[str, Any]]:
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True)
        (self.work_dir / "train.toml").write_text(_toml(self.scenario.train))
        ctx = Context(self.run_dir, self.history, self.rng)
        book = FaultBook(self.scenario.faults, run_shape(self.scenario.train_config()), ctx,
                         rng=self.rng,
                         events_path=self.run_dir / "events.jsonl")
        baseline = self.baseline = Baseline.capture()
        tail = EventTail(self.run_dir / "events.jsonl")
        rendezvous = Rendezvous(book.handle).start()
        started = time.monotonic()
        deadline = started + self.scenario.timeout_s
        monitor, proc = None, None
        launches, status, timed_out = 1, None, False
        try:
            proc = self.launch(book, rendezvous.path, resume=False)
            book.land_at_launch()
            monitor = Monitor(proc.pid)
            monitor.start()
            while True:
                for event in tail.poll():
                    if event["event"] == "step":
                        self.step = max(self.step, event["step"])
                book.heal_due(self.step)
                status = proc.poll()
                if status is not None:
                    tail.poll()
                    # resume_after_stop: a run that ended unfinished (stopped on request, or its
                    # coordinator killed) is continued with --resume, as an operator would.
                    unfinished = self._state() not in ("done", "failed", None)
                    if (self.scenario.resume_after_stop and unfinished and status <= 0
                            and launches <= MAX_RESUMES):
                        launches += 1
                        proc = self.launch(book, rendezvous.path, resume=True)
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
            book.finish()
            if proc is not None and proc.poll() is None:
                _kill_tree(proc)
                proc.wait()
            rendezvous.stop()
            wall_s = time.monotonic() - started
            if monitor is not None:
                monitor.stop()
        for error in rendezvous.errors:
            self.history.record("rendezvous_error", error=error)
        own_samples = probes.read(self.probe_path)
        leaks = monitor.leak_report(baseline, judged=probes.exited_cleanly(own_samples))
        leaks += probes.fd_leaks(own_samples)
        monitor.reap_leftovers()
        self.history.add_run_events(tail.events)
        for replayed in replayed_ranges(tail.events):
            self.history.add(replayed)
        canonical = canonical_history(self.history.entries)
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
            wall_s=wall_s, history=self.history,
            monitor_samples=_with_probes(monitor.samples, own_samples),
            peak_rss_mb=monitor.peak_rss_mb(), leaks=leaks, launches=launches,
            reference_dir=reference_dir,
        )
        results = run_checks(outcome)
        report = write_report(outcome, results, self.report_dir, self.reproduce_command())
        extra = {"history_digest": digest(canonical), "canonical_history": canonical,
                 "replay": self.replay_block()}
        report.update(extra)
        _add_to_report(self.work_dir / "report.json", extra)
        return outcome, results, report

    def _state(self) -> str | None:
        try:
            return json.loads((self.run_dir / "run.json").read_text()).get("state")
        except (FileNotFoundError, ValueError):
            return None

    def report_path(self) -> Path:
        return self.work_dir / "report.json"

    def reproduce_command(self) -> str:
        return f"python -m pipetrain_harness replay {self.report_path()}"

    def replay_block(self) -> dict[str, Any]:
        """Everything ``replay`` needs to run this again: the scenario itself (planted bugs
        and all), the seed, and the environment that picks kernels and threads."""
        import numpy

        import pipetrain

        return {"scenario": self.scenario.to_dict(), "seed": self.seed, "env": replay_env(),
                "versions": {"python": sys.version.split()[0], "numpy": numpy.__version__,
                             "pipetrain": pipetrain.__version__}}


def _toml(data: dict[str, Any]) -> str:
    from pipetrain_harness.scenario import scenario_to_toml

    return scenario_to_toml(data)


def _with_probes(samples: list[dict[str, Any]],
                 own: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The monitor's samples and each process's own start and exit samples, in time order
    (for the report: a process too short-lived for the monitor still shows)."""
    extra = [{"t": p["t"], "pid": p["pid"], "ppid": p["ppid"], "name": "python",
              "role": p["role"], "create_time": p["create_time"], "status": f"probe:{p['when']}",
              "cpu_percent": None, "rss": p["rss"], "uss": None, "num_threads": p["num_threads"],
              "num_fds": p["num_fds"], "ctx_switches": None} for p in own]
    return sorted([*samples, *extra], key=lambda sample: sample["t"])


def _add_to_report(path: Path, extra: dict[str, Any]) -> None:
    """report.json is written by the report module; the replay fields are this module's."""
    report = json.loads(path.read_text())
    report.update(extra)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


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
