"""Fair kernels: the benchmark's own processes run without the machine's OpenBLAS overrides.

Some machines here set ``OPENBLAS_CORETYPE`` (and ``OPENBLAS_L2_SIZE``) because older OpenBLAS
builds compute wrong results or crash on their processors. A current numpy's OpenBLAS does not
need them, and with them it runs an older, slower kernel (Haswell instead of SkylakeX: a 64 x
1024 @ 1024 x 1024 float32 product at about 104 against 145 GFLOP/s), while torch's own kernels
ignore both. A user's machine has neither, so the suite compares kernels as users get them:
:func:`reexec_without_overrides` starts the suite again, before anything is measured, with both
variables removed, so every process it starts (pipetrain, the reference, torch, the transport
and all-reduce children) inherits the clean environment. Tests and CI never do this: they keep
the machine's environment, which the build needs there.

What the machine had, and which kernel each side then runs (threadpoolctl), go into
``results.json``, so every ratio says which kernels it compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# What the machine had set, handed from the first process to the re-executed one.
MACHINE_VAR = "PIPETRAIN_BENCH_MACHINE_BLAS_ENV"
REFUSE_VAR = "PIPETRAIN_BENCH_KEEP_BLAS_ENV"  # =1: measure with the overrides (to compare)


def reexec_without_overrides(module: str, argv: list[str]) -> None:
    """If either override is set, replace this process by ``python -m module argv`` without
    them (it does not return then). Call it before measuring anything."""
    present = {var: os.environ[var] for var in OVERRIDES if var in os.environ}
    if not present or os.environ.get(REFUSE_VAR) == "1":
        return
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    env[MACHINE_VAR] = json.dumps(present)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def blas_environment() -> dict:
    """What the machine set, what this suite's processes run with."""
    machine = json.loads(os.environ.get(MACHINE_VAR, "{}"))
    current = {var: os.environ[var] for var in OVERRIDES if var in os.environ}
    for var in OVERRIDES:  # not re-executed (nothing to unset): the machine had what we have
        if var in current:
            machine.setdefault(var, current[var])
    return {"machine_had": machine, "benchmark_processes_run_with": current,
            "fair": not current,
            "how": "bench/fair.py: the suite re-executes itself without OPENBLAS_CORETYPE and "
                   "OPENBLAS_L2_SIZE, so every process it starts runs OpenBLAS's own choice "
                   "of kernel, as on a user's machine"}


_PROBE = """
import json, sys
side = sys.argv[1]
if side == "torch":
    import torch
    torch.set_num_threads(1)
    x = torch.ones(8, 8) @ torch.ones(8, 8)  # load the kernels
    extra = {"torch": torch.__version__, "mkl": torch.backends.mkl.is_available(),
             "mkldnn": torch.backends.mkldnn.is_available(),
             "cpu_capability": torch.backends.cpu.get_cpu_capability()}
else:
    import numpy
    extra = {"numpy": numpy.__version__}
from threadpoolctl import threadpool_info
pools = [{k: p.get(k) for k in ("user_api", "internal_api", "version", "architecture",
                                "threading_layer", "num_threads")} for p in threadpool_info()]
print(json.dumps({**extra, "threadpools": pools}))
"""


def kernels(with_torch: bool) -> dict:
    """The BLAS each side runs, asked of a fresh process with this suite's environment (the
    numpy side: pipetrain and its reference; the torch side: the baselines)."""
    out = {}
    for side in ("numpy", *(("torch",) if with_torch else ())):
        try:
            proc = subprocess.run([sys.executable, "-c", _PROBE, side], capture_output=True,
                                  text=True, timeout=120, check=True)
            out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
            out[side] = {"error": str(exc)[-300:]}
    numpy_blas = [p for p in out.get("numpy", {}).get("threadpools", [])
                  if p.get("user_api") == "blas"]
    out["numpy_kernel"] = numpy_blas[0].get("architecture") if numpy_blas else None
    return out


def kernel_label(kernels_info: dict | None) -> str:
    """'OpenBLAS 0.3.31 SkylakeX' for the report."""
    if not kernels_info:
        return "unknown"
    pools = [p for p in kernels_info.get("numpy", {}).get("threadpools", [])
             if p.get("user_api") == "blas"]
    if not pools:
        return "unknown"
    return f"{pools[0].get('internal_api')} {pools[0].get('version')} " \
           f"{pools[0].get('architecture')}"
