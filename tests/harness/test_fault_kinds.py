"""Fault kinds: parameter and point validation through the registry, the launch changes of the
kinds that act inside the system, and the kinds that act from outside against real child
processes with real signals (the child stands in for a process parked at its point)."""

from __future__ import annotations

import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipetrain_harness.faults import FAULTS, FaultError, Landing, Launch, build_fault
from pipetrain_harness.faults.base import Context
from pipetrain_harness.history import History
from pipetrain_harness.linkshim import faults_for
from pipetrain_harness.plan import Plan
from pipetrain_harness.points import STAGE, Place
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
    ("delay", {"link": "0->1", "when": "after"}, "when"),
    ("sever", {"link": "0->1", "when": "during"}, "when"),
    ("corrupt", {"link": "0->1", "at_microbatch": -1}, "at_microbatch"),
    ("signal_storm", {"signals": ["SIGUSR1", "SIGWHAT"]}, "signals"),
    ("signal_storm", {"signals": []}, "signals"),
    ("signal_storm", {"signals": "SIGUSR1"}, "signals"),
    ("signal_storm", {"count": 0}, "count"),
    ("signal_storm", {"rate_per_s": -1}, "rate_per_s"),
    ("slow_loader", {}, "delay_s"),
    ("slow_loader", {"delay_s": 0}, "delay_s"),
    ("slow_loader", {"delay_s": 0.1, "for_steps": 3}, "for_steps"),
    ("checkpoint_crash", {"signal": "KILL"}, "signal"),
    ("checkpoint_crash", {"phase": "renamed"}, "phase"),
    ("checkpoint_crash", {"phase": "segment_written"}, "phase"),  # a stage's, not the target's
    ("checkpoint_crash", {"target": "stage:1", "phase": "committed"}, "phase"),
    ("checkpoint_crash", {"at_step": 3}, "at_step"),
    ("damage_checkpoint", {"after_checkpoint": 0}, "after_checkpoint"),
    ("damage_checkpoint", {"phase": "committed"}, "phase"),
    ("kill", {"at_action": "B2"}, "at_step"),  # an action of which step?
    ("kill", {"at_step": 3, "at_action": "X2"}, "at_action"),
    ("kill", {"at_step": 3, "at_action": "1B2", "target": "stage:0"}, "at_action"),
    ("kill", {"at_step": 3, "at_action": "B2", "target": "coordinator"}, "at_action"),
    ("kill", {"at_step": 3, "at_reduce": 1, "target": "coordinator"}, "at_reduce"),
    ("kill", {"at_step": 3, "at_action": "B2", "at_reduce": 1}, "at_reduce"),
    ("kill", {"at_resume": True, "target": "coordinator"}, "at_resume"),
    ("kill", {"at_resume": True, "at_step": 4}, "at_step"),
    ("kill", {"at_resume": 1}, "at_resume"),
    ("kill", {"at_step": 0}, "at_step"),
    ("kill", {"generation": -1}, "generation"),
    # A worker's SIGTERM handler runs in its main thread: exact only before a step or action.
    ("kill", {"signal": "SIGTERM", "at_step": 3, "at_reduce": 1}, "SIGTERM"),
    ("kill", {"signal": "SIGTERM", "at_resume": True}, "SIGTERM"),
    ("signal_storm", {"target": "stage:0", "signals": ["SIGTERM"], "at_resume": True},
     "SIGTERM"),
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
    assert restarts("freeze") is None  # no heartbeat timeout to compare with
    assert build_fault({"kind": "freeze", "duration_s": 0.2}).expected_restarts(1.0) == 0
    assert build_fault({"kind": "freeze", "duration_s": 3}).expected_restarts(1.0) == 1
    assert build_fault({"kind": "freeze", "duration_s": 1.2}).expected_restarts(1.0) is None
    # A frozen coordinator is not the workers' fault: it must cost no restart.
    assert build_fault({"kind": "freeze", "duration_s": 9,
                        "target": "coordinator"}).expected_restarts(1.0) == 0
    assert [restarts(k) for k in ("delay", "throttle", "corrupt", "sever")] == [0, 0, 1, 1]
    assert restarts("signal_storm", signals=["SIGUSR1", "SIGTSTP", "SIGCONT"]) == 0
    assert restarts("signal_storm", signals=["SIGSEGV"]) is None
    assert restarts("signal_storm", target="stage:0", signals=["SIGINT"]) == 0
    assert restarts("signal_storm", target="stage:0", signals=["SIGUSR1"]) == 1
    assert restarts("signal_storm", target="stage:0", signals=["SIGSTOP"]) is None
    assert restarts("slow_loader") == 0 and restarts("planted_bug") == 0
    assert restarts("checkpoint_crash") == 0  # the coordinator's death: a relaunch, not a restart
    assert restarts("checkpoint_crash", target="stage:1", phase="segment_written") == 1
    assert restarts("fd_pressure") is None


