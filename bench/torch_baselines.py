"""The torch baselines, on the identical model and batch: one process, pipelining, DDP.

    python -m bench.torch_baselines --mode pipe-1f1b   # 2 ranks over gloo, Schedule1F1B
    python -m bench.torch_baselines --mode pipe-gpipe  # 2 ranks, ScheduleGPipe
    python -m bench.torch_baselines --mode ddp         # 2 ranks x (batch / 2), DDP
    python -m bench.torch_baselines --mode single --threads 2

The model is pipetrain's: dense layers ``y = x @ W + b`` with ReLU between them and softmax
cross-entropy at the end, float32, SGD; synthetic data (random inputs, labels 0..9). Every
process runs ``torch.set_num_threads(threads)`` (and OMP_NUM_THREADS is set before torch loads).
The pipeline is cut where pipetrain cuts it (balanced by parameter count,
``pipetrain.pipeline.partition``).
Two-rank modes start one subprocess per rank with MASTER_ADDR=127.0.0.1 and a free MASTER_PORT.

Prints one JSON line: the per-step wall times seen by rank 0 (after ``--warmup`` steps) and the
samples/s of their median.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("single", "pipe-1f1b", "pipe-gpipe", "ddp")
DISTRIBUTED = ("pipe-1f1b", "pipe-gpipe", "ddp")


def available() -> str | None:
    """None if torch (with torch.distributed and gloo) can be used, else why not."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return ("torch is not installed (it comes with the optional extra: "
                "pip install '.[bench]', i.e. torch==2.13.0, the CPU build)")
    if not dist.is_available() or not dist.is_gloo_available():
        return f"torch {torch.__version__} has no torch.distributed gloo backend"
    try:
        import torch.distributed.pipelining  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no torch.distributed.pipelining ({exc})"
    return None


def torch_version() -> str | None:
    """The installed torch's version, without importing it (that takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def split_point(layers: list[int], stages: int) -> list[tuple[int, int]]:
    sys.path.insert(0, str(REPO))
    from pipetrain.pipeline.partition import layer_costs, partition

    return partition(layer_costs(layers), stages)


def build_model(layers: list[int], first: int, stop: int, seed: int):
    """Layers ``first..stop-1`` of the MLP, ReLU after every layer but the network's last."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    full = [nn.Linear(a, b) for a, b in zip(layers, layers[1:], strict=False)]
    modules = []
    for i in range(first, stop):
        modules.append(full[i])
        if i < len(full) - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def synthetic_batch(layers: list[int], batch: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, layers[0]), generator=generator, dtype=torch.float32)
    y = torch.randint(0, min(10, layers[-1]), (batch,), generator=generator)
    return x, y


def run_rank(args: argparse.Namespace) -> dict | None:
    """One process's share of the benchmark; rank 0 returns the result."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.set_num_threads(args.threads)
    layers = [int(v) for v in args.layers.split(",")]
    x, y = synthetic_batch(layers, args.batch, args.seed)
    rank, world = args.rank, (1 if args.mode == "single" else 2)
    dist = None
    if args.mode in DISTRIBUTED:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if args.mode == "single":
            model = build_model(layers, 0, len(layers) - 1, args.seed)
            optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

            def step() -> None:
                optimizer.zero_grad(set_to_none=False)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
        elif args.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(build_model(layers, 0, len(layers) - 1, args.seed))
            optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
            share = args.batch // world
            xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]

            def step() -> None:
                optimizer.zero_grad(set_to_none=False)
                F.cross_entropy(model(xs), ys).backward()
                optimizer.step()
        else:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            first, stop = split_point(layers, world)[rank]
            module = build_model(layers, first, stop, args.seed)
            stage = PipelineStage(module, rank, world, torch.device("cpu"))
            schedule_class = Schedule1F1B if args.mode == "pipe-1f1b" else ScheduleGPipe
            schedule = schedule_class(stage, n_microbatches=args.microbatches,
                                      loss_fn=F.cross_entropy)
            optimizer = torch.optim.SGD(module.parameters(), lr=args.lr)
            last = rank == world - 1

            def step() -> None:
                optimizer.zero_grad(set_to_none=False)
                if rank == 0:
                    schedule.step(x)
                elif last:
                    schedule.step(target=y, losses=[])
                else:
                    schedule.step()
                optimizer.step()

        times = []
        for i in range(args.warmup + args.steps):
            started = time.perf_counter()
            step()
            if i >= args.warmup:
                times.append(time.perf_counter() - started)
        if dist is not None:
            dist.barrier()
    finally:
        if dist is not None:
            dist.destroy_process_group()
    if rank != 0:
        return None
    median = statistics.median(times)
    return {"mode": args.mode, "threads": args.threads, "batch": args.batch,
            "microbatches": args.microbatches, "step_times_s": times,
            "median_step_s": median, "samples_per_s": args.batch / median,
            "torch": torch.__version__}


def launch(args: argparse.Namespace, timeout_s: float = 600) -> dict:
    """Run ``args.mode`` (its ranks as subprocesses) and return rank 0's result."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    world = 1 if args.mode == "single" else 2
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    module = f"{__package__ or 'bench'}.torch_baselines"  # bench, or pipetrain_harness.bench
    base = [sys.executable, "-m", module, "--worker", "--mode", args.mode,
            "--threads", str(args.threads), "--layers", args.layers, "--batch", str(args.batch),
            "--microbatches", str(args.microbatches), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--seed", str(args.seed), "--lr", str(args.lr)]
    procs = [subprocess.Popen([*base, "--rank", str(rank)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(rank)))
             for rank in range(world)]
    outputs = []
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (code, _, err) in enumerate(outputs):
        if code != 0:
            raise RuntimeError(f"torch {args.mode} rank {rank} exited {code}: {err[-2000:]}")
    return json.loads(outputs[0][1].strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=MODES, default="pipe-1f1b")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", default="784,1024,1024,1024,10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        result = run_rank(args)
        if result is not None:
            print(json.dumps(result))
        return 0
    why = available()
    if why:
        print(json.dumps({"skipped": why}))
        return 0
    result = launch(args)
    result.pop("step_times_s", None)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
