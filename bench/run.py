"""The benchmark suite: every comparison side by side in one invocation.

    python -m bench.run [--quick] [--repeats N] [--out bench/]     # tox -e bench, pipetrain bench

Sections (``--sections`` picks some): transport (frames against a raw os.pipe and
multiprocessing.Connection), training (pipetrain train and reference against each other and
against torch: pipelining 1F1B / GPipe and DDP, plus sweeps over stages, micro-batches and
replicas for the plots), loader stall share, recovery time after a kill, start-up time of S = 4,
peak RSS per stage for GPipe against 1F1B. Within each repeat the configurations alternate
(A B C A B C ...) so that drift affects all of them alike; results are medians with min-max over
the repeats, and every ratio is taken against a baseline measured in the same invocation.

Writes ``results.json``, ``results.md`` (the tables) and ``plots/*.png`` to ``--out``. The full
run waits first (up to ``--wait-max`` s) for the 1-minute load average to fall below
``--wait-load``, and records the load average at the start and the end. ``--quick`` is a smoke
run with tiny sizes and no torch (well under a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Relative imports: the suite runs as `python -m bench.run` in the source tree and as
# `python -m pipetrain_harness.bench.run` (`pipetrain bench`) once installed.
from . import training
from .training import FULL, QUICK, RunConfig

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("transport", "training", "recovery", "startup", "memory")
HEADINGS = {"transport": "transport", "training": "training", "recovery": "recovery after a kill",
            "startup": "start-up, S = 4", "memory": "peak RSS per stage, GPipe against 1F1B"}

# name -> what the ratio compares, numerator, denominator, target (>=), kind
TARGETS = [
    ("frames_vs_raw_1mib", "pipetrain frames / best raw os.pipe copy, 1 MiB messages", 0.95),
    ("frames_vs_raw_8mib", "pipetrain frames / best raw os.pipe copy, 8 MiB messages", 0.95),
    ("s2_vs_reference_1t", "train S=2 1F1B M=4 / reference (1 BLAS thread)", 1.15),
    ("s2_vs_torch_1f1b", "train S=2 1F1B M=4 / torch Schedule1F1B (2 ranks, M=4)", 1.10),
    ("r2_vs_torch_ddp", "train R=2 / torch DDP (2 ranks x 128)", 1.30),
    ("zb_vs_1f1b_s2", "train S=2 zb / 1f1b (M=4)", 1.05),
    ("zb_vs_1f1b_s3", "train S=3 zb / 1f1b (M=4)", 1.05),
    ("loader_stall_share", "loader stall share of step time, S=2 1F1B (mean)", 0.02),
    ("recovery_median_s", "recovery after a kill, median seconds", 0.5),
]
LOWER_IS_BETTER = {"loader_stall_share", "recovery_median_s"}
# numerator, denominator of each training ratio (all in one table)
TRAINING_RATIOS = {
    "s2_vs_reference_1t": ("s2-1f1b-m4", "ref-1t"),
    "s2_vs_reference_1t_whole_batch": ("s2-1f1b-m4", "ref-1t-m1"),
    "s2_vs_reference_2t": ("s2-1f1b-m4", "ref-2t"),
    "s2_vs_torch_1f1b": ("s2-1f1b-m4", "torch-1f1b"),
    "s2_zb_vs_torch_1f1b": ("s2-zb-m4", "torch-1f1b"),  # pipetrain's best S=2 schedule
    "s2_gpipe_vs_torch_gpipe": ("s2-gpipe-m4", "torch-gpipe"),
    "r2_vs_torch_ddp": ("r2-m1", "torch-ddp"),
    "r2_vs_reference_1t": ("r2-m1", "ref-1t-m1"),
    "zb_vs_1f1b_s2": ("s2-zb-m4", "s2-1f1b-m4"),
    "zb_vs_1f1b_s3": ("s3-zb-m4", "s3-1f1b-m4"),
    "reference_2t_vs_1t": ("ref-2t", "ref-1t"),
    "torch_single_vs_reference_1t": ("torch-single-1t", "ref-1t-m1"),
}


def main_configs() -> list[RunConfig]:
    """The configurations the targets are judged on: every repeat runs all of them."""
    return [
        RunConfig("ref-1t", "reference", blas_threads=1),
        RunConfig("ref-2t", "reference", blas_threads=2),
        RunConfig("ref-1t-m1", "reference", microbatches=1, blas_threads=1),
        RunConfig("s2-1f1b-m4", stages=2, schedule="1f1b"),
        RunConfig("s2-gpipe-m4", stages=2, schedule="gpipe"),
        RunConfig("s2-zb-m4", stages=2, schedule="zb"),
        RunConfig("s3-1f1b-m4", stages=3, schedule="1f1b"),
        RunConfig("s3-zb-m4", stages=3, schedule="zb"),
        RunConfig("r2-m1", stages=1, replicas=2, microbatches=1),
        RunConfig("torch-single-1t", "torch", torch_mode="single", microbatches=1),
        RunConfig("torch-single-2t", "torch", torch_mode="single", microbatches=1,
                  blas_threads=2),
        RunConfig("torch-1f1b", "torch", torch_mode="pipe-1f1b", stages=2),
        RunConfig("torch-gpipe", "torch", torch_mode="pipe-gpipe", stages=2),
        RunConfig("torch-ddp", "torch", torch_mode="ddp", replicas=2, microbatches=1),
    ]


def sweep_configs(quick: bool) -> list[RunConfig]:
    """Extra points for the plots (stages, micro-batches, replicas); fewer repeats. None in a
    quick run: its plots show the main configurations only."""
    extra: list[RunConfig] = []
    if quick:
        return extra
    stages = (1, 2, 3, 4)
    for s in stages:
        for schedule in ("gpipe", "1f1b", "zb"):
            if s == 1 and schedule != "1f1b":
                continue  # one stage: every schedule is the same sequence
            extra.append(RunConfig(f"s{s}-{schedule}-m4", stages=s, schedule=schedule))
    for m in (1, 2, 8, 16):
        for schedule in ("gpipe", "1f1b", "zb"):
            extra.append(RunConfig(f"s2-{schedule}-m{m}", stages=2, schedule=schedule,
                                   microbatches=m))
    for r in (1, 4):
        extra.append(RunConfig(f"r{r}-m1", stages=1, replicas=r, microbatches=1))
    return extra


# -- helpers ---------------------------------------------------------------------------------

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_for_idle(threshold: float, max_wait_s: float, poll_s: float = 15.0) -> dict:
    start = os.getloadavg()[0]
    started = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - started < max_wait_s:
        log(f"waiting for the 1-minute load average ({os.getloadavg()[0]:.2f}) to fall below "
            f"{threshold} ({time.monotonic() - started:.0f} of {max_wait_s:.0f} s)")
        time.sleep(min(poll_s, max(0.1, max_wait_s - (time.monotonic() - started))))
    now = os.getloadavg()[0]
    return {"threshold": threshold, "max_wait_s": max_wait_s, "load_before_wait": start,
            "waited_s": round(time.monotonic() - started, 1), "load_after_wait": now,
            "reached": now < threshold}


def cpu_busy(window_s: float) -> float:
    """Fraction of all cores busy over ``window_s`` (from /proc/stat). Called between runs, when
    this suite runs nothing itself, it measures what other processes are doing."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(window_s)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