def test_points_of_the_kinds():
    kill = build_fault({"kind": "kill", "target": "stage:1", "at_step": 7, "at_action": "1B2"})
    assert (kill.point.hook, kill.point.step, kill.point.action) == ("before_action", 7, "B2")
    coordinator = build_fault({"kind": "signal_storm", "at_step": 7})
    assert (coordinator.point.hook, coordinator.point.step) == ("at_boundary", 7)
    assert build_fault({"kind": "freeze", "duration_s": 1}).point.step == 1  # default: step 1
    crash = build_fault({"kind": "checkpoint_crash", "after_checkpoint": 2})
    assert (crash.point.phase, crash.point.checkpoint) == ("manifest_written", 3)
    damage = build_fault({"kind": "damage_checkpoint", "after_checkpoint": 3})
    assert (damage.point.phase, damage.point.checkpoint) == ("committed", 3)
    sever = build_fault({"kind": "sever", "link": "1->2", "at_step": 5, "at_microbatch": 2,
                         "when": "after"})
    assert (sever.point.hook, sever.point.microbatch, sever.point.when) == ("send_frame", 2,
                                                                            "after")
    assert sever.place(3, 1, random.Random(0)) == Place(STAGE, 1, 0)  # the sending stage
    assert build_fault({"kind": "slow_loader", "delay_s": 0.1}).point.hook == "launch"


# -- faults that act inside the system: what prepare changes -------------------------------


def launch() -> Launch:
    return Launch(args=["pipetrain", "train"], env={"PATH": "/usr/bin"})


def prepared(table: dict, target: Launch, fault_id: int = 0) -> None:
    fault = build_fault(table)
    fault.prepare(target, fault_id, fault.place(3, 2, random.Random(0)))


def test_link_faults_append_their_plans():
    target = launch()
    prepared({"kind": "delay", "link": "0->1", "latency_ms": 5, "jitter_ms": 2.5,
              "at_step": 4, "for_steps": 3}, target, 0)
    prepared({"kind": "corrupt", "link": "2->1", "replica": 1, "at_microbatch": 2}, target, 1)
    prepared({"kind": "throttle", "link": "1->2", "bandwidth_bytes_per_s": 2048}, target, 2)
    prepared({"kind": "sever", "link": "1->0", "at_step": 7, "when": "after"}, target, 3)
    assert target.plan.link_faults == [
        {"kind": "delay", "link": "0->1", "replica": 0, "at_step": 4, "for_steps": 3,
         "latency_ms": 5, "jitter_ms": 2.5, "id": 0},
        {"kind": "corrupt", "link": "2->1", "replica": 1, "at_step": 1, "for_steps": 1,
         "microbatch": 2, "flips": 1, "id": 1},
        {"kind": "throttle", "link": "1->2", "replica": 0, "at_step": 1, "for_steps": 0,
         "bandwidth_bytes_per_s": 2048, "id": 2},
        {"kind": "sever", "link": "1->0", "replica": 0, "at_step": 7, "for_steps": 1,
         "when": "after", "id": 3},
    ]


def test_the_link_plan_is_what_the_shim_reads():
    target = launch()
    prepared({"kind": "delay", "link": "1->0", "replica": 1}, target)
    plan = Plan.from_json(target.plan.to_json())  # what the run's processes read
    assert [p["kind"] for p in faults_for(plan.link_faults, 1, 0, 1, 0)] == ["delay"]
    assert faults_for(plan.link_faults, 1, 0, 0, 0) == []
    assert faults_for(plan.link_faults, 0, 1, 1, 0) == []
    assert faults_for(plan.link_faults, 1, 0, 1, 1) == []  # without a harness: group 0 only
    assert len(faults_for(plan.link_faults, 1, 0, 1, None)) == 1  # the harness decides


def test_slow_loader_sets_the_loader_delay():
    target = launch()
    prepared({"kind": "slow_loader", "delay_s": 0.05}, target)
    assert target.plan.loader_delay_s == 0.05


