"""Recovery time after a killed worker: from the failure being seen to the first step after the
restart (the ``recovery_s`` of ``restart`` events), over N kills of random workers.

    python bench/recovery.py --kills 20
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


def measure(kills: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    # Each step slowed by 0.01 s (the harness's hooks), so a kill lands mid-run.
    env = dict(os.environ, **Plan(step_delay_s=0.01).env())
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "pipetrain_harness.entry", "train", "--run-dir",
             str(run_dir), "--epochs", "200", "--checkpoint-every", "5", "--max-restarts",
             str(kills + 1), "--quiet"],
            env=env, cwd=REPO)
        try:
            for kill in range(kills):
                target_step = steps_seen(run_dir / "events.jsonl") + rng.randint(5, 15)
                while steps_seen(run_dir / "events.jsonl") < target_step:
                    time.sleep(0.01)
                state = json.loads((run_dir / "run.json").read_text())
                os.kill(rng.choice(state["worker_pids"]), signal.SIGKILL)
                while True:  # wait for the group to come back before the next kill
                    text = (run_dir / "events.jsonl").read_text()
                    if text.count('"event": "restart"') > kill:
                        break
                    time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        lines = (run_dir / "events.jsonl").read_text().splitlines()
        return [json.loads(line)["recovery_s"] for line in lines if '"event": "restart"' in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args()
    times = measure(args.kills)
    print(json.dumps({"kills": len(times), "median_s": statistics.median(times),
                      "max_s": max(times), "min_s": min(times)}))


if __name__ == "__main__":
    main()