class QuietGate:
    """Before each measurement: wait while other processes keep more than ``max_busy`` of the
    machine busy (this is a shared machine), within a total ``budget_s``; every wait and the
    busy fraction seen right before each run are recorded with the results."""

    def __init__(self, max_busy: float, budget_s: float, window_s: float = 0.5) -> None:
        self.max_busy, self.budget_s, self.window_s = max_busy, budget_s, window_s
        self.waited_s = 0.0
        self.waits = 0

    def __call__(self, what: str) -> float | None:
        if self.budget_s <= 0:
            return None
        try:
            busy = cpu_busy(self.window_s)
        except (OSError, ValueError, IndexError):
            return None
        logged = False
        while busy > self.max_busy and self.waited_s < self.budget_s:
            if not logged:
                log(f"  waiting before {what}: other processes keep {busy:.0%} of the CPUs busy")
                logged = True
                self.waits += 1
            time.sleep(2.0)
            self.waited_s += 2.0 + self.window_s
            busy = cpu_busy(self.window_s)
        return round(busy, 3)

    def summary(self) -> dict:
        return {"max_busy": self.max_busy, "budget_s": self.budget_s, "waits": self.waits,
                "waited_s": round(self.waited_s, 1),
                "budget_exhausted": self.budget_s > 0 and self.waited_s >= self.budget_s}


