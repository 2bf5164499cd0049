"""Fault kinds: parameter validation through the registry, the launch changes of the kinds that
act inside the system, and the signal kinds against real child processes with real signals."""

from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from pipetrain_harness.faults import FAULTS, FaultError, Launch, build_fault
from pipetrain_harness.faults.base import Context, Target
from pipetrain_harness.history import History
from pipetrain_harness.linkshim import faults_for
from pipetrain_harness.plan import Plan
from tests.helpers import wait_for

MINIMAL = {
    "kill": {},
    "freeze": {"duration_s": 1},
    "delay": {"link": "0->1"},
    "throttle": {"link": "1->0", "bandwidth_bytes_per_s": 1e6},
    "corrupt": {"link": "0->1"},
    "sever": {"link": "1->2"},
    "signal_storm": {},
    "slow_loader": {"delay_s": 0.01},
    "checkpoint_crash": {},
    "fd_pressure": {"max_open_files": 64},
    "planted_bug": {"bug": "leak_fd"},
}

# (kind, table, the key the refusal must name)
BAD = [
    ("kill", {"signal": "SIGNOPE"}, "signal"),
    ("kill", {"signal": 9}, "signal"),
    ("kill", {"target": "stage:x"}, "target"),
    ("kill", {"victim": "coordinator"}, "victim"),
    ("freeze", {}, "duration_s"),
    ("freeze", {"duration_s": 1, "for_steps": 2}, "for_steps"),
    ("freeze", {"duration_s": "1"}, "duration_s"),
    ("delay", {}, "link"),
    ("delay", {"link": "0->2"}, "link"),
    ("delay", {"link": "0->1", "latency_ms": -1}, "latency_ms"),
    ("delay", {"link": "0->1", "latency_ms": True}, "latency_ms"),
    ("delay", {"link": "0->1", "duration_s": 5}, "duration_s"),
    ("delay", {"link": "0->1", "replica": -1}, "replica"),
    ("throttle", {"link": "0->1"}, "bandwidth_bytes_per_s"),
    ("throttle", {"link": "0->1", "bandwidth_bytes_per_s": 0}, "bandwidth_bytes_per_s"),
    ("corrupt", {"link": "0->1", "flips": 0}, "flips"),
    ("corrupt", {"link": "0->1", "flips": 1.5}, "flips"),
    ("sever", {"link": "0->1", "after_checkpoint": 1}, "after_checkpoint"),
    ("signal_storm", {"signals": ["SIGUSR1", "SIGWHAT"]}, "signals"),
    ("signal_storm", {"signals": []}, "signals"),
    ("signal_storm", {"signals": "SIGUSR1"}, "signals"),
    ("signal_storm", {"count": 0}, "count"),
    ("signal_storm", {"rate_per_s": -1}, "rate_per_s"),
    ("slow_loader", {}, "delay_s"),
    ("slow_loader", {"delay_s": 0}, "delay_s"),
    ("slow_loader", {"delay_s": 0.1, "for_steps": 3}, "for_steps"),
    ("checkpoint_crash", {"signal": "KILL"}, "signal"),
    ("checkpoint_crash", {"checkpoint_delay_s": -0.1}, "checkpoint_delay_s"),
    ("fd_pressure", {"max_open_files": 15}, "max_open_files"),
    ("fd_pressure", {}, "max_open_files"),
    ("planted_bug", {"bug": "typo"}, "bug"),
    ("planted_bug", {"bug": "leak_fd", "stage": -1}, "stage"),
    ("planted_bug", {}, "bug"),
]


def test_the_registry_builds_every_kind_from_a_minimal_table():
    build_fault({"kind": "kill"})  # fills the registry
    assert set(MINIMAL) <= set(FAULTS)
    for kind, table in MINIMAL.items():
        fault = build_fault({"kind": kind, **table})
        assert fault.kind == kind and kind in fault.describe()


def test_an_unknown_kind_is_refused():
    with pytest.raises(FaultError, match="unknown fault kind 'nope'"):
        build_fault({"kind": "nope"})


@pytest.mark.parametrize(("kind", "table", "key"), BAD,
                         ids=[f"{kind}-{key}-{i}" for i, (kind, _, key) in enumerate(BAD)])
def test_a_bad_value_is_refused_naming_the_key(kind, table, key):
    with pytest.raises(FaultError, match=key):
        build_fault({"kind": kind, **table}, where="scenarios/x.toml faults[0]")


