"""The benchmark suite runs end to end: ``python -m bench.run --quick`` (tiny sizes, no torch,
one repeat) writes results.json with every section, the targets and the plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env

SECTIONS = ("transport", "training", "tiny", "loader", "recovery", "startup", "memory")
OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


@pytest.mark.timeout(120)
def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--no-torch", "--out", str(out)],
        capture_output=True, text=True, timeout=110, cwd=REPO, env=cli_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for key in ("meta", *SECTIONS, "targets", "plots"):
        assert key in results, f"results.json lacks {key!r}"
    meta = results["meta"]
    assert meta["quick"] is True
    assert len(meta["load_avg_start"]) == 3 and len(meta["load_avg_end"]) == 3

    transport = {(r["method"], r["size"]): r for r in results["transport"]["results"]}
    for size in ("64 KiB", "1 MiB", "8 MiB"):
        for method in ("raw os.pipe", "pipetrain frames", "mp.Connection bytes"):
            assert transport[method, size]["median_gb_s"] > 0

    configs = results["training"]["configs"]
    for name in ("ref-1t", "ref-2t", "s2-1f1b-m4", "s2-zb-m4", "s3-1f1b-m4", "s3-zb-m4",
                 "r2-m1"):
        assert configs[name]["ok"] == 1, configs[name]
        assert configs[name]["median"] > 0
    assert "torch-1f1b" not in configs
    assert "skipped" in results["training"]["torch"]["note"]
    ratios = results["training"]["ratios"]
    assert {"s2_vs_reference_1t", "zb_vs_1f1b_s2", "zb_vs_1f1b_s3"} <= set(ratios)

    assert 0 <= results["loader"]["main"]["mean_share"] < 1
    assert results["recovery"]["kills"] >= 1 and results["recovery"]["median_s"] > 0
    assert results["startup"]["to_run_start_s"]["median"] > 0
    rows = results["memory"]["rows"]
    assert {r["schedule"] for r in rows} == {"gpipe", "1f1b"}
    assert all(len(r["peak_rss_bytes"]) == 2 and all(r["peak_rss_bytes"]) for r in rows)

    # The pipeline runs were traced: each has its ideal pipeline bound, and it is a bound.
    for name in ("s2-1f1b-m4", "s3-zb-m4"):
        bound = configs[name]["bound"]
        assert bound["ideal_step_s"] > 0 and 0 < bound["fraction_of_bound"] <= 1.0, bound
        assert 0 <= bound["ideal_bubble"] < 1 and bound["per_stage_compute_s"][0] > 0
    tiny = results["tiny"]
    for name in ("tiny-ref", "tiny-s1", "tiny-s4"):
        assert tiny["configs"][name]["ok"] == 1, tiny["configs"][name]
    assert {"tiny_s1_step_vs_reference", "tiny_s4_step_vs_reference"} <= set(tiny["ratios"])

    # Fair kernels: whatever this machine sets for OpenBLAS, the suite's processes ran
    # without it (and say which kernel they got); the test itself changes nothing.
    had = {var: os.environ[var] for var in OVERRIDES if var in os.environ}
    blas = meta["machine"]["blas_environment"]
    assert blas["machine_had"] == had and blas["benchmark_processes_run_with"] == {}
    assert blas["fair"] is True
    assert meta["machine"]["kernels"]["numpy_kernel"]
    assert meta["machine"]["blas"]["architecture"] == meta["machine"]["kernels"]["numpy_kernel"]

    names = {t["name"] for t in results["targets"]}
    assert {"frames_vs_raw_1mib", "frames_vs_raw_8mib", "s2_vs_reference_1t",
            "s2_vs_torch_1f1b", "s2_fraction_of_bound", "r2_vs_torch_ddp", "zb_vs_1f1b_s2",
            "zb_vs_1f1b_s3", "interleaved_vs_1f1b_s2_m8", "tiny_s1_step_vs_reference",
            "tiny_s4_step_vs_reference", "loader_stall_share", "recovery_median_s"} == names
    for plot in results["plots"]:
        assert (out / plot).stat().st_size > 0
    markdown = (out / "results.md").read_text()
    assert "## Targets" in markdown and "## Transport" in markdown
