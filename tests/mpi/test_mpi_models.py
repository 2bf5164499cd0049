"""The conv net and the transformer under `mpirun --transport mpi`: bitwise equal to
`pipetrain reference` (models of issue 18; the frames carry (N, C, H, W) and (N, T, d)
activations, the replicas' chain all-reduce a block's twelve parameters)."""

from __future__ import annotations

import pytest

from tests.helpers import assert_bitwise_equal, assert_same_steps, load_params, run_cli
from tests.mpi.mpirun import assert_no_survivors, mpi_env, run_mpi
from tests.training.model_runs import MODELS


@pytest.mark.parametrize("model,ranks,stages,replicas", [("conv", 4, 3, 1), ("gpt", 5, 2, 2)])
def test_models_under_mpi_are_bitwise_equal_to_reference(tmp_path, shm_dir, model, ranks,
                                                         stages, replicas):
    config = tmp_path / f"{model}.toml"
    config.write_text(MODELS[model])
    mpi_dir, reference = tmp_path / "mpi", tmp_path / "reference"
    options = ("--replicas", str(replicas), "--quiet")
    run_mpi(ranks, "train", str(config), "--transport", "mpi", "--stages", str(stages),
            "--schedule", "zb", "--run-dir", str(mpi_dir), *options, env=mpi_env(shm_dir),
            check=True)
    run_cli("reference", str(config), "--run-dir", str(reference), *options, check=True)
    assert_same_steps(mpi_dir, reference)
    assert_bitwise_equal(load_params(mpi_dir), load_params(reference))
    assert_no_survivors(mpi_dir)
