"""Recovery after a killed worker, with the defaults (no --checkpoint-every: the in-memory
snapshots are all there is): over N kills of random workers, each ``restart`` event's
``recovery_s`` (the failure seen -> the first step done after it) and ``steps_lost`` (steps
reported before the failure that had to be run again), with the recovery mode of each.

    python bench/recovery.py --kills 20                     # S = 3, R = 1 (the defaults)
    python bench/recovery.py --kills 20 --stages 2 --replicas 2
    python bench/recovery.py --kills 20 --every 60,80       # a spare ready for every kill
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipetrain_harness.plan import Plan

REPO = Path(__file__).resolve().parent.parent


def steps_seen(events_path: Path) -> int:
    try:
        lines = events_path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        if '"event": "step"' in line:
            with contextlib.suppress(ValueError):  # the line being appended right now
                steps.append(json.loads(line)["step"])
    return max(steps, default=0)


def restarts(events_path: Path) -> list[dict]:
    found = []
    for line in events_path.read_text().splitlines():
        if '"event": "restart"' in line:
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return found


def measure(kills: int, seed: int = 0, stages: int = 3, replicas: int = 1,
            every: tuple[int, int] = (5, 15)) -> list[dict]:
    """The ``restart`` events of one run whose workers are killed ``kills`` times, each kill
    ``every`` (a range of) steps after the last recovery."""
    rng = random.Random(seed)
    # Each step slowed by 0.01 s (the harness's hooks), so a kill lands mid-run.
    env = dict(os.environ, **Plan(step_delay_s=0.01).env())
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        events = run_dir / "events.jsonl"
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "pipetrain_harness.entry", "train", "--run-dir",
             str(run_dir), "--epochs", "200", "--stages", str(stages), "--replicas",
             str(replicas), "--max-restarts", str(kills + 1), "--quiet"],
            env=env, cwd=REPO)
        try:
            for kill in range(kills):
                target_step = steps_seen(events) + rng.randint(*every)
                while steps_seen(events) < target_step:
                    time.sleep(0.01)
                state = json.loads((run_dir / "run.json").read_text())
                os.kill(rng.choice(state["worker_pids"]), signal.SIGKILL)
                while len(restarts(events)) <= kill:  # the group back before the next kill
                    time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        return restarts(events)


def summary(found: list[dict]) -> dict:
    times = [e["recovery_s"] for e in found]
    lost = [e["steps_lost"] for e in found]
    return {"kills": len(found), "median_s": statistics.median(times), "max_s": max(times),
            "min_s": min(times), "median_steps_lost": statistics.median(lost),
            "max_steps_lost": max(lost), "samples_s": times, "steps_lost": lost,
            "modes": sorted({e.get("mode", "group") for e in found})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", default="5,15", help="steps between kills: MIN,MAX (at "
                        "0.01 s a step the default leaves the next spare no time to start)")
    args = parser.parse_args()
    low, high = (int(part) for part in args.every.split(","))
    found = measure(args.kills, args.seed, args.stages, args.replicas, (low, high))
    print(json.dumps({k: v for k, v in summary(found).items()
                      if k not in ("samples_s", "steps_lost")}))


if __name__ == "__main__":
    main()
