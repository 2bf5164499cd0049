"""What the suite measures: the configurations, the ratios between them and the targets.

Every ratio is taken between two configurations of the same invocation (and, per repeat, of the
same round: configurations alternate A B C A B C ...). All of them run with fair kernels
(``bench/fair.py``: the machine's OpenBLAS overrides unset in every process of the suite).
"""

from __future__ import annotations

from .training import RunConfig

# name, what the ratio compares, target, lower is better
TARGETS: list[tuple[str, str, float, bool]] = [
    ("frames_vs_raw_1mib", "pipetrain frames / best raw os.pipe copy, 1 MiB messages", 0.95,
     False),
    ("frames_vs_raw_8mib", "pipetrain frames / best raw os.pipe copy, 8 MiB messages", 0.95,
     False),
    ("s2_vs_torch_1f1b", "train S=2 1F1B M=4 / torch Schedule1F1B (2 ranks, M=4)", 1.5, False),
    ("s2_fraction_of_bound", "train S=2 1F1B M=4: ideal pipeline bound / measured step time",
     0.85, False),
    ("zb_vs_1f1b_s2", "train S=2 zb / 1f1b (M=4)", 1.05, False),
    ("zb_vs_1f1b_s3", "train S=3 zb / 1f1b (M=4)", 1.05, False),
    ("interleaved_vs_1f1b_s2_m8", "train S=2 interleaved / 1f1b (M=8)", 1.05, False),
    ("r2_vs_torch_ddp", "train R=2 / torch DDP (2 ranks x 128)", 1.3, False),
    ("tiny_s1_step_vs_reference", "tiny model: train S=1 / reference, time per step", 1.25,
     True),
    ("tiny_s4_step_vs_reference", "tiny model: train S=4 / reference, time per step", 2.5, True),
    ("s2_vs_reference_1t", "train S=2 1F1B M=4 / reference (1 BLAS thread)", 1.15, False),
    ("loader_stall_share", "loader stall share of step time, S=2 1F1B (mean)", 0.02, True),
    ("recovery_median_s", "recovery after a kill, median seconds", 0.5, True),
]

# ratio -> (numerator, denominator): throughputs of the training section
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
    "interleaved_vs_1f1b_s2_m8": ("s2-interleaved-m8", "s2-1f1b-m8"),
    "reference_2t_vs_1t": ("ref-2t", "ref-1t"),
    "torch_single_vs_reference_1t": ("torch-single-1t", "ref-1t-m1"),
}
# ratio -> (numerator, denominator): time per step of the tiny model (lower is better)
TINY_RATIOS = {
    "tiny_s1_step_vs_reference": ("tiny-s1", "tiny-ref"),
    "tiny_s2_step_vs_reference": ("tiny-s2", "tiny-ref"),
    "tiny_s4_step_vs_reference": ("tiny-s4", "tiny-ref"),
    "tiny_s8_step_vs_reference": ("tiny-s8", "tiny-ref"),
    "tiny_r2_step_vs_reference": ("tiny-s1-r2", "tiny-ref"),
    "tiny_r4_step_vs_reference": ("tiny-s1-r4", "tiny-ref"),
}
# The interleaved schedule, where this checkout has it (``--schedule interleaved``).
INTERLEAVED = "interleaved"


def main_configs(schedules: tuple[str, ...]) -> list[RunConfig]:
    """The configurations the targets are judged on: every repeat runs all of them. The
    pipeline runs are traced for the ideal pipeline bound."""
    configs = [
        RunConfig("ref-1t", "reference", blas_threads=1),
        RunConfig("ref-2t", "reference", blas_threads=2),
        RunConfig("ref-1t-m1", "reference", microbatches=1, blas_threads=1),
        RunConfig("s2-1f1b-m4", stages=2, schedule="1f1b", trace=True),
        RunConfig("s2-gpipe-m4", stages=2, schedule="gpipe", trace=True),
        RunConfig("s2-zb-m4", stages=2, schedule="zb", trace=True),
        RunConfig("s3-1f1b-m4", stages=3, schedule="1f1b", trace=True),
        RunConfig("s3-zb-m4", stages=3, schedule="zb", trace=True),
        RunConfig("r2-m1", stages=1, replicas=2, microbatches=1, trace=True),
        RunConfig("torch-single-1t", "torch", torch_mode="single", microbatches=1),
        RunConfig("torch-single-2t", "torch", torch_mode="single", microbatches=1,
                  blas_threads=2),
        RunConfig("torch-1f1b", "torch", torch_mode="pipe-1f1b", stages=2),
        RunConfig("torch-gpipe", "torch", torch_mode="pipe-gpipe", stages=2),
        RunConfig("torch-ddp", "torch", torch_mode="ddp", replicas=2, microbatches=1),
    ]
    if INTERLEAVED in schedules:
        configs += [RunConfig("s2-1f1b-m8", stages=2, schedule="1f1b", microbatches=8,
                              trace=True),
                    RunConfig("s2-interleaved-m8", stages=2, schedule=INTERLEAVED,
                              microbatches=8, trace=True, extra=("--virtual-stages", "2"))]
    return configs


def sweep_configs(quick: bool, schedules: tuple[str, ...]) -> list[RunConfig]:
    """Points for the scaling plots (stages, micro-batches, replicas, model size); fewer
    repeats. None in a quick run: its plots show the main configurations only."""
    extra: list[RunConfig] = []
    if quick:
        return extra
    for s in (1, 2, 3, 4):  # the benchmark model has 4 dense layers: at most 4 stages
        for schedule in ("gpipe", "1f1b", "zb"):
            if s == 1 and schedule != "1f1b":
                continue  # one stage: every schedule is the same sequence
            extra.append(RunConfig(f"s{s}-{schedule}-m4", stages=s, schedule=schedule,
                                   trace=True))
    for m in (1, 2, 8, 16):
        for schedule in ("1f1b", "zb"):
            extra.append(RunConfig(f"s2-{schedule}-m{m}", stages=2, schedule=schedule,
                                   microbatches=m, trace=True))
    for r in (1, 3, 4):
        extra.append(RunConfig(f"r{r}-m1", stages=1, replicas=r, microbatches=1, trace=True))
    for width in (256, 512, 2048):  # model size: the same 4 layers, wider or narrower
        layers = (784, width, width, width, 10)
        epochs = 1 if width > 1024 else None
        extra += [RunConfig(f"w{width}-ref-1t", "reference", layers=layers, epochs=epochs),
                  RunConfig(f"w{width}-s2-1f1b-m4", stages=2, schedule="1f1b", layers=layers,
                            epochs=epochs, trace=True)]
    return extra


def tiny_configs(quick: bool) -> list[RunConfig]:
    """The fixed cost of a step: the tiny model from one process to 8 stages and 4 replicas
    (untraced: here a trace's own microseconds would be part of what is measured)."""
    configs = [RunConfig("tiny-ref", "reference"), RunConfig("tiny-s1", stages=1),
               RunConfig("tiny-s4", stages=4)]
    if not quick:
        configs += [RunConfig("tiny-s2", stages=2), RunConfig("tiny-s8", stages=8),
                    RunConfig("tiny-s1-r2", stages=1, replicas=2),
                    RunConfig("tiny-s1-r4", stages=1, replicas=4)]
    return configs
