"""``python -m pipetrain_harness fuzz``: random fault plans drawn from a seed, until time is up.

Each plan is a small training run (random stages, replicas, micro-batches, schedule, optimizer,
epochs, checkpoint interval) with one to three faults drawn over fault points: every kind, on
every target it can have (the coordinator included), at a step, a schedule action, a layer's
all-reduce, a frame of a link, a checkpoint phase or a resume. Its expectations are what a
correct system must do: exit 0 (a stopped or killed coordinator is resumed, as an operator
would), bitwise equal to the reference, no leak, and as many restarts as the faults cause when
each lands once (``Fault.expected_restarts``; a frozen coordinator must cost none).

A failing plan is shrunk before it is saved (``pipetrain_harness.shrink``), and saved as a
scenario file beside the report of its minimal run (``NAME.replay.json``), whose history digest
``python -m pipetrain_harness replay`` checks. ``--plant NAME`` adds a ``planted_bug`` of that
name to every plan, to show that the fuzzer finds what it should.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from pipetrain.config import build_config
from pipetrain_harness.scenario import (
    ScenarioError,
    load_scenario,
    parse_scenario,
    scenario_to_toml,
)

HEARTBEAT_S = 3.0  # above a worker's start-up on a loaded 2-core machine (2 s was not, at load 19)
COORDINATOR_SIGNALS = ["SIGKILL", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGSEGV"]
WORKER_SIGNALS = ["SIGKILL", "SIGTERM", "SIGSEGV", "SIGUSR1", "SIGINT"]
STORM_SIGNALS = ["SIGUSR1", "SIGTSTP", "SIGCONT"]
COORDINATOR_PHASES = ["segments_written", "manifest_written", "committed"]
BUDGET_RETRIES = 50


def draw_plan(rng: random.Random, index: int, seed: int,
              plant: str | None = None) -> dict[str, Any]:
    """A valid plan (it loads as a scenario), drawn from ``rng``."""
    for _ in range(BUDGET_RETRIES):
        plan = _draw(rng, index, seed, plant)
        try:
            parse_scenario(plan, Path(f"{plan['name']}.toml"))
        except ScenarioError:
            continue  # two faults at one moment, a point the run lacks: draw again
        return plan
    raise RuntimeError("could not draw a valid plan")  # pragma: no cover - a bug in _draw


def _draw(rng: random.Random, index: int, seed: int, plant: str | None) -> dict[str, Any]:
    stages, replicas = rng.randint(1, 3), rng.choice([1, 1, 2])
    train = {
        "layers": [64, 32, 24, 10],
        "stages": stages, "replicas": replicas, "microbatches": rng.randint(1, 4),
        "schedule": rng.choice(["gpipe", "1f1b", "zb"]),
        "optimizer": rng.choice(["sgd", "momentum", "adam"]),
        "epochs": rng.choice([1, 2]), "batch_size": 48,
        "checkpoint_every": rng.choice([4, 8, 16]),
        "heartbeat_timeout": HEARTBEAT_S, "seed": rng.randint(0, 1000),
    }
    shape = _shape(train)
    # Distinct steps and checkpoints: faults in different processes never share a moment, and
    # no fault lands on a process another one has just ended at the same point.
    steps = list(range(2, shape["total"]))
    shape["checkpoints"] = list(range(max(1, shape["total"] // train["checkpoint_every"] - 1)))
    rng.shuffle(steps)
    rng.shuffle(shape["checkpoints"])
    faults = [_draw_fault(rng, train, shape, steps.pop()) for _ in range(rng.randint(1, 3))]
    if plant:
        bug = {"kind": "planted_bug", "bug": plant}
        if plant != "stale_restart":
            bug.update(stage=min(1, stages - 1), at_step=steps.pop())
        faults.append(bug)
    return finish_plan({
        "name": f"fuzz-{seed}-{index}",
        "description": "a random fault plan drawn by `python -m pipetrain_harness fuzz`",
        "seed": seed, "resume_after_stop": True, "timeout_s": 120,
        "train": train, "faults": faults,
        "expect": {"equivalence": "bitwise", "exit_status": 0, "no_leaks": True},
    })


def _shape(train: dict[str, Any]) -> dict[str, Any]:
    from pipetrain.runtime.coordinator import stage_bounds
    from pipetrain.training.evaluate import load_workload

    config = build_config(train, source="fuzz")
    return {"total": load_workload(config).total_steps, "bounds": stage_bounds(config),
            "schedule": config.build_schedule()}


def _draw_fault(rng: random.Random, train: dict[str, Any], shape: dict[str, Any],
                step: int) -> dict[str, Any]:
    stages, replicas = train["stages"], train["replicas"]
    stage, replica = rng.randrange(stages), rng.randrange(replicas)
    worker = f"stage:{stage}:replica:{replica}"
    menu = ["kill", "kill", "freeze", "signal_storm", "checkpoint_crash", "damage_checkpoint",
            "slow_loader", "fd_pressure"]
    if stages > 1:  # link faults need a link
        menu += ["delay", "throttle", "corrupt", "sever", "sever"]
    kind = rng.choice(menu)
    on_coordinator = rng.random() < 0.3
    if kind in ("kill", "freeze", "signal_storm"):
        fault: dict[str, Any] = {"kind": kind, "target": "coordinator" if on_coordinator
                                 else worker, "at_step": step}
        if not on_coordinator:
            fault.update(_finer_point(rng, shape, stage, replicas))
            fault = {key: value for key, value in fault.items() if value is not None}
        elif rng.random() < 0.5:  # a stall in the middle of a step rather than between two
            fault["during_step"] = True
        if kind == "kill":
            names = COORDINATOR_SIGNALS if on_coordinator else WORKER_SIGNALS
            if "at_reduce" in fault or "at_resume" in fault:
                names = [n for n in names if n != "SIGTERM"]  # lands exactly only in main
            fault["signal"] = rng.choice(names)
        elif kind == "freeze":
            fault["duration_s"] = rng.choice([0.2, HEARTBEAT_S * 2.2])
        else:
            signals = (rng.sample(STORM_SIGNALS, rng.randint(1, 3)) if on_coordinator
                       else [rng.choice(["SIGUSR1", "SIGINT", "SIGTSTP"])])
            fault.update(signals=signals, count=rng.choice([1, 50, 500]), rate_per_s=0.0)
        return fault
    periodic = shape["total"] // train["checkpoint_every"]
    if kind == "checkpoint_crash" and not shape["checkpoints"]:
        kind = "damage_checkpoint"
    if kind == "checkpoint_crash":
        after = shape["checkpoints"].pop()  # the one after it surely comes
        if on_coordinator:
            return {"kind": kind, "target": "coordinator", "after_checkpoint": after,
                    "phase": rng.choice(COORDINATOR_PHASES)}
        return {"kind": kind, "target": worker, "after_checkpoint": after,
                "phase": "segment_written"}
    if kind == "damage_checkpoint":
        return {"kind": kind, "after_checkpoint": rng.randint(1, max(1, periodic)),
                "mode": rng.choice(["flip", "truncate"])}
    if kind == "slow_loader":
        return {"kind": kind, "delay_s": 0.002}
    if kind == "fd_pressure":
        return {"kind": kind, "max_open_files": 256}
    link = f"{stage}->{stage + 1}" if stage < stages - 1 else f"{stage}->{stage - 1}"
    fault = {"kind": kind, "link": link, "replica": replica, "at_step": step}
    if rng.random() < 0.5:
        fault["at_microbatch"] = rng.randrange(train["microbatches"])
    if kind == "sever":
        fault["when"] = rng.choice(["before", "after"])
    elif kind == "delay":
        fault.update(latency_ms=5, for_steps=rng.randint(1, 5))
    elif kind == "throttle":
        fault.update(bandwidth_bytes_per_s=2e6, for_steps=rng.randint(1, 5))
    return fault


def _finer_point(rng: random.Random, shape: dict[str, Any], stage: int,
                 replicas: int) -> dict[str, Any]:
    """Most faults land before a step; some before an action, or the all-reduce of a layer."""
    roll = rng.random()
    if roll < 0.3:
        action = rng.choice(shape["schedule"][stage])
        return {"at_action": str(action)[len(str(stage)):]}
    first, stop = shape["bounds"][stage][:2]  # the stage's (first) piece
    if roll < 0.45 and replicas > 1:
        return {"at_reduce": rng.randrange(first, stop)}
    if roll > 0.93:  # lands only if something makes the run restart or resume first
        return {"at_resume": True, "at_step": None}
    return {}


def finish_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """``plan`` with ``expect.restarts`` set to what its faults cause (left out when one of
    them cannot say)."""
    from pipetrain_harness.faults import build_fault

    heartbeat_s = float(plan["train"].get("heartbeat_timeout", 5.0))
    total = 0
    for table in plan["faults"]:
        # A fault at a resume lands only if some restart or resume restores a checkpoint.
        restarts = (None if table.get("at_resume")
                    else build_fault(table).expected_restarts(heartbeat_s))
        if restarts is None:
            total = None
            break
        total += restarts
    expect = {key: value for key, value in plan["expect"].items() if key != "restarts"}
    if total is not None:
        expect["restarts"] = total
    return {**plan, "expect": expect}


def fuzz(*, seconds: float, seed: int, report_dir: Path, save_dir: Path,
         plant: str | None = None, shrink_runs: int = 40) -> int:
    from pipetrain_harness.runner import run_scenario
    from pipetrain_harness.shrink import describe_size, shrink

    rng = random.Random(seed)  # noqa: S311 - test plans, not security
    deadline = time.monotonic() + seconds
    found, index = [], 0
    scratch = Path(report_dir) / "plans"
    scratch.mkdir(parents=True, exist_ok=True)
    while time.monotonic() < deadline:
        plan = draw_plan(rng, index, seed, plant)
        path = scratch / f"{plan['name']}.toml"
        path.write_text(scenario_to_toml(plan))
        verdict, results, report, _ = run_scenario(load_scenario(path), report_dir=report_dir)
        faults = ", ".join(f.get("bug", f["kind"]) for f in plan["faults"])
        print(f"plan {index}: {faults} -> {verdict}", flush=True)
        if verdict != "valid":
            failing = sorted(r.name for r in results if r.status != "valid")
            print(f"   failed: {', '.join(failing)}; shrinking", flush=True)
            small, small_report, runs = shrink(plan, report, failing, report_dir=report_dir,
                                               max_runs=shrink_runs)
            print(f"   shrunk in {runs} run(s): {describe_size(plan)} -> "
                  f"{describe_size(small)}", flush=True)
            found.append(save(small, small_report, save_dir))
        index += 1
    print(f"fuzz: {index} plan(s) in {seconds:.0f}s, {len(found)} failure(s)")
    return 1 if found else 0


def save(plan: dict[str, Any], report: dict[str, Any], save_dir: Path) -> Path:
    """The minimal plan as a scenario file, and beside it what replays it: the report's
    replay information, its history digest and verdict."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    failed = [c for c in report["checks"] if c["status"] != "valid"]
    plan = {**plan, "description": ("found by fuzz: " + "; ".join(
        f"{c['name']}: {c['message']}" for c in failed))[:300]}
    saved = save_dir / f"{plan['name']}.toml"
    saved.write_text(scenario_to_toml(plan))
    replay_path = save_dir / f"{plan['name']}.replay.json"
    keep = ("scenario", "verdict", "checks", "history_digest", "canonical_history", "replay")
    replay_path.write_text(json.dumps({k: report[k] for k in keep}, indent=2, default=str) + "\n")
    print(f"   saved {saved} (history digest {report['history_digest'][:16]})\n"
          f"   reproduce: python -m pipetrain_harness replay {replay_path}", flush=True)
    return saved
