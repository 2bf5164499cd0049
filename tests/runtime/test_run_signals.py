"""Unix signals sent to a real `pipetrain train` mid-run (the "Signals" contract of DESIGN.md).

Each run is slowed down with the harness plan's step_delay_s (every stage sleeps before each step)
so that a signal lands in the middle of training. Tests synchronise on what the run writes
(events.jsonl, run.json), never on fixed sleeps, and always end the processes they start.
Whatever a signal did, the final parameters must be bitwise equal to the single-process
reference, and every step's loss and gradient digest must be the reference's.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from pipetrain.run import checkpoint
from pipetrain_harness.plan import Plan
from tests.helpers import (
    assert_bitwise_equal,
    assert_no_survivors,
    cli_env,
    load_params,
    read_events,
    run_cli,
    run_state,
    start_cli,
    step_events,
)

EPOCHS = 4  # 22 steps an epoch with the default config: 88 steps, about 2 s at 20 ms a step
OPTIONS = ("--epochs", str(EPOCHS), "--quiet")
STEP_DELAY_S = 0.02
START_TIMEOUT_S = 60.0  # generous: two xdist workers share two cores with the run's processes
FINISH_TIMEOUT_S = 120.0


# -- helpers -----------------------------------------------------------------------------------


def events_named(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == name]


def last_step(run_dir: Path) -> int:
    steps = events_named(run_dir, "step")
    return steps[-1]["step"] if steps else 0


def read_state(run_dir: Path) -> dict:
    try:
        return run_state(run_dir)
    except FileNotFoundError:
        return {}


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str,
             proc: subprocess.Popen | None = None, interval_s: float = 0.02) -> object:
    """Re-check ``predicate`` every ``interval_s`` until it holds; fail clearly at the deadline
    or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()  # it may have come true just before the exit
            if value:
                return value
            pytest.fail(f"the run exited with status {proc.returncode} before {what}")
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def waiting_in_poll(pid: int) -> bool:
    """The process's main thread sleeps in poll: the coordinator is inside a step (or another
    wait for its workers), not at a step boundary."""
    try:
        with open(f"/proc/{pid}/wchan", encoding="ascii") as handle:
            return "poll" in handle.read()
    except OSError:
        return False


def signal_pending(pid: int, sig: int) -> bool:
    """True while a process-directed ``sig`` is queued for ``pid`` but no thread took it yet."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("ShdPnd:"):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def is_running(pid: int, marker: str) -> bool:
    """The pid is a live (not zombie) process of ours; zombies count as gone: here they are
    reparented to an init that does not reap them."""
    try:
        process = psutil.Process(pid)
        return (process.status() != psutil.STATUS_ZOMBIE
                and marker in " ".join(process.cmdline()))
    except psutil.NoSuchProcess:  # includes ZombieProcess
        return False


def cpu_seconds(pids: list[int], run_dir: Path) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            noteworthy = [e for e in read_events(run_dir)
                          if e["event"] not in ("step", "epoch_end", "evaluate")]
            pytest.fail(f"pid {pid} of the paused run is gone; events: {noteworthy}")
        total += times.user + times.system
    return total


class Training:
    """`pipetrain train` in the background; always ended and reaped on leaving the block."""

    def __init__(self, run_dir: Path, *args: str, step_delay_s: float = STEP_DELAY_S) -> None:
        self.run_dir = run_dir
        self.args = ("train", "--run-dir", str(run_dir), *OPTIONS, *args)
        self.env = cli_env(Plan(step_delay_s=step_delay_s))
        self.proc: subprocess.Popen | None = None
        self.stdout = self.stderr = ""

    def __enter__(self) -> Training:
        self.proc = start_cli(*self.args, env=self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)  # reaps it and closes the pipes

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_running(self) -> dict:
        """Until the workers are up (the coordinator's handlers are installed before this)."""
        return wait_for(lambda: read_state(self.run_dir).get("state") == "running"
                        and read_state(self.run_dir), START_TIMEOUT_S, "state running", self.proc)

    def wait_step(self, step: int) -> int:
        return wait_for(lambda: last_step(self.run_dir) >= step and last_step(self.run_dir),
                        START_TIMEOUT_S, f"a step event with step >= {step}", self.proc)

    def wait_event(self, name: str, timeout_s: float = START_TIMEOUT_S, **match) -> dict:
        def found():
            for event in events_named(self.run_dir, name):
                if all(event.get(k) == v for k, v in match.items()):
                    return event
            return None
        return wait_for(found, timeout_s, f"a {name!r} event {match or ''}", self.proc)

    def finish(self, timeout_s: float = FINISH_TIMEOUT_S) -> int:
        assert self.proc is not None
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not exit within {timeout_s} s; events so far: "
                        f"{read_events(self.run_dir)[-5:]}")
        return self.proc.returncode


