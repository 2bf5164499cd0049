"""Interleaved 1F1B under `mpirun --transport mpi`: the ring's link from the last stage round to
the first has its own tag (with two stages it joins the same two ranks as the other pipeline
link), and the run is bitwise the reference and the pipe transport's."""

from __future__ import annotations

import pytest

from tests.helpers import assert_bitwise_equal, assert_same_steps, load_params, run_cli, run_state
from tests.mpi.mpirun import assert_no_survivors, mpi_env, run_mpi

MATH = ("--epochs", "1", "--batch-size", "48", "--layers", "64,24,20,18,16,14,12,10",
        "--microbatches", "4", "--quiet")


@pytest.mark.parametrize(("ranks", "stages", "replicas"), [(3, 2, 1), (5, 2, 2)])
def test_interleaved_over_mpi_is_bitwise_the_reference_and_pipes(tmp_path, shm_dir,
                                                                 reference_runs, ranks,
                                                                 stages, replicas):
    options = ("--stages", str(stages), "--replicas", str(replicas), "--schedule",
               "interleaved", "--virtual-stages", "2", *MATH)
    mpi_dir, pipe_dir = tmp_path / "mpi", tmp_path / "pipe"
    run_mpi(ranks, "train", "--transport", "mpi", "--run-dir", str(mpi_dir), *options,
            env=mpi_env(shm_dir), check=True)
    run_cli("train", "--run-dir", str(pipe_dir), *options, check=True)
    reference = reference_runs("--replicas", str(replicas), *MATH)
    for other in (reference, pipe_dir):
        assert_bitwise_equal(load_params(mpi_dir), load_params(other))
        assert_same_steps(mpi_dir, other)
    assert run_state(mpi_dir)["state"] == "done"
    assert_no_survivors(mpi_dir)
