"""Training throughput: ``pipetrain train`` and ``pipetrain reference`` as real runs, timed from
their events.

A run's samples/s is ``batch_size / median step time``, where a step's time is the gap between
its ``step`` event and the previous one (both stamped by the process that drives the steps). The
first ``skip`` steps (process warm-up) and every step that follows an epoch boundary (the epoch's
evaluation and parameter gathering sit in that gap) are left out. The same events give the loader
stall share (``wait_data_s`` of the data-reading stages against the step time) and each stage's
time split (compute, waiting for neighbours, all-reduce).

The pipeline runs are traced (``--trace``, a few dozen spans a step on each stage: microseconds
against steps of tens of milliseconds), and their trace gives the *ideal pipeline bound*: the
schedule replayed with each stage's measured median time of each kind of action and no cost for
anything else (``pipetrain.run.timeline``). ``fraction_of_bound`` is that ideal step time over
the measured one.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    """What every training run of one suite invocation trains on."""
    layers: tuple[int, ...] = (784, 1024, 1024, 1024, 10)
    samples: int = 4096
    batch: int = 256
    epochs: int = 3
    skip: int = 3  # warm-up steps left out of the timing
    torch_steps: int = 40
    torch_warmup: int = 5

    @property
    def layers_arg(self) -> str:
        return ",".join(map(str, self.layers))


FULL = Workload()
QUICK = Workload(layers=(64, 128, 128, 128, 10), samples=512, batch=64, epochs=1, skip=1,
                 torch_steps=5, torch_warmup=1)
# The fixed cost of a step: a model so small that a step is almost nothing but machinery
# (8 dense layers of 32 on digit-sized inputs, batch 64, M = 4).
TINY = Workload(layers=(64, 32, 32, 32, 32, 32, 32, 32, 10), samples=4096, batch=64, epochs=2,
                skip=3)
TINY_QUICK = Workload(layers=(64, 32, 32, 32, 32, 32, 32, 32, 10), samples=512, batch=64,
                      epochs=1, skip=1)


@dataclass(frozen=True)
class RunConfig:
    """One configuration: a pipetrain command, or a torch baseline (``torch`` mode set)."""
    name: str
    command: str = "train"  # train | reference | torch
    stages: int = 1
    replicas: int = 1
    microbatches: int = 4
    schedule: str = "1f1b"
    blas_threads: int = 1
    torch_mode: str | None = None
    batch: int | None = None  # None: the workload's
    epochs: int | None = None
    extra: tuple[str, ...] = field(default=())
    layers: tuple[int, ...] | None = None  # None: the workload's (the model-size sweep)
    trace: bool = False  # --trace, for the ideal pipeline bound


def make_dataset(directory: Path, workload: Workload, seed: int = 0) -> Path:
    """Synthetic .npz: x float32 random (samples x features), y int 0..9."""
    rng = np.random.default_rng(seed)
    x = rng.random((workload.samples, workload.layers[0]), dtype=np.float32)
    y = rng.integers(0, min(10, workload.layers[-1]), size=workload.samples, dtype=np.int64)
    path = directory / "synthetic.npz"
    np.savez(path, x=x, y=y)
    return path


def cli_env(blas_threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(blas_threads)
    return env


def pipetrain_args(config: RunConfig, workload: Workload, dataset: Path,
                   run_dir: Path) -> list[str]:
    batch = config.batch or workload.batch
    args = [
        sys.executable, "-P", "-m", "pipetrain", config.command, "--dataset", str(dataset),
        "--layers", ",".join(map(str, config.layers)) if config.layers else workload.layers_arg,
        "--dtype", "float32", "--batch-size", str(batch),
        "--microbatches", str(config.microbatches), "--holdout", "0", "--optimizer", "sgd",
        "--epochs", str(config.epochs or workload.epochs), "--quiet", "--run-dir", str(run_dir),
        "--blas-threads", str(config.blas_threads),
    ]
    if config.command == "train":
        args += ["--stages", str(config.stages), "--replicas", str(config.replicas),
                 "--schedule", config.schedule]
        if config.trace:
            args.append("--trace")
    elif config.replicas > 1:
        args += ["--replicas", str(config.replicas)]
    return [*args, *config.extra]


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_timing(events: list[dict], skip: int) -> dict:
    """Step times from the events (see the module docstring) and the per-stage split."""
    steps = [e for e in events if e["event"] == "step"]
    boundaries = {e["step"] for e in events if e["event"] == "epoch_end"}
    intervals, stalls, stages = [], [], []
    for previous, current in zip(steps, steps[1:], strict=False):
        if current["step"] <= skip or previous["step"] in boundaries:
            continue
        if current["step"] != previous["step"] + 1:  # a restart in between: not a step's time
            continue
        gap = current["t"] - previous["t"]
        intervals.append(gap)
        metrics = current.get("metrics") or []
        waits = [m.get("wait_data_s", 0.0) for m in metrics if "wait_data_s" in m]
        if waits:
            stalls.append((max(waits), gap))
        stages.append(metrics)
    if not intervals:
        return {"steps_timed": 0}
    median = statistics.median(intervals)
    result = {"steps_timed": len(intervals), "median_step_s": median,
              "step_s_min": min(intervals), "step_s_max": max(intervals),
              "mean_step_s": statistics.fmean(intervals)}
    if stalls:
        shares = sorted(w / g for w, g in stalls)
        result["stall"] = {
            "mean_share": sum(w for w, _ in stalls) / sum(g for _, g in stalls),
            "median_share": statistics.median(shares),
            "p95_share": shares[min(len(shares) - 1, int(0.95 * len(shares)))],
            "max_share": shares[-1],
        }
    if stages and stages[0]:
        split = []
        for index in range(len(stages[0])):
            per = {}
            for key in ("compute_s", "wait_data_s", "wait_neighbours_s", "allreduce_s",
                        "loader_depth"):
                values = [s[index][key] for s in stages if index < len(s) and key in s[index]]
                if values:
                    per[key] = statistics.median(values)
            split.append(per)
        result["stage_split"] = split
    return result


class PeakRss:
    """Samples VmHWM (peak resident set) of the run's worker processes from /proc."""

    def __init__(self, run_dir: Path, interval_s: float = 0.02) -> None:
        self.run_dir = run_dir
        self.interval_s = interval_s
        self.peaks: dict[int, int] = {}
        self.pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-rss")

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.pids:
                try:
                    state = json.loads((self.run_dir / "run.json").read_text())
                    self.pids = list(state.get("worker_pids") or [])
                except (OSError, ValueError):
                    continue
            for pid in self.pids:
                try:
                    with open(f"/proc/{pid}/status") as handle:
                        for line in handle:
                            if line.startswith("VmHWM:"):
                                kib = int(line.split()[1])
                                self.peaks[pid] = max(self.peaks.get(pid, 0), kib * 1024)
                except (OSError, ValueError):
                    pass