def assert_steps_match(run_dir: Path, reference: Path) -> None:
    """Every step event (recomputed ones too) carries the reference's loss and digest, and
    together they cover every step exactly as the reference does."""
    expected = {e["step"]: (e["loss"], e["grad_digest"]) for e in step_events(reference)}
    seen = set()
    for event in step_events(run_dir):
        assert event["step"] in expected, f"step {event['step']} is beyond the reference's"
        assert (event["loss"], event["grad_digest"]) == expected[event["step"]], (
            f"step {event['step']} differs from the reference")
        seen.add(event["step"])
    assert seen == set(expected), f"steps never run: {sorted(set(expected) - seen)[:10]}"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))


def assert_finished_like_reference(run: Training, reference: Path, returncode: int) -> None:
    assert returncode == 0, f"exit status {returncode}: {run.stderr}"
    assert read_state(run.run_dir)["state"] == "done"
    assert events_named(run.run_dir, "run_end")[-1]["status"] == "done"
    assert_bitwise_equal(load_params(run.run_dir), load_params(reference))
    assert_steps_match(run.run_dir, reference)
    assert_no_survivors(run.run_dir)


def resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("train", "--run-dir", str(run_dir), "--resume", "--quiet", *extra,
                   timeout=FINISH_TIMEOUT_S, check=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_cli("reference", "--run-dir", str(run_dir), *OPTIONS, check=True)
    return run_dir


@pytest.fixture(scope="module")
def steps_per_epoch(reference) -> int:
    return next(e["step"] for e in read_events(reference) if e["event"] == "epoch_end")


# -- the tests ---------------------------------------------------------------------------------


def test_sigusr1_checkpoints_and_training_goes_on(tmp_path, reference):
    with Training(tmp_path / "run") as run:
        run.wait_step(10)
        run.kill(signal.SIGUSR1)
        event = run.wait_event("checkpoint")
        returncode = run.finish()
    assert_finished_like_reference(run, reference, returncode)
    assert event["step"] >= 10
    manifest = checkpoint.verify(run.run_dir / event["path"])
    assert manifest.step == event["step"]
    assert len(events_named(run.run_dir, "checkpoint")) == 1


def test_sigtstp_pauses_idle_and_sigcont_resumes(tmp_path, reference):
    with Training(tmp_path / "run") as run:
        state = run.wait_running()
        run.wait_step(8)
        run.kill(signal.SIGTSTP)
        paused = run.wait_event("paused")
        wait_for(lambda: read_state(run.run_dir).get("state") == "paused", 10, "state paused",
                 run.proc)
        pids = [run.pid, *state["worker_pids"]]
        steps_before = last_step(run.run_dir)
        assert steps_before == paused["step"], "no step may run between the boundary and pause"
        cpu_before = cpu_seconds(pids, run.run_dir)
        time.sleep(0.5)  # an observation window, not a synchronisation
        cpu_spent = cpu_seconds(pids, run.run_dir) - cpu_before
        assert last_step(run.run_dir) == steps_before, "a step ran while paused"
        assert cpu_spent < 0.1, f"paused processes spent {cpu_spent:.3f} s of CPU in 0.5 s"
        run.kill(signal.SIGCONT)
        resumed = run.wait_event("resumed")
        assert resumed["step"] == paused["step"]
        wait_for(lambda: read_state(run.run_dir).get("state") in ("running", "done"), 10,
                 "state running again", run.proc)
        returncode = run.finish()
    assert_finished_like_reference(run, reference, returncode)


def test_sigterm_while_paused_stops_gracefully(tmp_path, reference):
    run_dir = tmp_path / "run"
    with Training(run_dir) as run:
        run.wait_step(5)
        run.kill(signal.SIGTSTP)
        paused = run.wait_event("paused")
        run.kill(signal.SIGTERM)
        returncode = run.finish()
    assert returncode == 0, run.stderr
    assert read_state(run_dir)["state"] == "stopped"
    stop = events_named(run_dir, "stop")[-1]
    assert (stop["step"], stop["reason"]) == (paused["step"], "signal")
    assert events_named(run_dir, "checkpoint")[-1]["step"] == paused["step"]
    assert last_step(run_dir) == paused["step"]
    resume(run_dir)
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert_steps_match(run_dir, reference)


STOPPING = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGUSR2": signal.SIGUSR2}


@pytest.mark.parametrize("name", list(STOPPING))
def test_stop_signal_then_resume_is_bitwise_equal(tmp_path, reference, steps_per_epoch, name):
    sig = STOPPING[name]
    at_step = random.Random(f"pipetrain stop {name}").randint(5, 60)
    run_dir = tmp_path / "run"
    with Training(run_dir) as run:
        sent_at = run.wait_step(at_step)
        run.kill(sig)
        # The step running when the signal landed is at most one past the last one logged now.
        landed_by = last_step(run_dir) + 1
        returncode = run.finish()
    assert returncode == 0, f"{name}: exit status {returncode}: {run.stderr}"
    assert read_state(run_dir)["state"] == "stopped"
    assert events_named(run_dir, "run_end")[-1]["status"] == "stopped"
    stop = events_named(run_dir, "stop")[-1]
    assert stop["step"] >= sent_at
    assert stop["step"] == last_step(run_dir), "no step may run after the stop"
    if sig == signal.SIGUSR2:
        assert stop["reason"] == "epoch_stop"
        assert stop["step"] % steps_per_epoch == 0, f"stopped mid-epoch at {stop['step']}"
        assert stop["step"] - steps_per_epoch < landed_by, "an epoch end was passed by"
    else:
        assert stop["reason"] == "signal"
        assert stop["step"] <= landed_by, "a graceful stop happens at the next boundary"
    saved = events_named(run_dir, "checkpoint")[-1]
    assert saved["step"] == stop["step"]
    assert checkpoint.verify(run_dir / saved["path"]).step == stop["step"]
    assert not (run_dir / "final.npz").exists()
    assert_no_survivors(run_dir)

    resume(run_dir)
    assert read_state(run_dir)["state"] == "done"
    starts = events_named(run_dir, "run_start")
    assert [s["from_step"] for s in starts] == [0, stop["step"]]
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert_steps_match(run_dir, reference)


def test_second_sigint_aborts_at_once(tmp_path):
    run_dir = tmp_path / "run"
    # Slow steps, so both interrupts land inside one step: the first asks for a graceful stop
    # at the boundary, the second must not wait for it.
    with Training(run_dir, step_delay_s=0.5) as run:
        run.wait_step(1)

        def mid_step() -> bool:  # not at a boundary, where one SIGINT alone would stop the run
            logged = last_step(run_dir)
            return waiting_in_poll(run.pid) and last_step(run_dir) == logged

        wait_for(mid_step, 10, "the coordinator waiting inside a step", run.proc, 0.005)
        run.kill(signal.SIGINT)
        # Standard signals do not queue: send the second only once a thread took the first.
        wait_for(lambda: not signal_pending(run.pid, signal.SIGINT), 5, "SIGINT delivery",
                 interval_s=0.001)
        run.kill(signal.SIGINT)
        sent = time.monotonic()
        returncode = run.finish(timeout_s=30)
        elapsed_s = time.monotonic() - sent
    assert returncode == 130, f"exit status {returncode}: {run.stderr}"
    assert "aborted" in run.stderr
    # some 85 steps of 0.5 s were left: an abort ends at once (workers finish one step at most)
    assert elapsed_s < 5.0, f"took {elapsed_s:.2f} s to abort"
    assert read_state(run_dir)["state"] == "aborted"
    assert events_named(run_dir, "run_end")[-1]["status"] == "aborted"
    assert events_named(run_dir, "stop") == [], "an abort is not a graceful stop"
    assert_no_survivors(run_dir)


def test_kill_9_of_the_coordinator_takes_the_workers_and_resume_recovers(tmp_path, reference):
    run_dir = tmp_path / "run"
    with Training(run_dir, "--checkpoint-every", "10") as run:
        state = run.wait_running()
        run.wait_event("checkpoint", step=20)
        run.proc.kill()
        run.proc.wait(timeout=10)
    workers = state["worker_pids"]
    assert len(workers) == 3
    wait_for(lambda: not any(is_running(pid, "pipetrain.runtime.worker") for pid in workers), 2.0,
             f"workers {workers} to die with their coordinator")
    newest = max(e["step"] for e in events_named(run_dir, "checkpoint"))
    assert newest >= 20

    resume(run_dir)
    starts = events_named(run_dir, "run_start")
    assert starts[-1]["from_step"] == newest
    assert read_state(run_dir)["state"] == "done"
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert_steps_match(run_dir, reference)


def test_signal_storm_leaves_the_run_correct(tmp_path, reference):
    """3000 SIGUSR1 / SIGTSTP / SIGCONT in bursts sent as fast as os.kill goes, about one burst
    a step so that they spread over many step boundaries, stopped 10 steps before the end."""
    run_dir = tmp_path / "run"
    kinds = (signal.SIGUSR1, signal.SIGTSTP, signal.SIGCONT)
    total_steps = len(step_events(reference))
    sent: list[int] = []
    errors: list[BaseException] = []

    def storm(pid: int) -> None:
        rng = random.Random(20240611)
        try:
            while len(sent) < 3000 and last_step(run_dir) < total_steps - 10:
                logged = last_step(run_dir)
                for _ in range(rng.randint(1, 100)):
                    sig = rng.choice(kinds)
                    os.kill(pid, sig)
                    sent.append(sig)
                # Pacing, not synchronisation: about one burst a step, whatever the machine's
                # load, and at least every 30 ms while the run sits paused.
                deadline = time.monotonic() + 0.03
                while last_step(run_dir) == logged and time.monotonic() < deadline:
                    time.sleep(0.002)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # the run ended (it is reaped only after the join, so no pid reuse)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    with Training(run_dir, step_delay_s=0.01) as run:
        run.wait_step(3)
        thread = threading.Thread(target=storm, args=(run.pid,), name="signal-storm")
        thread.start()
        try:
            thread.join(timeout=60)
        finally:
            assert not thread.is_alive(), "the storm thread did not finish"
        assert not errors, errors
        if run.proc.poll() is None:
            run.kill(signal.SIGCONT)
        returncode = run.finish()
    assert len(sent) > 500, f"the storm sent only {len(sent)} signals"
    assert_finished_like_reference(run, reference, returncode)
    checkpoints = events_named(run_dir, "checkpoint")
    paused, resumed = events_named(run_dir, "paused"), events_named(run_dir, "resumed")
    assert checkpoints and paused, "the storm exercised neither checkpoints nor pauses"
    assert len(paused) == len(resumed), "every pause was followed by a resume"
    assert len({e["step"] for e in checkpoints}) == len(checkpoints), "a step saved twice"
    dirs = checkpoint_dirs(run_dir)
    assert [p.name for p in dirs] == [
        checkpoint.step_dir_name(e["step"]) for e in checkpoints][-len(dirs):]
    for path in dirs:
        checkpoint.verify(path)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporaries left behind: {leftovers}"


def test_signals_until_the_process_exits_do_not_change_its_exit_status(tmp_path):
    run_dir = tmp_path / "run"
    with Training(run_dir, step_delay_s=0.005) as run:
        run.wait_running()
        sent = 0
        try:
            while run.proc.poll() is None:
                os.kill(run.pid, signal.SIGUSR1)
                sent += 1
                if sent % 50 == 0:
                    time.sleep(0.002)  # pacing: let the run make progress on two cores
        except ProcessLookupError:
            pass  # reaped only by finish(), so this does not happen; kept for safety
        returncode = run.finish()
    assert read_state(run_dir)["state"] == "done"
    assert (run_dir / "final.npz").exists()
    assert returncode == 0, f"a finished run exited {returncode} under a SIGUSR1 storm"


def test_checkpoint_request_lands_at_the_next_boundary(tmp_path):
    run_dir = tmp_path / "run"
    with Training(run_dir, step_delay_s=0.05) as run:
        run.wait_step(5)
        seen = last_step(run_dir)
        run.kill(signal.SIGUSR1)
        # Read right after the signal landed: the step then running is at most this one + 1,
        # even if the test process was descheduled between reading ``seen`` and the kill.
        seen_after = last_step(run_dir)
        event = run.wait_event("checkpoint")
        run.kill(signal.SIGTERM)  # no need to train to the end
        returncode = run.finish()
    assert returncode == 0, run.stderr
    assert seen <= event["step"] <= seen_after + 1, (
        f"SIGUSR1 sent after step {seen} (step {seen_after} logged when it had landed), "
        f"checkpoint at step {event['step']}")
    assert checkpoint.verify(run_dir / event["path"]).step == event["step"]