GATE = QuietGate(0.0, 0.0)


def machine_info() -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
        info["pipe_max_size"] = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        pass
    import numpy

    info["numpy"] = numpy.__version__
    try:
        from threadpoolctl import threadpool_info

        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if blas:
            info["blas"] = {k: blas[0].get(k) for k in ("internal_api", "version",
                                                        "architecture", "threading_layer")}
    except ImportError:
        pass
    from .torch_baselines import torch_version

    info["torch"] = torch_version()
    try:
        import matplotlib

        info["matplotlib"] = matplotlib.__version__
    except ImportError:
        info["matplotlib"] = None
    info["env"] = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
                                              "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")
                   if k in os.environ}
    return info


def ratio_entry(numerator: dict, denominator: dict) -> dict | None:
    if "median" not in numerator or "median" not in denominator:
        return None
    entry = {"value": numerator["median"] / denominator["median"]}
    paired = [a / b for a, b in zip(numerator.get("runs", []), denominator.get("runs", []),
                                    strict=False)]
    if paired:
        entry.update(paired_min=min(paired), paired_max=max(paired),
                     paired_median=statistics.median(paired))
    return entry


# -- sections ----------------------------------------------------------------------------------

def run_training(args: argparse.Namespace, workdir: Path, with_torch: bool,
                 torch_note: str | None) -> dict:
    workload = QUICK if args.quick else FULL
    dataset = training.make_dataset(workdir, workload)
    configs = [c for c in main_configs() if with_torch or c.command != "torch"]
    names = {c.name for c in configs}
    extras = [c for c in sweep_configs(args.quick) if c.name not in names]
    if args.configs:
        wanted = set(args.configs.split(","))
        configs = [c for c in configs if c.name in wanted]
        extras = [c for c in extras if c.name in wanted]
    sweep_repeats = args.sweep_repeats or (args.repeats if args.quick else
                                           min(args.repeats, 3))
    runs: dict[str, list[dict]] = {c.name: [] for c in [*configs, *extras]}
    by_name = {c.name: c for c in [*configs, *extras]}
    counter = 0
    load_by_repeat = []
    for repeat in range(args.repeats):
        active = configs + (extras if repeat < sweep_repeats else [])
        started = time.monotonic()
        load_by_repeat.append(round(os.getloadavg()[0], 2))
        for config in active:
            counter += 1
            busy = GATE(config.name)
            if config.command == "torch":
                result = training.run_torch(config, workload)
            else:
                result = training.run_pipetrain(config, workload, dataset,
                                                workdir / f"run-{counter}")
            result["others_busy_before"] = busy
            runs[config.name].append(result)
            shown = (f"{result['samples_per_s']:8.0f} samples/s" if "samples_per_s" in result
                     else f"FAILED: {result.get('error')}")
            log(f"  [{repeat + 1}/{args.repeats}] {config.name:18} {shown}")
        log(f"  repeat {repeat + 1} took {time.monotonic() - started:.0f} s")
    summary = {}
    for name, results in runs.items():
        summary[name] = {"config": training.config_json(by_name[name]),
                         **training.summarize(results)}
    ratios = {}
    for key, (num, den) in TRAINING_RATIOS.items():
        if num in summary and den in summary:
            entry = ratio_entry(summary[num], summary[den])
            if entry:
                ratios[key] = {"numerator": num, "denominator": den, **entry}
    return {"workload": {"layers": list(workload.layers), "samples": workload.samples,
                         "batch": workload.batch, "epochs": workload.epochs,
                         "skip_steps": workload.skip, "dtype": "float32", "optimizer": "sgd",
                         "torch_steps": workload.torch_steps},
            "repeats": args.repeats, "sweep_repeats": sweep_repeats,
            "load_avg_1min_by_repeat": load_by_repeat,
            "torch": {"included": with_torch, "note": torch_note},
            "configs": summary, "ratios": ratios}


def run_loader(train: dict) -> dict:
    """Loader stall share (``wait_data_s`` of the data-reading stages / step time)."""
    per_config = {name: c["stall"] for name, c in train["configs"].items() if "stall" in c}
    main = per_config.get("s2-1f1b-m4")
    worst = max(per_config.items(), key=lambda kv: kv[1]["mean_share"], default=(None, None))
    return {"config": "s2-1f1b-m4", "main": main, "per_config": per_config,
            "worst_config": worst[0], "worst_mean_share": worst[1]["mean_share"]
            if worst[1] else None}