def run_pipetrain(config: RunConfig, workload: Workload, dataset: Path, run_dir: Path, *,
                  track_rss: bool = False, timeout_s: float = 900) -> dict:
    """One run; returns its timing (or an ``error``)."""
    args = pipetrain_args(config, workload, dataset, run_dir)
    started = time.time()
    rss = PeakRss(run_dir) if track_rss else None
    if rss:
        rss.__enter__()
    try:
        proc = subprocess.run(args, cwd=REPO, env=cli_env(config.blas_threads),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    finally:
        if rss:
            rss.__exit__()
    wall = time.time() - started
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    events = read_events(run_dir)
    result = step_timing(events, workload.skip)
    if "median_step_s" not in result:
        return {"error": "no steps could be timed", "wall_s": wall}
    batch = config.batch or workload.batch
    result["samples_per_s"] = batch / result["median_step_s"]
    result["wall_s"] = wall
    starts = [e["t"] for e in events if e["event"] == "run_start"]
    steps = [e["t"] for e in events if e["event"] == "step"]
    if starts:
        result["to_run_start_s"] = starts[0] - started
    if steps:
        result["to_first_step_s"] = steps[0] - started
    if rss:
        result["peak_rss_bytes"] = [rss.peaks.get(pid) for pid in rss.pids]
    if config.trace:
        result["bound"] = pipeline_bound(run_dir, workload.skip)
    return result


def pipeline_bound(run_dir: Path, skip: int) -> dict:
    """The ideal pipeline of a traced run (see the module docstring), or why there is none."""
    from pipetrain.run.timeline import summarize
    from pipetrain.run.trace_file import load_trace

    try:
        config = json.loads((run_dir / "run.json").read_text())["config"]
        summary = summarize(load_trace(run_dir), config, skip=skip)
    except (OSError, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {key: summary[key] for key in ("ideal_step_s", "ideal_bubble", "schedule_bubble",
                                          "measured_bubble", "window_s")} | {
        "per_stage": [{k: row[k] for k in ("compute_s", "send_s", "wait_s", "other_s",
                                           "action_s")} for row in summary["per_stage"]]}


def run_torch(config: RunConfig, workload: Workload, timeout_s: float = 900) -> dict:
    from . import torch_baselines

    parser = torch_baselines.parser()
    args = parser.parse_args([
        "--mode", config.torch_mode, "--threads", str(config.blas_threads),
        "--layers", workload.layers_arg, "--batch", str(config.batch or workload.batch),
        "--microbatches", str(config.microbatches), "--steps", str(workload.torch_steps),
        "--warmup", str(workload.torch_warmup),
    ])
    try:
        result = torch_baselines.launch(args, timeout_s=timeout_s)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        return {"error": str(exc)[-500:]}
    times = result.pop("step_times_s")
    result["steps_timed"] = len(times)
    result["step_s_min"], result["step_s_max"] = min(times), max(times)
    return result


def summarize(runs: list[dict]) -> dict:
    """Median and min-max of samples/s over a config's repeats (failed runs listed apart)."""
    ok = [r for r in runs if "samples_per_s" in r]
    out: dict = {"repeats": len(runs), "ok": len(ok),
                 "errors": [r["error"] for r in runs if "error" in r]}
    if ok:
        values = [r["samples_per_s"] for r in ok]
        out.update(median=statistics.median(values), min=min(values), max=max(values),
                   runs=values)
        busy = [r["others_busy_before"] for r in ok if r.get("others_busy_before") is not None]
        if busy:
            out["others_busy_before_max"] = max(busy)
        splits = [r["stage_split"] for r in ok if r.get("stage_split")]
        if splits:
            merged = []
            for index in range(len(splits[0])):
                per = {}
                for key in splits[0][index]:
                    per[key] = statistics.median(s[index][key] for s in splits
                                                 if index < len(s) and key in s[index])
                merged.append(per)
            out["stage_split"] = merged
        stalls = [r["stall"] for r in ok if "stall" in r]
        if stalls:
            out["stall"] = {key: statistics.median(s[key] for s in stalls) for key in stalls[0]}
        steps = [r["median_step_s"] for r in ok if "median_step_s" in r]
        if steps:
            out["median_step_s"] = statistics.median(steps)
        bounds = [r["bound"] for r in ok if "ideal_step_s" in r.get("bound", {})]
        if bounds and steps:
            ideal = statistics.median(b["ideal_step_s"] for b in bounds)
            out["bound"] = {
                "ideal_step_s": ideal, "fraction_of_bound": ideal / out["median_step_s"],
                "ideal_bubble": statistics.median(b["ideal_bubble"] for b in bounds),
                "schedule_bubble": bounds[0]["schedule_bubble"],
                "measured_bubble": statistics.median(b["measured_bubble"] for b in bounds),
                "per_stage_compute_s": [statistics.median(b["per_stage"][s]["compute_s"]
                                                          for b in bounds)
                                        for s in range(len(bounds[0]["per_stage"]))],
                "runs": len(bounds)}
        elif any("bound" in r for r in ok):
            out["bound"] = {"error": next(r["bound"].get("error") for r in ok if "bound" in r)}
    return out


def config_json(config: RunConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if v not in (None, ())}

