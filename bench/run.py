"""The benchmark suite: every comparison side by side in one invocation.

    python -m bench.run [--quick] [--repeats N] [--out bench/]     # tox -e bench, pipetrain bench

Sections (``--sections`` picks some): transport (frames against a raw os.pipe and
multiprocessing.Connection), training (pipetrain train and reference against each other and
against torch: pipelining 1F1B / GPipe / zero-bubble / interleaved and DDP, each pipeline run
beside its ideal pipeline bound, plus sweeps over stages, micro-batches, replicas and model size
for the plots), tiny (the fixed cost of a step: a tiny model from one process to 8 stages and 4
replicas against the reference), loader stall share, recovery time after a kill, start-up time
of S = 4, peak RSS per stage for GPipe against 1F1B. Every process runs with fair kernels
(``bench/fair.py``). What is measured, the ratios and the targets: ``bench/configs.py``.
Within each repeat the configurations alternate
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
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Relative imports: the suite runs as `python -m bench.run` in the source tree and as
# `python -m pipetrain_harness.bench.run` (`pipetrain bench`) once installed.
from . import fair, training
from .configs import (
    TARGETS,
    TINY_RATIOS,
    TRAINING_RATIOS,
    main_configs,
    sweep_configs,
    tiny_configs,
)
from .machine import QuietGate, log, machine_info, wait_for_idle
from .training import FULL, QUICK, TINY, TINY_QUICK, RunConfig, Workload

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("transport", "training", "tiny", "recovery", "startup", "memory")
HEADINGS = {"transport": "transport", "training": "training",
            "tiny": "the fixed cost of a step (tiny model)", "recovery": "recovery after a kill",
            "startup": "start-up, S = 4", "memory": "peak RSS per stage, GPipe against 1F1B"}


GATE = QuietGate(0.0, 0.0)
TIMELINE_CONFIG = "s3-zb-m4"  # the run whose pipeline timeline goes into the plots


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

def available_schedules() -> tuple[str, ...]:
    from pipetrain.config import SCHEDULES

    return tuple(SCHEDULES)


def measure(args: argparse.Namespace, workload: Workload, dataset: Path, workdir: Path,
            configs: list[RunConfig], extras: list[RunConfig]) -> dict:
    """Run ``configs`` every repeat and ``extras`` in the first ``sweep_repeats``,
    alternating within each repeat; the summary of each configuration."""
    if args.configs:
        wanted = set(args.configs.split(","))
        configs = [c for c in configs if c.name in wanted]
        extras = [c for c in extras if c.name in wanted]
    sweep_repeats = args.sweep_repeats or (args.repeats if args.quick else
                                           min(args.repeats, 3))
    runs: dict[str, list[dict]] = {c.name: [] for c in [*configs, *extras]}
    by_name = {c.name: c for c in [*configs, *extras]}
    load_by_repeat = []
    for repeat in range(args.repeats):
        active = configs + (extras if repeat < sweep_repeats else [])
        started = time.monotonic()
        load_by_repeat.append(round(os.getloadavg()[0], 2))
        for config in active:
            busy = GATE(config.name)
            if config.command == "torch":
                result = training.run_torch(config, workload)
            else:
                run_dir = workdir / f"run-{config.name}-{repeat}"
                result = training.run_pipetrain(config, workload, dataset, run_dir)
            result["others_busy_before"] = busy
            runs[config.name].append(result)
            if config.name == TIMELINE_CONFIG and repeat == 0 and "bound" in result:
                result["timeline_png"] = draw_timeline(run_dir, Path(args.out) / "plots")
            shown = (f"{result['samples_per_s']:8.0f} samples/s "
                     f"{result.get('median_step_s', 0) * 1e3:8.2f} ms/step"
                     if "samples_per_s" in result else f"FAILED: {result.get('error')}")
            bound = result.get("bound", {}).get("ideal_step_s")
            if bound and result.get("median_step_s"):
                shown += f"  {bound / result['median_step_s']:.0%} of the bound"
            log(f"  [{repeat + 1}/{args.repeats}] {config.name:18} {shown}")
        log(f"  repeat {repeat + 1} took {time.monotonic() - started:.0f} s")
    summary = {name: {"config": training.config_json(by_name[name]),
                      **training.summarize(results)} for name, results in runs.items()}
    return {"configs": summary, "repeats": args.repeats, "sweep_repeats": sweep_repeats,
            "load_avg_1min_by_repeat": load_by_repeat,
            "workload": {"layers": list(workload.layers), "samples": workload.samples,
                         "batch": workload.batch, "epochs": workload.epochs,
                         "skip_steps": workload.skip, "dtype": "float32", "optimizer": "sgd",
                         "torch_steps": workload.torch_steps}}


def draw_timeline(run_dir: Path, directory: Path) -> str | None:
    """The pipeline timeline of a traced run (``pipetrain trace``'s picture) into the plots."""
    from pipetrain.run.trace_plot import draw_timeline as draw
    from pipetrain.run.trace_report import trace_summary

    try:
        events, summary = trace_summary(run_dir)
        path = draw(events, summary, directory / f"timeline-{TIMELINE_CONFIG}.png")
    except Exception as exc:  # noqa: BLE001 - a picture must not lose the measurements
        log(f"  no timeline: {type(exc).__name__}: {exc}")
        return None
    return f"{directory.name}/{path.name}"


def ratios_of(summary: dict, pairs: dict[str, tuple[str, str]], *, step_time: bool = False
              ) -> dict:
    out = {}
    for key, (num, den) in pairs.items():
        if num in summary and den in summary:
            # Time per step is batch / samples-per-second: the inverse ratio of throughputs.
            entry = ratio_entry(summary[den], summary[num]) if step_time else \
                ratio_entry(summary[num], summary[den])
            if entry:
                out[key] = {"numerator": num, "denominator": den, **entry}
    return out


def run_training(args: argparse.Namespace, workdir: Path, with_torch: bool,
                 torch_note: str | None) -> dict:
    workload = QUICK if args.quick else FULL
    dataset = training.make_dataset(workdir, workload)
    schedules = available_schedules()
    configs = [c for c in main_configs(schedules) if with_torch or c.command != "torch"]
    names = {c.name for c in configs}
    extras = [c for c in sweep_configs(args.quick, schedules) if c.name not in names]
    result = measure(args, workload, dataset, workdir, configs, extras)
    result["ratios"] = ratios_of(result["configs"], TRAINING_RATIOS)
    result["torch"] = {"included": with_torch, "note": torch_note}
    if "interleaved" not in schedules:
        result["interleaved_note"] = ("this checkout has no --schedule interleaved: its "
                                      "ratio is not measured")
    return result


def run_tiny(args: argparse.Namespace, workdir: Path) -> dict:
    """The fixed cost of a step: the tiny model's time per step against the reference's."""
    workload = TINY_QUICK if args.quick else TINY
    directory = workdir / "tiny"
    directory.mkdir()
    dataset = training.make_dataset(directory, workload)
    result = measure(args, workload, dataset, directory, tiny_configs(args.quick), [])
    result["ratios"] = ratios_of(result["configs"], TINY_RATIOS, step_time=True)
    return result


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
    found = recovery.measure(kills)
    if not found:
        return {"kills": kills, "error": "no restart events"}
    return {**recovery.summary(found),
            "how": "bench/recovery.py: SIGKILL a random worker of a 3-stage digits run with the "
                   "defaults (no --checkpoint-every) every 5-15 steps; recovery_s (failure "
                   "seen -> first step done after it) and steps_lost of each restart event"}


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
        for key, ratio in train["ratios"].items():
            values[key] = ratio["value"]
        bound = train["configs"].get("s2-1f1b-m4", {}).get("bound", {})
        values["s2_fraction_of_bound"] = bound.get("fraction_of_bound")
    tiny = results.get("tiny")
    if tiny:
        for key, ratio in tiny["ratios"].items():
            values[key] = ratio["value"]
    loader = results.get("loader")
    if loader and loader.get("main"):
        values["loader_stall_share"] = loader["main"]["mean_share"]
    recovery = results.get("recovery")
    if recovery and "median_s" in recovery:
        values["recovery_median_s"] = recovery["median_s"]
    out = []
    for key, what, target, lower_is_better in TARGETS:
        value = values.get(key)
        if value is None:
            met = None
        elif lower_is_better:
            met = value <= target
        else:
            met = value >= target
        op = "<=" if lower_is_better else ">="
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
    parser.add_argument("--repeats", type=int, help="repeats of every comparison (default 5; "
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
    # Before anything is measured: the machine's OpenBLAS overrides out of every process.
    fair.reexec_without_overrides(__spec__.name if __spec__ else "bench.run",
                                  sys.argv[1:] if argv is None else argv)
    args.repeats = args.repeats or (1 if args.quick else 5)
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
        "machine": machine_info(with_torch),
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
                elif section == "tiny":
                    results["tiny"] = run_tiny(args, workdir)
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
