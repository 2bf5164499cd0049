"""PNG plots of a results dict: throughput against stages, micro-batches and replicas, and the
transport comparison (matplotlib, Agg backend; skipped with a note if matplotlib is missing)."""

from __future__ import annotations

from pathlib import Path

SCHEDULES = (("gpipe", "GPipe", "o"), ("1f1b", "1F1B", "s"), ("zb", "zero-bubble", "^"))


def _point(configs: dict, name: str):
    c = configs.get(name)
    if not c or "median" not in c:
        return None
    return c["median"], c["median"] - c["min"], c["max"] - c["median"]


def _series(configs: dict, xs, name_of):
    xs_ok, ys, lo, hi = [], [], [], []
    for x in xs:
        p = _point(configs, name_of(x))
        if p:
            xs_ok.append(x)
            ys.append(p[0])
            lo.append(p[1])
            hi.append(p[2])
    return xs_ok, ys, [lo, hi]


def _baselines(ax, configs: dict, names: list[tuple[str, str, str]]) -> None:
    for name, label, style in names:
        p = _point(configs, name)
        if p:
            ax.axhline(p[0], linestyle=style, color="grey", linewidth=1,
                       label=f"{label}: {p[0]:,.0f}")


def write_all(results: dict, directory: Path) -> list[str]:
    train = results.get("training")
    transport = results.get("transport")
    if not train and not transport and not results.get("tiny"):
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results.setdefault("notes", []).append("plots skipped: matplotlib is not installed")
        return []
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = directory / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(f"{directory.name}/{name}")

    if train:
        configs = train["configs"]
        batch = train["workload"]["batch"]
        layers = "-".join(map(str, train["workload"]["layers"]))
        subtitle = f"MLP {layers}, float32, batch {batch}; median, bars min-max"

        fig, ax = plt.subplots(figsize=(7, 4.5))
        stages = sorted({c["config"].get("stages", 1) for n, c in configs.items()
                         if n.startswith("s") and n.endswith("-m4")})
        for schedule, label, marker in SCHEDULES:
            xs, ys, err = _series(configs, stages, lambda s, sch=schedule: (
                "s1-1f1b-m4" if s == 1 else f"s{s}-{sch}-m4"))
            if xs:
                ax.errorbar(xs, ys, yerr=err, marker=marker, capsize=3, label=f"pipetrain {label}")
        p = _point(configs, "torch-1f1b")
        if p:
            ax.errorbar([2], [p[0]], yerr=[[p[1]], [p[2]]], marker="x", color="black",
                        capsize=3, linestyle="none", label="torch Schedule1F1B")
        p = _point(configs, "torch-gpipe")
        if p:
            ax.errorbar([2], [p[0]], yerr=[[p[1]], [p[2]]], marker="+", color="brown",
                        capsize=3, linestyle="none", label="torch ScheduleGPipe")
        _baselines(ax, configs, [("ref-1t", "reference, 1 thread", "--"),
                                 ("ref-2t", "reference, 2 threads", ":")])
        ax.set_xticks(stages)
        ax.set_xlabel("pipeline stages S (4 micro-batches)")
        ax.set_ylabel("samples/s")
        ax.set_title(f"Throughput against stages\n{subtitle}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_ylim(bottom=0)
        save(fig, "throughput-stages.png")

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ms = sorted({c["config"].get("microbatches", 4) for n, c in configs.items()
                     if n.startswith("s2-")})
        for schedule, label, marker in SCHEDULES:
            xs, ys, err = _series(configs, ms, lambda m, sch=schedule: f"s2-{sch}-m{m}")
            if xs:
                ax.errorbar(xs, ys, yerr=err, marker=marker, capsize=3, label=f"pipetrain {label}")
        for name, label, marker, color in (("torch-1f1b", "torch Schedule1F1B", "x", "black"),
                                           ("torch-gpipe", "torch ScheduleGPipe", "+", "brown")):
            p = _point(configs, name)
            if p:
                ax.errorbar([4], [p[0]], yerr=[[p[1]], [p[2]]], marker=marker, capsize=3,
                            linestyle="none", color=color, label=label)
        _baselines(ax, configs, [("ref-1t", "reference M=4, 1 thread", "--")])
        if ms:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ms)
            ax.set_xticklabels([str(m) for m in ms])
        ax.set_xlabel("micro-batches M (S = 2)")
        ax.set_ylabel("samples/s")
        ax.set_title(f"Throughput against micro-batches\n{subtitle}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_ylim(bottom=0)
        save(fig, "throughput-microbatches.png")

        fig, ax = plt.subplots(figsize=(7, 4.5))
        rs = sorted({c["config"].get("replicas", 1) for n, c in configs.items()
                     if n.startswith("r")})
        xs, ys, err = _series(configs, rs, lambda r: f"r{r}-m1")
        if xs:
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3,
                        label="pipetrain S=1, R replicas (chain all-reduce)")
        p = _point(configs, "torch-ddp")
        if p:
            ax.errorbar([2], [p[0]], yerr=[[p[1]], [p[2]]], marker="x", color="black",
                        capsize=3, linestyle="none", label="torch DDP (gloo)")
        _baselines(ax, configs, [("ref-1t-m1", "reference whole batch, 1 thread", "--"),
                                 ("torch-single-1t", "torch one process, 1 thread", ":")])
        if rs:
            ax.set_xticks(rs)
        ax.set_xlabel("data-parallel replicas R (global batch split R ways)")
        ax.set_ylabel("samples/s")
        ax.set_title(f"Throughput against replicas\n{subtitle}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_ylim(bottom=0)
        save(fig, "throughput-replicas.png")

    tiny = results.get("tiny")
    if tiny and tiny["configs"].get("tiny-ref", {}).get("median"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        tconf = tiny["configs"]
        batch = tiny["workload"]["batch"]

        def ms(name: str):
            c = tconf.get(name) or {}
            return batch / c["median"] * 1e3 if c.get("median") else None

        for label, points, marker in (
                ("S stages (R = 1)", [(s, ms(f"tiny-s{s}")) for s in (1, 2, 4, 8)], "o"),
                ("R replicas (S = 1)", [(1, ms("tiny-s1"))] + [(r, ms(f"tiny-s1-r{r}"))
                                                               for r in (2, 4)], "s")):
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker=marker,
                        label=f"pipetrain train, {label}")
        ax.axhline(ms("tiny-ref"), color="grey", linestyle="--",
                   label=f"reference: {ms('tiny-ref'):.2f} ms")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8])
        ax.set_xticklabels(["1", "2", "4", "8"])
        ax.set_xlabel("processes: stages S, or replicas R")
        ax.set_ylabel("ms per step")
        ax.set_title("The fixed cost of a step: tiny model (8 dense layers of 32, batch 64, "
                     "M = 4)\nmedian over the repeats", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.set_ylim(bottom=0)
        save(fig, "fixed-cost.png")

    if train and any(name.startswith("w") for name in train["configs"]):
        configs = train["configs"]
        widths = [256, 512, 1024, 2048]
        names = {w: ("ref-1t", "s2-1f1b-m4") if w == 1024 else (f"w{w}-ref-1t",
                                                                  f"w{w}-s2-1f1b-m4")
                 for w in widths}
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
        for index, label in ((0, "reference, 1 BLAS thread"), (1, "train S=2 1F1B, M=4")):
            xs = [w for w in widths if "median" in configs.get(names[w][index], {})]
            ax.plot(xs, [configs[names[w][index]]["median"] for w in xs], marker="o",
                    label=label)
        xs = [w for w in widths if "median" in configs.get(names[w][0], {})
              and "median" in configs.get(names[w][1], {})]
        ax2.plot(xs, [configs[names[w][1]]["median"] / configs[names[w][0]]["median"]
                      for w in xs], marker="o", label="S=2 / reference")
        xb = [w for w in widths if "fraction_of_bound" in
              (configs.get(names[w][1], {}).get("bound") or {})]
        ax2.plot(xb, [configs[names[w][1]]["bound"]["fraction_of_bound"] for w in xb],
                 marker="s", label="S=2: fraction of the ideal pipeline bound")
        for axis in (ax, ax2):
            axis.set_xscale("log", base=2)
            axis.set_xticks(widths)
            axis.set_xticklabels([str(w) for w in widths])
            axis.set_xlabel("hidden width (784-w-w-w-10)")
            axis.legend(fontsize=8)
            axis.set_ylim(bottom=0)
        ax.set_ylabel("samples/s")
        ax2.set_ylabel("ratio")
        ax.set_title("Throughput against model size", fontsize=10)
        ax2.set_title("Where the fixed cost stops mattering", fontsize=10)
        save(fig, "model-size.png")

    written += [f"{directory.name}/{path.name}"
                for path in sorted(directory.glob("timeline-*.png"))]
    if transport:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        sizes, methods = transport["sizes"], transport["methods"]
        width = 0.8 / len(methods)
        rows = {(r["method"], r["size"]): r for r in transport["results"]}
        for i, method in enumerate(methods):
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(sizes))]
            med = [rows[method, s]["median_gb_s"] for s in sizes]
            err = [[rows[method, s]["median_gb_s"] - rows[method, s]["min_gb_s"] for s in sizes],
                   [rows[method, s]["max_gb_s"] - rows[method, s]["median_gb_s"] for s in sizes]]
            ax.bar(xs, med, width, yerr=err, capsize=2, label=method)
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([f"{s} messages" for s in sizes])
        ax.set_ylabel("GB/s (payload)")
        ax.set_title("One pipe between two processes; median, bars min-max", fontsize=10)
        ax.legend(fontsize=7)
        save(fig, "transport.png")
    return written
