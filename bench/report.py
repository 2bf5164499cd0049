"""The markdown tables of a results dict (``results.md``; BENCHMARKS.md quotes them)."""

from __future__ import annotations

LABELS = {
    "ref-1t": "reference, 1 BLAS thread (M=4)",
    "ref-2t": "reference, 2 BLAS threads (M=4)",
    "ref-1t-m1": "reference, 1 BLAS thread, whole batch (M=1)",
    "torch-single-1t": "torch, one process, 1 thread",
    "torch-single-2t": "torch, one process, 2 threads",
    "torch-1f1b": "torch pipelining Schedule1F1B, 2 ranks, M=4",
    "torch-gpipe": "torch pipelining ScheduleGPipe, 2 ranks, M=4",
    "torch-ddp": "torch DDP, 2 ranks x (batch/2)",
    "tiny-ref": "reference (one process)",
}


def label(name: str, config: dict) -> str:
    if name in LABELS:
        return LABELS[name]
    if config.get("layers"):
        width = config["layers"][1]
        if config.get("command") == "reference":
            return f"width {width}: reference, 1 BLAS thread (M=4)"
        return f"width {width}: train S={config.get('stages')} {config.get('schedule')}, M=4"
    if name.startswith("tiny-"):
        return (f"train S={config.get('stages', 1)}"
                + (f", R={config['replicas']}" if config.get("replicas", 1) > 1 else ""))
    if config.get("replicas", 1) > 1 or name.startswith("r"):
        return f"train S=1, R={config.get('replicas', 1)}, M={config.get('microbatches')}"
    return (f"train S={config.get('stages')} {config.get('schedule')}, "
            f"M={config.get('microbatches')}")