def test_fd_pressure_limits_open_files():
    target = launch()
    prepared({"kind": "fd_pressure", "max_open_files": 64}, target)
    assert target.rlimits == {resource.RLIMIT_NOFILE: (64, 64)}


def test_fd_pressure_refuses_a_limit_above_the_hard_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    with pytest.raises(FaultError, match="max_open_files"):
        prepared({"kind": "fd_pressure", "max_open_files": hard + 1}, launch())


@pytest.mark.parametrize(("bug", "hook"), [("wrong_gradient", "perturb"),
                                           ("leak_fd", "leak_fd"), ("leak_child", "leak_child")])
def test_planted_bug_adds_a_stage_fault_to_the_plan(bug, hook):
    target = launch()
    prepared({"kind": "planted_bug", "bug": bug}, target, 4)
    assert target.plan.stage_faults == [{"stage": 1, "replica": 0, "step": 3, "kind": hook,
                                         "id": 4}]
    other = launch()
    prepared({"kind": "planted_bug", "bug": bug, "stage": 0, "at_step": 9}, other, 5)
    assert other.plan.stage_faults == [{"stage": 0, "replica": 0, "step": 9, "kind": hook,
                                        "id": 5}]


def test_planted_bugs_add_up_and_stale_restart_is_a_plan_bug():
    target = launch()
    prepared({"kind": "planted_bug", "bug": "leak_fd"}, target)
    prepared({"kind": "planted_bug", "bug": "leak_child", "stage": 0}, target)
    prepared({"kind": "planted_bug", "bug": "stale_restart"}, target)
    assert [f["kind"] for f in target.plan.stage_faults] == ["leak_fd", "leak_child"]
    assert target.plan.planted == ["stale_restart"]
    with pytest.raises(FaultError, match="at_step"):
        build_fault({"kind": "planted_bug", "bug": "stale_restart", "at_step": 3})


# -- kinds that act from outside, against real processes --------------------------------------

SLEEPER = "import time; time.sleep(60)"
# Ignores SIGUSR1 (whose default action would end it) and says so before the test storms it.
IGNORER = ("import signal, sys, time; signal.signal(signal.SIGUSR1, signal.SIG_IGN); "
           "print('ready', flush=True); time.sleep(60)")


def context(run_dir: Path) -> Context:
    run_dir.mkdir(exist_ok=True)
    return Context(run_dir=run_dir, history=History(), rng=random.Random(0))


def landing(pid: int, point: str = "before_step") -> Landing:
    return Landing(fault_id=0, pid=pid, place="stage:0:replica:0", hook=point, point=point,
                   step=5)


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


def test_kill_sends_its_signal_to_the_parked_process(tmp_path, child):
    ctx = context(tmp_path)
    fault = build_fault({"kind": "kill", "signal": "SIGTERM", "target": "stage:0"})
    fault.invoke(ctx, landing(child.pid))
    assert child.wait(10) == -signal.SIGTERM
    fault.heal(ctx)
    [sent] = ctx.history.ops("signal_sent")
    assert sent["pid"] == child.pid and sent["signal"] == "SIGTERM"


def test_kill_of_a_process_already_gone_is_recorded_not_raised(tmp_path, child):
    child.kill()
    child.wait(10)
    ctx = context(tmp_path)
    build_fault({"kind": "kill", "target": "coordinator"}).invoke(ctx, landing(child.pid))
    assert ctx.history.ops("target_gone") and not ctx.history.ops("signal_sent")


def test_freeze_stops_and_heal_continues(tmp_path, child):
    ctx = context(tmp_path)
    fault = build_fault({"kind": "freeze", "duration_s": 5})
    fault.invoke(ctx, landing(child.pid))
    wait_for(lambda: stopped(child.pid), timeout_s=5, what="the child to stop")
    fault.heal(ctx)
    wait_for(lambda: not stopped(child.pid), timeout_s=5, what="the child to continue")
    assert [op["signal"] for op in ctx.history.ops("signal_sent")] == ["SIGSTOP", "SIGCONT"]


def test_freeze_heal_tolerates_a_target_gone(tmp_path, child):
    ctx = context(tmp_path)
    fault = build_fault({"kind": "freeze", "duration_s": 5, "target": "coordinator"})
    fault.invoke(ctx, landing(child.pid))
    child.kill()  # SIGKILL ends even a stopped process
    child.wait(10)
    fault.heal(ctx)
    assert ctx.history.ops("target_gone")