def test_expected_restarts():
    def restarts(kind, **table):
        return build_fault({"kind": kind, **MINIMAL[kind], **table}).expected_restarts()

    assert restarts("kill") == 1
    assert restarts("kill", signal="SIGTERM", target="stage:1") == 1
    assert restarts("kill", signal="SIGINT") == 0  # workers ignore Ctrl-C
    assert restarts("kill", signal="SIGTSTP") == 0  # workers leave Ctrl-Z to the coordinator
    assert restarts("kill", signal="SIGSTOP") is None  # depends on the heartbeat timeout
    assert restarts("kill", target="coordinator", signal="SIGUSR1") is None
    assert restarts("freeze") is None
    assert [restarts(k) for k in ("delay", "throttle", "corrupt", "sever")] == [0, 0, 1, 1]
    assert restarts("signal_storm", signals=["SIGUSR1", "SIGTSTP", "SIGCONT"]) == 0
    assert restarts("signal_storm", signals=["SIGSEGV"]) is None
    assert restarts("signal_storm", target="stage:0", signals=["SIGINT"]) == 0
    assert restarts("signal_storm", target="stage:0", signals=["SIGUSR1"]) is None
    assert restarts("slow_loader") == 0 and restarts("planted_bug") == 0
    assert restarts("checkpoint_crash") is None and restarts("fd_pressure") is None


# -- faults that act inside the system: what prepare changes -------------------------------


def launch() -> Launch:
    return Launch(args=["pipetrain", "train"], env={"PATH": "/usr/bin"})


def test_link_faults_append_their_plans():
    target = launch()
    build_fault({"kind": "delay", "link": "0->1", "latency_ms": 5, "jitter_ms": 2.5,
                 "at_step": 4, "for_steps": 3}).prepare(target)
    build_fault({"kind": "corrupt", "link": "2->1", "replica": 1}).prepare(target)
    build_fault({"kind": "throttle", "link": "1->2",
                 "bandwidth_bytes_per_s": 2048}).prepare(target)
    build_fault({"kind": "sever", "link": "1->0", "at_step": 7}).prepare(target)
    assert target.plan.link_faults == [
        {"kind": "delay", "link": "0->1", "replica": 0, "at_step": 4, "for_steps": 3,
         "latency_ms": 5, "jitter_ms": 2.5},
        {"kind": "corrupt", "link": "2->1", "replica": 1, "at_step": 1, "for_steps": 1,
         "flips": 1},
        {"kind": "throttle", "link": "1->2", "replica": 0, "at_step": 1, "for_steps": 0,
         "bandwidth_bytes_per_s": 2048},
        {"kind": "sever", "link": "1->0", "replica": 0, "at_step": 7, "for_steps": 1},
    ]


def test_the_link_plan_is_what_the_shim_reads():
    target = launch()
    build_fault({"kind": "delay", "link": "1->0", "replica": 1}).prepare(target)
    plan = Plan.from_json(target.plan.to_json())  # what the run's processes read
    assert [p["kind"] for p in faults_for(plan.link_faults, 1, 0, 1, 0)] == ["delay"]
    assert faults_for(plan.link_faults, 1, 0, 0, 0) == []
    assert faults_for(plan.link_faults, 0, 1, 1, 0) == []
    assert faults_for(plan.link_faults, 1, 0, 1, 1) == []  # a restarted group runs clean


def test_slow_loader_sets_the_loader_delay():
    target = launch()
    build_fault({"kind": "slow_loader", "delay_s": 0.05}).prepare(target)
    assert target.plan.loader_delay_s == 0.05


def test_fd_pressure_limits_open_files():
    target = launch()
    build_fault({"kind": "fd_pressure", "max_open_files": 64}).prepare(target)
    assert target.rlimits == {resource.RLIMIT_NOFILE: (64, 64)}


def test_fd_pressure_refuses_a_limit_above_the_hard_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    with pytest.raises(FaultError, match="max_open_files"):
        build_fault({"kind": "fd_pressure", "max_open_files": hard + 1}).prepare(launch())


@pytest.mark.parametrize(("bug", "hook"), [("wrong_gradient", "perturb"),
                                           ("leak_fd", "leak_fd"), ("leak_child", "leak_child")])
def test_planted_bug_adds_a_stage_fault_to_the_plan(bug, hook):
    target = launch()
    build_fault({"kind": "planted_bug", "bug": bug}).prepare(target)
    assert target.plan.stage_faults == [{"stage": 1, "step": 3, "kind": hook}]
    other = launch()
    build_fault({"kind": "planted_bug", "bug": bug, "stage": 0, "at_step": 9}).prepare(other)
    assert other.plan.stage_faults == [{"stage": 0, "step": 9, "kind": hook}]


def test_planted_bugs_add_up_and_stale_restart_is_a_plan_bug():
    target = launch()
    build_fault({"kind": "planted_bug", "bug": "leak_fd"}).prepare(target)
    build_fault({"kind": "planted_bug", "bug": "leak_child", "stage": 0}).prepare(target)
    build_fault({"kind": "planted_bug", "bug": "stale_restart"}).prepare(target)
    assert [f["kind"] for f in target.plan.stage_faults] == ["leak_fd", "leak_child"]
    assert target.plan.planted == ["stale_restart"]