def _fmt(value, digits=2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def _mb(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _kernels(machine: dict) -> str:
    env = machine.get("blas_environment") or {}
    kernels = machine.get("kernels") or {}
    numpy_pools = [p for p in kernels.get("numpy", {}).get("threadpools", [])
                   if p.get("user_api") == "blas"]
    torch_info = kernels.get("torch") or {}
    text = (f"numpy runs {numpy_pools[0].get('internal_api')} {numpy_pools[0].get('version')} "
            f"with the {numpy_pools[0].get('architecture')} kernel" if numpy_pools
            else "numpy's BLAS unknown")
    if torch_info and "error" not in torch_info:
        text += (f"; torch {torch_info.get('torch')} its own (MKL "
                 f"{'yes' if torch_info.get('mkl') else 'no'}, CPU capability "
                 f"{torch_info.get('cpu_capability')})")
    had = env.get("machine_had") or {}
    if env.get("fair", True):
        text += ("; fair: the suite's processes ran without "
                 + (", ".join(f"{k}={v}" for k, v in had.items()) + " (set on this machine)"
                    if had else "OpenBLAS overrides (none were set)"))
    else:
        text += f"; NOT fair: the suite ran with {env.get('benchmark_processes_run_with')}"
    return text


def _bound(c: dict) -> str:
    bound = c.get("bound") or {}
    if "fraction_of_bound" not in bound:
        return ""
    return f"{bound['fraction_of_bound']:.0%} of {bound['ideal_step_s'] * 1e3:.1f} ms"


def tiny_lines(tiny: dict) -> list[str]:
    w = tiny["workload"]
    ref = tiny["configs"].get("tiny-ref", {}).get("median")
    lines = ["## The fixed cost of a step (tiny model)", "",
             f"MLP {'-'.join(map(str, w['layers']))}, float32, SGD, batch {w['batch']}, M=4, "
             f"{w['samples']} synthetic samples, {w['epochs']} epochs a run; time per step = the "
             f"median gap between step events. {tiny['repeats']} repeats.", "",
             "| configuration | ms per step (median) | min-max | x reference's time |",
             "| --- | ---: | --- | ---: |"]
    for name, c in tiny["configs"].items():
        if "median" not in c:
            lines.append(f"| {label(name, c['config'])} | failed | "
                         f"{'; '.join(c.get('errors', []))[:200]} | |")
            continue
        batch = w["batch"]
        lines.append(f"| {label(name, c['config'])} | {batch / c['median'] * 1e3:.2f} | "
                     f"{batch / c['max'] * 1e3:.2f}-{batch / c['min'] * 1e3:.2f} | "
                     f"{ref / c['median'] if ref else float('nan'):.2f} |")
    return [*lines, ""]


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = ["# pipetrain benchmark results", ""]
    machine = meta["machine"]
    lines += [
        f"- command: `{meta['command']}` ({'quick smoke run' if meta['quick'] else 'full run'}, "
        f"{meta['repeats']} repeats, {meta.get('duration_s', '?')} s)",
        f"- started {meta['started']}, finished {meta.get('finished')}",
        f"- machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
        f"{machine.get('memory_gib')} GiB; Python {machine.get('python')}, numpy "
        f"{machine.get('numpy')} ({(machine.get('blas') or {}).get('internal_api')} "
        f"{(machine.get('blas') or {}).get('version')}, "
        f"{(machine.get('blas') or {}).get('architecture')}), torch {machine.get('torch')}",
        f"- kernels: {_kernels(machine)}",
        f"- 1-minute load average: {meta['load_avg_start'][0]:.2f} at the start, "
        f"{meta.get('load_avg_end', [float('nan')])[0]:.2f} at the end"
        + (f" (waited {meta['load_wait']['waited_s']} s for < {meta['load_wait']['threshold']})"
           if meta.get("load_wait") else ""),
    ]
    gate = meta.get("quiet_gate")
    if gate and gate.get("budget_s"):
        lines.append(f"- quiet gate: before each run, waited while other processes kept more than "
                     f"{gate['max_busy']:.0%} of the CPUs busy: {gate['waits']} waits, "
                     f"{gate['waited_s']} s in all"
                     + (" (budget exhausted: later runs went ahead regardless)"
                        if gate.get("budget_exhausted") else ""))
    lines.append("")
    lines += ["## Targets", "", "| target | value | needed | met |", "| --- | ---: | --- | --- |"]
    for t in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        value = t["value"]
        shown = ("n/a" if value is None else f"{value * 100:.2f} %" if t["name"] ==
                 "loader_stall_share" else f"{value:.3f} s" if t["name"].endswith("_s")
                 else f"{value:.0%}" if "fraction" in t["name"] else f"{value:.2f}x")
        needed = "<= 2 %" if t["name"] == "loader_stall_share" else t["target"]
        lines.append(f"| {t['what']} | {shown} | {needed} | {met} |")
    lines.append("")

    train = results.get("training")
    if train:
        w = train["workload"]
        lines += ["## Training throughput", "",
                  f"MLP {'-'.join(map(str, w['layers']))}, float32, SGD, global batch "
                  f"{w['batch']}, {w['samples']} synthetic samples, {w['epochs']} epochs a run; "
                  f"samples/s = batch / median step time (first {w['skip_steps']} steps and the "
                  f"step after each epoch boundary left out). {train['repeats']} repeats "
                  f"(sweep-only points: {train['sweep_repeats']}), configurations alternating.",
                  ""]
        if train["torch"].get("note"):
            lines += [f"> {train['torch']['note']}", ""]
        ref = train["configs"].get("ref-1t", {}).get("median")
        lines += ["The ideal pipeline bound of a pipeline run replays its schedule with each "
                  "stage's measured median time of each kind of action (from its trace) and no "
                  "cost for anything else; 'of the bound' is that ideal step time over the "
                  "measured one.", "",
                  "| configuration | samples/s (median) | min-max | x reference 1 thread | "
                  "of the ideal pipeline bound | runs |",
                  "| --- | ---: | --- | ---: | --- | ---: |"]
        for name, c in train["configs"].items():
            if "median" not in c:
                err = "; ".join(c.get("errors", []))[:200] or "no result"
                lines.append(f"| {label(name, c['config'])} | failed | {err} | | | 0 |")
                continue
            rel = f"{c['median'] / ref:.2f}" if ref else "n/a"
            lines.append(f"| {label(name, c['config'])} | {c['median']:,.0f} | "
                         f"{c['min']:,.0f}-{c['max']:,.0f} | {rel} | {_bound(c)} | {c['ok']} |")
        lines += ["", "| ratio | median of medians | paired per repeat, min-max |",
                  "| --- | ---: | --- |"]
        for r in train["ratios"].values():
            paired = (f"{r['paired_min']:.2f}-{r['paired_max']:.2f}" if "paired_min" in r
                      else "n/a")
            lines.append(f"| {r['numerator']} / {r['denominator']} | {r['value']:.2f} | "
                         f"{paired} |")
        lines += ["", "Per-stage time split of a step (medians, ms): compute / waiting for "
                  "neighbours / waiting for data / all-reduce.", "",
                  "| configuration | step ms | per stage |", "| --- | ---: | --- |"]
        for name, c in train["configs"].items():
            split = c.get("stage_split")
            if not split or "median" not in c:
                continue
            step_ms = (c["config"].get("batch") or w["batch"]) / c["median"] * 1000
            parts = []
            for i, s in enumerate(split):
                parts.append(f"{i}: {s.get('compute_s', 0) * 1e3:.1f} / "
                             f"{s.get('wait_neighbours_s', 0) * 1e3:.1f} / "
                             f"{s.get('wait_data_s', 0) * 1e3:.1f} / "
                             f"{s.get('allreduce_s', 0) * 1e3:.1f}")
            lines.append(f"| {label(name, c['config'])} | {_fmt(step_ms, 1)} | "
                         f"{'; '.join(parts)} |")
        lines.append("")

    if results.get("tiny"):
        lines += tiny_lines(results["tiny"])
    transport = results.get("transport")
    if transport:
        lines += ["## Transport", "",
                  f"One pipe, a forked writer, {transport['bytes_per_repeat'] // 2**20} MiB a "
                  f"measurement, {transport['repeats']} repeats; GB/s of payload, median "
                  "(min-max); x ratio against the better of the two raw os.pipe copies of "
                  "the same run (the target's baseline).", "",
                  "| method | " + " | ".join(transport["sizes"]) + " |",
                  "| --- |" + " --- |" * len(transport["sizes"])]
        rows = {(r["method"], r["size"]): r for r in transport["results"]}
        for method in transport["methods"]:
            cells = []
            for size in transport["sizes"]:
                r = rows[method, size]
                cells.append(f"{r['median_gb_s']:.2f} ({r['min_gb_s']:.2f}-{r['max_gb_s']:.2f})"
                             f" x{r['ratio_vs_best_raw']:.2f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")

    loader = results.get("loader")
    if loader and loader.get("main"):
        m = loader["main"]
        lines += ["## Loader stall", "",
                  f"S=2 1F1B M=4: the data-reading stages waited for the loader "
                  f"{m['mean_share'] * 100:.2f} % of step time (mean; median "
                  f"{m['median_share'] * 100:.2f} %, p95 {m['p95_share'] * 100:.2f} %). Worst "
                  f"configuration: {loader['worst_config']} at "
                  f"{(loader['worst_mean_share'] or 0) * 100:.2f} %.", ""]
    recovery = results.get("recovery")
    if recovery and "median_s" in recovery:
        lines += ["## Recovery after a kill", "",
                  f"{recovery['kills']} kills: median {recovery['median_s']:.3f} s, "
                  f"min {recovery['min_s']:.3f} s, max {recovery['max_s']:.3f} s; steps lost: "
                  f"median {recovery.get('median_steps_lost', '?')}, max "
                  f"{recovery.get('max_steps_lost', '?')} ({recovery['how']}).", ""]
    startup = results.get("startup")
    if startup and "to_run_start_s" in startup:
        a, b = startup["to_run_start_s"], startup.get("to_first_step_s", {})
        lines += ["## Start-up, S = 4", "",
                  f"Launch to ready (run_start): median {a['median']:.2f} s "
                  f"({a['min']:.2f}-{a['max']:.2f}); launch to first step done: median "
                  f"{_fmt(b.get('median'))} s ({_fmt(b.get('min'))}-{_fmt(b.get('max'))}), "
                  f"{startup['repeats']} runs.", ""]
    memory = results.get("memory")
    if memory:
        lines += ["## Peak RSS per stage, GPipe against 1F1B (S = 2)", "",
                  "| schedule | batch | micro-batches | stage 0 MiB | stage 1 MiB |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in memory["rows"]:
            rss = r.get("peak_rss_bytes") or [None, None]
            rss = (rss + [None, None])[:2]
            lines.append(f"| {r['schedule']} | {r['batch']} | {r['microbatches']} | "
                         f"{_mb(rss[0])} | {_mb(rss[1])} |")
        lines += ["", f"({memory['how']}.)", ""]
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    for section, error in (results.get("errors") or {}).items():
        lines += [f"> section {section} failed: {error}", ""]
    for note in results.get("notes", []):
        lines += [f"> {note}", ""]
    return "\n".join(lines)
