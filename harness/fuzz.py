"""``python -m pipetrain_harness fuzz``: random fault plans drawn from a seed, until time is up.

Each plan is a small training run (random stages, replicas, micro-batches, schedule, optimizer,
checkpoint interval) with one or two faults drawn from a menu of the ones a correct system must
survive with bitwise-equal results. A plan whose checks fail is saved as a scenario file, so the
failure is reproduced by one command. ``--plant NAME`` adds a ``planted_bug`` fault of that name
to every plan (so a saved plan carries its bug and replays by itself), to show that the fuzzer
finds what it should.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from pipetrain_harness.scenario import load_scenario, scenario_to_toml


def draw_plan(rng: random.Random, index: int, seed: int,
              plant: str | None = None) -> dict[str, Any]:
    stages = rng.randint(1, 3)
    replicas = rng.choice([1, 1, 2])
    train = {
        "layers": [64, 32, 24, 10],
        "stages": stages, "replicas": replicas, "microbatches": rng.randint(1, 4),
        "schedule": rng.choice(["gpipe", "1f1b", "zb"]),
        "optimizer": rng.choice(["sgd", "momentum", "adam"]),
        "epochs": 2, "batch_size": 48, "checkpoint_every": rng.choice([4, 8, 16]),
        "heartbeat_timeout": 2.0, "seed": rng.randint(0, 1000),
    }
    faults = [_draw_fault(rng, stages, replicas) for _ in range(rng.randint(1, 2))]
    if plant:
        faults.append({"kind": "planted_bug", "bug": plant})
    return {
        "name": f"fuzz-{seed}-{index}",
        "description": "a random fault plan drawn by `python -m pipetrain_harness fuzz`",
        "seed": seed, "step_delay_s": 0.01, "timeout_s": 120,
        "train": train, "faults": faults,
        "expect": {"equivalence": "bitwise", "exit_status": 0, "no_leaks": True},
    }


def _draw_fault(rng: random.Random, stages: int, replicas: int) -> dict[str, Any]:
    at_step = rng.randint(2, 40)
    stage = rng.randrange(stages)
    target = f"stage:{stage}:replica:{rng.randrange(replicas)}"
    menu = ["kill", "freeze", "signal_storm"]
    if stages > 1:  # link faults need a link
        menu += ["delay", "corrupt", "sever"]
    kind = rng.choice(menu)
    if kind == "kill":
        return {"kind": "kill", "target": target, "at_step": at_step,
                "signal": rng.choice(["SIGKILL", "SIGTERM", "SIGSEGV"])}
    if kind == "freeze":
        return {"kind": "freeze", "target": target, "at_step": at_step,
                "duration_s": rng.choice([0.2, 3.0])}
    if kind == "signal_storm":
        return {"kind": "signal_storm", "target": "coordinator", "at_step": at_step,
                "signals": rng.sample(["SIGUSR1", "SIGTSTP", "SIGCONT"], 2), "count": 200,
                "rate_per_s": 2000.0}
    link = f"{stage}->{stage + 1}" if stage < stages - 1 else f"{stage}->{stage - 1}"
    if kind == "delay":
        return {"kind": "delay", "link": link, "at_step": at_step, "latency_ms": 5}
    return {"kind": kind, "link": link, "at_step": at_step}


def fuzz(*, seconds: float, seed: int, report_dir: Path, save_dir: Path,
         plant: str | None = None) -> int:
    from pipetrain_harness.runner import run_scenario

    rng = random.Random(seed)  # noqa: S311 - test plans, not security
    deadline = time.monotonic() + seconds
    found, index = [], 0
    scratch = Path(report_dir) / "plans"
    scratch.mkdir(parents=True, exist_ok=True)
    while time.monotonic() < deadline:
        plan = draw_plan(rng, index, seed, plant)
        path = scratch / f"{plan['name']}.toml"
        path.write_text(scenario_to_toml(plan))
        verdict, results, _report, _ = run_scenario(load_scenario(path), report_dir=report_dir)
        faults = ", ".join(f.get("bug", f["kind"]) for f in plan["faults"])
        print(f"plan {index}: {faults} -> {verdict}", flush=True)
        if verdict != "valid":
            save_dir.mkdir(parents=True, exist_ok=True)
            saved = save_dir / path.name
            plan["description"] = ("found by fuzz: " + "; ".join(
                f"{r.name}: {r.message}" for r in results if r.status != "valid"))[:300]
            saved.write_text(scenario_to_toml(plan))
            reproduce = f"python -m pipetrain_harness run {saved}"
            print(f"   failed: saved {saved}\n   reproduce: {reproduce}", flush=True)
            found.append(saved)
        index += 1
    print(f"fuzz: {index} plan(s) in {seconds:.0f}s, {len(found)} failure(s)")
    return 1 if found else 0
