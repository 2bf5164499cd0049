"""Per-step time of a model config: ``pipetrain train`` at S stages against ``pipetrain
reference``, as interleaved pairs of real runs (the machine is shared: pairs keep the load
fair), plus each stage's compute and wait share from the step events and a cProfile of the
reference's step by function.

    python -m bench.models examples/gpt-text.toml --stages 2 --steps 60 --pairs 3

Step time is the median gap between consecutive ``step`` events after ``--skip`` warm-up steps;
each run is stopped with SIGTERM (checkpoint, exit 0) once enough steps are in.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def step_times(run_dir: Path, skip: int) -> tuple[list[float], list[dict]]:
    steps = []
    with open(run_dir / "events.jsonl", encoding="utf-8") as handle:
        for line in handle:
            event = json.loads(line)
            if event["event"] == "step":
                steps.append(event)
    gaps = [b["t"] - a["t"] for a, b in zip(steps[skip:], steps[skip + 1:], strict=False)]
    return gaps, [s.get("metrics") or [] for s in steps[skip:]]


def run(command: str, config: str, run_dir: Path, steps: int, extra: list[str]) -> None:
    """Start a run and stop it (SIGTERM: checkpoint, exit 0) once ``steps`` steps are done."""
    args = [sys.executable, "-P", "-m", "pipetrain", command, config, "--run-dir", str(run_dir),
            "--quiet", *extra]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL)
    events = run_dir / "events.jsonl"
    while process.poll() is None:
        time.sleep(0.2)
        try:
            done = sum('"event": "step"' in line for line in events.read_text().splitlines())
        except FileNotFoundError:
            continue
        if done >= steps:
            process.send_signal(signal.SIGTERM)
            break
    process.wait()


def profile_reference(config_path: str, steps: int) -> str:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from pipetrain.config import build_config, load_toml
    from pipetrain.nn import build_segment, init_parameters, make_optimizer
    from pipetrain.training.evaluate import load_workload
    from pipetrain.training.reference import train_step

    config = build_config({**load_toml(config_path), "stages": 1})
    workload = load_workload(config)
    model = config.model_spec()
    params = init_parameters(model.resolved, config.seed, np.dtype(config.dtype))
    segment = build_segment(model.resolved, params, 0, model.num_layers)
    optimizer = make_optimizer(config.optimizer, params, config.lr)
    profiler = cProfile.Profile()
    with threadpool_limits(1):
        for step in range(1, steps + 1):
            if step == 3:
                profiler.enable()
            optimizer.step(train_step(segment, workload, config, step, model)[1])
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=12)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"reference": [], "train": []}
    shares = []
    print(f"load before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for command in ("reference", "train"):
                run_dir = Path(tmp) / f"{command}-{pair}"
                extra = ["--stages", str(args.stages)] if command == "train" else []
                run(command, args.config, run_dir, args.steps + args.skip, extra)
                gaps, metrics = step_times(run_dir, args.skip)
                results[command].append(statistics.median(gaps))
                if command == "train":
                    shares.append(metrics)
    print(f"load after: {os.getloadavg()}")
    for command, values in results.items():
        print(f"{command:9}: median step {statistics.median(values) * 1000:.1f} ms "
              f"(per pair: {', '.join(f'{v * 1000:.1f}' for v in values)})")
    ratio = statistics.median(results["reference"]) / statistics.median(results["train"])
    print(f"speed-up of train --stages {args.stages} over reference: {ratio:.2f}x")
    for stage in range(args.stages):
        per_step = [ms[stage] for run_ in shares for ms in run_ if len(ms) > stage]
        compute = statistics.median(m["compute_s"] for m in per_step)
        wait = statistics.median(m["wait_neighbours_s"] for m in per_step)
        print(f"stage {stage}: compute {compute * 1000:.1f} ms, waiting for neighbours "
              f"{wait * 1000:.1f} ms per step")
    print(profile_reference(args.config, args.profile_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