def run_recovery(args: argparse.Namespace) -> dict:
    from . import recovery

    kills = args.kills or (1 if args.quick else 20)
    times = recovery.measure(kills)
    if not times:
        return {"kills": kills, "error": "no restart events"}
    return {"kills": len(times), "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "samples_s": times,
            "how": "bench/recovery.py: SIGKILL a random worker of a 3-stage digits run every "
                   "5-15 steps; recovery_s of each restart event (failure seen -> first step "
                   "done after the restart)"}


def run_startup(args: argparse.Namespace, workdir: Path) -> dict:
    workload = QUICK if args.quick else FULL
    dataset = training.make_dataset(workdir, workload, seed=1)
    config = RunConfig("s4-startup", stages=4, schedule="1f1b", epochs=1)
    results = []
    for i in range(max(1, args.repeats)):
        results.append(training.run_pipetrain(config, workload, dataset,
                                              workdir / f"startup-{i}"))
    ok = [r for r in results if "to_run_start_s" in r]
    out: dict = {"stages": 4, "repeats": len(results),
                 "errors": [r["error"] for r in results if "error" in r]}
    for key in ("to_run_start_s", "to_first_step_s"):
        values = [r[key] for r in ok if key in r]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values)}
    out["how"] = ("wall time from launching `pipetrain train --stages 4` to its run_start event "
                  "(4 workers spawned, each has imported numpy, loaded its data and said ready; "
                  "initial.npz written) and to its first step event")
    return out


