"""Shared helpers for tests that run pipetrain as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil

from pipetrain_harness.plan import PLAN_ENV, Plan

REPO = Path(__file__).resolve().parent.parent


# The installed package's command line; -P: the working directory cannot shadow it.
PIPETRAIN = [sys.executable, "-P", "-m", "pipetrain"]
# The same through the harness's entry point, which installs its hooks from a plan.
HARNESSED = [sys.executable, "-P", "-m", "pipetrain_harness.entry"]


def cli_env(plan: Plan | None = None, **extra: str) -> dict[str, str]:
    """The environment of a run; with ``plan``, what the harness's hooks do inside it (the run
    must then be started through the harness's entry point: ``harnessed=True``)."""
    env = dict(os.environ)
    env.pop(PLAN_ENV, None)
    if plan is not None:
        env.update(plan.env())
    env.update(extra)
    return env


def _command(env: dict[str, str] | None) -> list[str]:
    return HARNESSED if env is not None and PLAN_ENV in env else PIPETRAIN


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """``pipetrain ARGS``; through the harness's entry point when ``env`` carries a plan."""
    result = subprocess.run(
        [*_command(env), *args], capture_output=True, text=True,
        timeout=timeout, env=env or cli_env(), cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"pipetrain {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*_command(env), *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env or cli_env(), cwd=REPO,
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> int:
    """Wait for a process from :func:`start_cli` (killed if it outlives ``timeout``) and close
    its pipes; its exit status."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def last_step(run_dir: Path) -> int:
    """The highest step a (maybe still running) run has reported; 0 before its first."""
    return max((e["step"] for e in read_events(run_dir) if e["event"] == "step"), default=0)


def load_params(run_dir: Path, name: str = "final.npz") -> dict[str, np.ndarray]:
    with np.load(Path(run_dir) / name, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def read_events(run_dir: Path) -> list[dict]:
    """The events of a run that may still be writing: a line without its newline yet (being
    written) is left out, and a run that has not started yet has none."""
    try:
        text = (Path(run_dir) / "events.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def step_events(run_dir: Path) -> list[dict]:
    return [e for e in events(run_dir) if e["event"] == "step"]


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b), f"parameter names differ: {list(a)} vs {list(b)}"
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def assert_same_steps(run_a: Path, run_b: Path) -> None:
    steps_a = [(e["step"], e["loss"], e["grad_digest"]) for e in step_events(run_a)]
    steps_b = [(e["step"], e["loss"], e["grad_digest"]) for e in step_events(run_b)]
    assert len(steps_a) == len(steps_b) and steps_a, (len(steps_a), len(steps_b))
    for x, y in zip(steps_a, steps_b, strict=True):
        assert x == y, f"first differing step: {x} vs {y}"


def run_state(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


def assert_no_survivors(run_dir: Path) -> None:
    """Every process the run recorded is gone (not even a zombie of ours)."""
    state = run_state(run_dir)
    pids = [state.get("coordinator_pid"), *state.get("worker_pids", [])]
    for pid in filter(None, pids):
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                continue  # dead; an orphan's zombie waits for a PID 1 that may never reap it
            cmdline = " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        # pid reuse: only a process started by this run counts
        assert "system." not in cmdline, f"pid {pid} survived the run"


def wait_for(predicate, *, timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Re-check a condition until it holds; fail naming it if the deadline passes."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except (FileNotFoundError, ValueError, KeyError):
            pass  # the file is not there yet, or a line is being written
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)