def test_signal_storm_sends_every_signal_before_it_returns(tmp_path, ignorer):
    ctx = context(tmp_path)
    fault = build_fault({"kind": "signal_storm", "count": 200, "rate_per_s": 0})
    fault.invoke(ctx, landing(ignorer.pid))  # the target waits meanwhile: no thread needed
    [summary] = ctx.history.ops("signals_sent")
    assert summary["sent"] == 200 and summary["signals"] == ["SIGUSR1"]
    fault.heal(ctx)
    assert ignorer.poll() is None  # SIGUSR1 ignored: the child lived through all of them
    assert not [t for t in threading.enumerate() if "storm" in t.name]


def test_a_paced_storm_keeps_its_rate(tmp_path, ignorer):
    ctx = context(tmp_path)
    fault = build_fault({"kind": "signal_storm", "count": 5, "rate_per_s": 50})
    started = time.monotonic()
    fault.invoke(ctx, landing(ignorer.pid))
    assert time.monotonic() - started >= 4 / 50  # five signals at 50/s take 80 ms at least


def test_signal_storm_with_sigtstp_ends_with_sigcont_before_it_returns(tmp_path, child):
    ctx = context(tmp_path)
    fault = build_fault({"kind": "signal_storm", "signals": ["SIGCONT", "SIGTSTP"],
                         "count": 50, "rate_per_s": 0})  # the last one of the storm is SIGTSTP
    fault.invoke(ctx, landing(child.pid))
    wait_for(lambda: not stopped(child.pid), timeout_s=5, what="the child to continue")
    fault.heal(ctx)
    assert child.poll() is None and not ctx.history.ops("signal_sent")


def test_a_timed_storm_with_sigtstp_pauses_until_heal(tmp_path, child):
    ctx = context(tmp_path)
    fault = build_fault({"kind": "signal_storm", "signals": ["SIGTSTP"], "count": 1,
                         "duration_s": 1.0})
    fault.invoke(ctx, landing(child.pid))
    wait_for(lambda: stopped(child.pid), timeout_s=5, what="the child to stop")
    with pytest.raises(AssertionError, match="timed out"):
        wait_for(lambda: not stopped(child.pid), timeout_s=0.3, what="an early SIGCONT")
    fault.heal(ctx)
    wait_for(lambda: not stopped(child.pid), timeout_s=5, what="the child to continue")


def test_signal_storm_stops_when_the_target_is_gone(tmp_path, child):
    child.kill()
    child.wait(10)
    ctx = context(tmp_path)
    fault = build_fault({"kind": "signal_storm", "signals": ["SIGUSR1"], "count": 50,
                         "rate_per_s": 100})
    started = time.monotonic()
    fault.invoke(ctx, landing(child.pid))
    assert ctx.history.ops("signals_sent")[0]["sent"] == 0
    assert time.monotonic() - started < 0.25  # it did not pace out the 50 signals


def test_checkpoint_crash_kills_the_parked_process(tmp_path, child):
    ctx = context(tmp_path)
    fault = build_fault({"kind": "checkpoint_crash", "signal": "SIGKILL"})
    fault.invoke(ctx, landing(child.pid, "manifest_written"))
    assert child.wait(10) == -signal.SIGKILL
    [killed] = ctx.history.ops("killed_mid_checkpoint")
    assert killed["pid"] == child.pid and killed["phase"] == "manifest_written"


def test_damage_checkpoint_damages_the_newest_segment(tmp_path):
    ctx = context(tmp_path)
    for step in (8, 16):
        directory = tmp_path / "checkpoints" / f"step-{step:08d}"
        directory.mkdir(parents=True)
        (directory / "segment-0.npz").write_bytes(bytes(range(200)))
    build_fault({"kind": "damage_checkpoint", "mode": "truncate"}).invoke(
        ctx, landing(0, "committed"))
    assert (tmp_path / "checkpoints/step-00000016/segment-0.npz").stat().st_size == 100
    assert (tmp_path / "checkpoints/step-00000008/segment-0.npz").stat().st_size == 200
    [damaged] = ctx.history.ops("checkpoint_damaged")
    assert damaged["path"] == "checkpoints/step-00000016/segment-0.npz"


def test_faults_that_act_inside_the_system_do_nothing_at_landing(tmp_path):
    ctx = context(tmp_path)
    for kind in ("delay", "slow_loader", "fd_pressure", "planted_bug"):
        fault = build_fault({"kind": kind, **MINIMAL[kind]})
        fault.invoke(ctx, landing(0, "launch"))
        fault.heal(ctx)
    assert ctx.history.entries == []