def test_in_system_faults_only_record_at_invoke(tmp_path):
    ctx = context(tmp_path, pid=1)
    for kind in ("delay", "slow_loader", "fd_pressure", "planted_bug"):
        fault = build_fault({"kind": kind, **MINIMAL[kind]})
        fault.invoke(ctx)
        fault.heal(ctx)
    assert len(ctx.history.ops("fault_in_system")) == 4


# -- signal kinds, against real processes ---------------------------------------------------

SLEEPER = "import time; time.sleep(60)"
# Ignores SIGUSR1 (whose default action would end it) and says so before the test storms it.
IGNORER = ("import signal, sys, time; signal.signal(signal.SIGUSR1, signal.SIG_IGN); "
           "print('ready', flush=True); time.sleep(60)")


def context(run_dir: Path, pid: int) -> Context:
    """A fake run directory whose coordinator and only worker is ``pid``."""
    run_dir.mkdir(exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(
        {"coordinator_pid": pid, "worker_pids": [pid], "config": {"stages": 1}}))
    rng = random.Random(0)
    return Context(run_dir=run_dir, target=Target(run_dir, rng), history=History(), rng=rng)


@pytest.fixture
def child():
    # A process group of its own, whose parent (this test) is in another group of the same
    # session, is never orphaned: a default-action SIGTSTP stops it even when the suite runs
    # under setsid, nohup or cron, where the kernel drops it for an orphaned group.
    with subprocess.Popen([sys.executable, "-c", SLEEPER], process_group=0) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(10)


@pytest.fixture
def ignorer():
    with subprocess.Popen([sys.executable, "-c", IGNORER], stdout=subprocess.PIPE,
                          text=True) as process:
        try:
            assert process.stdout.readline().strip() == "ready"
            yield process
        finally:
            process.kill()
            process.wait(10)


def stopped(pid: int) -> bool:
    return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def test_kill_sends_its_signal(tmp_path, child):
    ctx = context(tmp_path, child.pid)
    fault = build_fault({"kind": "kill", "signal": "SIGTERM", "target": "stage:0"})
    fault.invoke(ctx)
    assert child.wait(10) == -signal.SIGTERM
    fault.heal(ctx)
    [sent] = ctx.history.ops("signal_sent")
    assert sent["pid"] == child.pid and sent["signal"] == "SIGTERM"


def test_kill_of_a_process_already_gone_is_recorded_not_raised(tmp_path, child):
    child.kill()
    child.wait(10)
    ctx = context(tmp_path, child.pid)
    build_fault({"kind": "kill", "target": "coordinator"}).invoke(ctx)
    assert ctx.history.ops("target_gone") and not ctx.history.ops("signal_sent")


def test_kill_of_a_stage_the_run_does_not_have_is_recorded(tmp_path, child):
    ctx = context(tmp_path, child.pid)
    build_fault({"kind": "kill", "target": "stage:3"}).invoke(ctx)
    [gone] = ctx.history.ops("target_gone")
    assert "no stage 3" in gone["reason"] and child.poll() is None


def test_freeze_stops_and_heal_continues(tmp_path, child):
    ctx = context(tmp_path, child.pid)
    fault = build_fault({"kind": "freeze", "duration_s": 5})
    fault.invoke(ctx)
    wait_for(lambda: stopped(child.pid), timeout_s=5, what="the child to stop")
    fault.heal(ctx)
    wait_for(lambda: not stopped(child.pid), timeout_s=5, what="the child to continue")
    assert psutil.Process(child.pid).status() in (psutil.STATUS_RUNNING,
                                                  psutil.STATUS_SLEEPING)
    assert [op["signal"] for op in ctx.history.ops("signal_sent")] == ["SIGSTOP", "SIGCONT"]


def test_freeze_heal_tolerates_a_target_gone(tmp_path, child):
    ctx = context(tmp_path, child.pid)
    fault = build_fault({"kind": "freeze", "duration_s": 5, "target": "coordinator"})
    fault.invoke(ctx)
    child.kill()  # SIGKILL ends even a stopped process
    child.wait(10)
    fault.heal(ctx)
    assert ctx.history.ops("target_gone")


def storm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "signal-storm"]


def test_signal_storm_sends_count_signals_and_ends_by_itself(tmp_path, ignorer):
    ctx = context(tmp_path, ignorer.pid)
    fault = build_fault({"kind": "signal_storm", "count": 200, "rate_per_s": 0})
    fault.invoke(ctx)
    wait_for(lambda: not storm_threads(), timeout_s=10, what="the storm to end")
    fault.heal(ctx)
    [summary] = ctx.history.ops("signals_sent")
    assert summary["sent"] == 200 and summary["signals"] == ["SIGUSR1"]
    assert ignorer.poll() is None  # SIGUSR1 ignored: the child lived through all of them