def run_memory(args: argparse.Namespace, workdir: Path) -> dict:
    workload = QUICK if args.quick else FULL
    dataset = training.make_dataset(workdir, workload, seed=2)
    sizes = [(workload.batch * 4, 16)] if args.quick else [(workload.batch, 4),
                                                           (workload.batch * 8, 16)]
    rows = []
    for batch, m in sizes:
        for schedule in ("gpipe", "1f1b"):
            config = RunConfig(f"mem-{schedule}-b{batch}-m{m}", stages=2, schedule=schedule,
                               microbatches=m, batch=batch,
                               epochs=max(1, (4 * batch) // workload.samples))
            result = training.run_pipetrain(config, workload, dataset,
                                            workdir / f"mem-{schedule}-{batch}",
                                            track_rss=True)
            rows.append({"schedule": schedule, "batch": batch, "microbatches": m,
                         "peak_rss_bytes": result.get("peak_rss_bytes"),
                         "error": result.get("error")})
    return {"stages": 2, "rows": rows,
            "how": "VmHWM of each stage worker (from /proc, sampled every 20 ms)"}


# -- targets and report --------------------------------------------------------------------------

def judge(results: dict) -> list[dict]:
    values: dict[str, float | None] = {}
    transport = results.get("transport")
    if transport:
        for row in transport["results"]:
            if row["method"] == "pipetrain frames" and row["size"] in ("1 MiB", "8 MiB"):
                key = "frames_vs_raw_1mib" if row["size"] == "1 MiB" else "frames_vs_raw_8mib"
                values[key] = row["ratio_vs_best_raw"]
    train = results.get("training")
    if train:
        for key in ("s2_vs_reference_1t", "s2_vs_torch_1f1b", "r2_vs_torch_ddp",
                    "zb_vs_1f1b_s2", "zb_vs_1f1b_s3"):
            if key in train["ratios"]:
                values[key] = train["ratios"][key]["value"]
    loader = results.get("loader")
    if loader and loader.get("main"):
        values["loader_stall_share"] = loader["main"]["mean_share"]
    recovery = results.get("recovery")
    if recovery and "median_s" in recovery:
        values["recovery_median_s"] = recovery["median_s"]
    out = []
    for key, what, target in TARGETS:
        value = values.get(key)
        if value is None:
            met = None
        elif key in LOWER_IS_BETTER:
            met = value < target
        else:
            met = value >= target
        op = "<" if key in LOWER_IS_BETTER else ">="
        out.append({"name": key, "what": what, "value": value, "target": f"{op} {target}",
                    "met": met})
    return out


def render_only(out: Path) -> int:
    from . import plots, report

    results = json.loads((out / "results.json").read_text())
    results["plots"] = plots.write_all(results, out / "plots")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    log(f"rewrote {out / 'results.md'} and {len(results['plots'])} plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny sizes, one repeat, no torch")
    parser.add_argument("--repeats", type=int, help="repeats of every comparison (default 7; "
                        "--quick: 1)")
    parser.add_argument("--sweep-repeats", type=int,
                        help="repeats of the plot-only sweep points (default min(repeats, 3))")
    # In the source tree the results go next to the suite (BENCHMARKS.md reads them there);
    # installed, into the working directory, never into site-packages.
    default_out = REPO / "bench" if (REPO / "pyproject.toml").exists() else Path("bench-results")
    parser.add_argument("--out", default=str(default_out),
                        help=f"output directory (default: {default_out})")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                        help="include the torch baselines (default: yes unless --quick)")
    parser.add_argument("--configs", help="only these training configurations (comma-separated "
                        "names, e.g. ref-1t,s2-1f1b-m4); default: all")
    parser.add_argument("--kills", type=int, help="kills for the recovery section (20; quick 2)")
    parser.add_argument("--quiet-busy", type=float, default=0.15,
                        help="before each run, wait while other processes keep more than this "
                        "fraction of the CPUs busy (default 0.15)")
    parser.add_argument("--quiet-budget", type=float,
                        help="at most this many seconds of such waiting in all (default 900; "
                        "--quick: 0, no waiting)")
    parser.add_argument("--wait-load", type=float, default=0.5,
                        help="wait for the 1-minute load average to fall below this")
    parser.add_argument("--wait-max", type=float,
                        help="at most this many seconds (default 1200; --quick: 0)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite results.md and the plots from the "
                        "results.json already in --out")
    args = parser.parse_args(argv)
    if args.render_only:
        return render_only(Path(args.out))
    args.repeats = args.repeats or (1 if args.quick else 7)
    wait_max = args.wait_max if args.wait_max is not None else (0 if args.quick else 1200)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))

    from .torch_baselines import available

    with_torch = args.torch if args.torch is not None else not args.quick
    torch_note = None
    if with_torch:
        why = available()
        if why:
            with_torch, torch_note = False, f"torch baselines skipped: {why}"
    else:
        torch_note = "torch baselines skipped (--quick or --no-torch)"
    if torch_note:
        log(torch_note)

    load_wait = wait_for_idle(args.wait_load, wait_max) if wait_max > 0 else None
    global GATE
    GATE = QuietGate(args.quiet_busy, args.quiet_budget if args.quiet_budget is not None
                     else (0 if args.quick else 900))
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {"meta": {
        "command": command.strip(), "quick": args.quick, "repeats": args.repeats,
        "sections": sections, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_avg_start": list(os.getloadavg()), "load_wait": load_wait,
        "machine": machine_info(),
    }}
    suite_started = time.monotonic()
    section_s = results["meta"]["section_s"] = {}
    with tempfile.TemporaryDirectory(prefix="pipetrain-bench-") as tmp:
        workdir = Path(tmp)
        for section in SECTIONS:
            if section not in sections:
                continue
            log(f"== {HEADINGS[section]}")
            started = time.monotonic()
            GATE(section)
            try:
                if section == "transport":
                    from . import transport

                    results["transport"] = transport.run(args.repeats, quick=args.quick,
                                                         log=log, gate=GATE)
                elif section == "training":
                    results["training"] = run_training(args, workdir, with_torch, torch_note)
                    results["loader"] = run_loader(results["training"])
                elif section == "recovery":
                    results["recovery"] = run_recovery(args)
                elif section == "startup":
                    results["startup"] = run_startup(args, workdir)
                else:
                    results["memory"] = run_memory(args, workdir)
            except Exception as exc:  # noqa: BLE001 - one broken section must not lose the rest
                import traceback

                log(traceback.format_exc())
                results.setdefault("errors", {})[section] = f"{type(exc).__name__}: {exc}"
            section_s[section] = round(time.monotonic() - started, 1)
            # Written after every section, so that a later failure loses nothing measured.
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    results["targets"] = judge(results)
    results["meta"].update(load_avg_end=list(os.getloadavg()), quiet_gate=GATE.summary(),
                           finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           duration_s=round(time.monotonic() - suite_started, 1))
    from . import plots, report

    results["plots"] = plots.write_all(results, out / "plots")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = report.markdown(results)
    (out / "results.md").write_text(markdown)
    print(markdown)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(results['plots'])} plots")
    if results.get("errors"):
        log(f"sections that failed: {results['errors']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