def test_heal_stops_a_paced_storm_early_and_joins_it(tmp_path, ignorer):
    ctx = context(tmp_path, ignorer.pid)
    fault = build_fault({"kind": "signal_storm", "count": 1000, "rate_per_s": 20})
    fault.invoke(ctx)
    wait_for(lambda: fault.sent >= 2, timeout_s=5, what="a few signals")
    fault.heal(ctx)
    assert not storm_threads()
    [summary] = ctx.history.ops("signals_sent")
    assert 2 <= summary["sent"] < 1000


def test_signal_storm_with_sigtstp_leaves_the_target_continued(tmp_path, child):
    ctx = context(tmp_path, child.pid)
    fault = build_fault({"kind": "signal_storm", "signals": ["SIGCONT", "SIGTSTP"],
                         "count": 50, "rate_per_s": 0})  # the last one sent is SIGTSTP
    fault.invoke(ctx)
    wait_for(lambda: not storm_threads(), timeout_s=10, what="the storm to end")
    fault.heal(ctx)
    wait_for(lambda: not stopped(child.pid), timeout_s=5, what="the child to continue")
    assert ctx.history.ops("signal_sent")[-1]["signal"] == "SIGCONT"
    assert child.poll() is None


def test_a_timed_storm_with_sigtstp_pauses_until_heal(tmp_path, child):
    ctx = context(tmp_path, child.pid)
    fault = build_fault({"kind": "signal_storm", "signals": ["SIGTSTP"], "count": 1,
                         "duration_s": 1.0})
    fault.invoke(ctx)
    wait_for(lambda: not storm_threads(), timeout_s=10, what="the storm to end")
    wait_for(lambda: stopped(child.pid), timeout_s=5, what="the child to stop")
    with pytest.raises(AssertionError, match="timed out"):
        wait_for(lambda: not stopped(child.pid), timeout_s=0.3, what="an early SIGCONT")
    fault.heal(ctx)
    wait_for(lambda: not stopped(child.pid), timeout_s=5, what="the child to continue")


def test_signal_storm_stops_quietly_when_the_target_is_gone(tmp_path, child):
    ctx = context(tmp_path, child.pid)
    fault = build_fault({"kind": "signal_storm", "signals": ["SIGKILL"], "count": 50,
                         "rate_per_s": 100})
    fault.invoke(ctx)
    assert child.wait(10) == -signal.SIGKILL
    wait_for(lambda: not storm_threads(), timeout_s=5, what="the storm to end")
    fault.heal(ctx)
    assert ctx.history.ops("signals_sent")[0]["sent"] < 50


def test_checkpoint_crash_kills_while_a_checkpoint_is_written(tmp_path, child):
    ctx = context(tmp_path, child.pid)
    (tmp_path / "checkpoints" / ".step-00000004.tmp-1").mkdir(parents=True)  # stale: ignored
    fault = build_fault({"kind": "checkpoint_crash"})
    target = launch()
    fault.prepare(target)
    assert target.plan.checkpoint_delay_s == 0.2
    fault.invoke(ctx)
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.2)  # nothing is being written yet
    (tmp_path / "checkpoints" / f".step-00000008.tmp-{child.pid}").mkdir()
    assert child.wait(10) == -signal.SIGKILL
    fault.heal(ctx)
    [killed] = ctx.history.ops("killed_mid_checkpoint")
    assert killed["tmp"] == f".step-00000008.tmp-{child.pid}" and killed["pid"] == child.pid
    assert killed["signal"] == "SIGKILL" and killed["tmp_still_there"]


def test_checkpoint_crash_without_a_checkpoint_says_so(tmp_path, child):
    ctx = context(tmp_path, child.pid)
    fault = build_fault({"kind": "checkpoint_crash", "duration_s": 0.1})
    fault.invoke(ctx)
    wait_for(lambda: ctx.history.ops("no_checkpoint_seen"), timeout_s=5,
             what="the watcher to give up")
    fault.heal(ctx)
    assert child.poll() is None and not ctx.history.ops("killed_mid_checkpoint")


def test_checkpoint_crash_heal_stops_the_watcher_at_once(tmp_path, child):
    ctx = context(tmp_path, child.pid)
    fault = build_fault({"kind": "checkpoint_crash"})  # would watch for 30 s
    fault.invoke(ctx)
    fault.heal(ctx)
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-crash"]
    assert ctx.history.ops("no_checkpoint_seen") and child.poll() is None
