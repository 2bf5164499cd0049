"""The transformer across real stage processes is bitwise equal to `pipetrain reference`: every
stage count 1..4, one and two replicas, every schedule (models in tests/training/model_runs.py)."""

from __future__ import annotations

import signal

import pytest

from pipetrain_harness.plan import Plan
from tests.helpers import (
    assert_bitwise_equal,
    cli_env,
    events,
    load_params,
    run_cli,
    run_state,
    start_cli,
    step_events,
    wait_for,
)
from tests.training.model_runs import DTYPE, GRID, assert_matches_reference


@pytest.mark.parametrize("stages,replicas,schedule", GRID)
def test_gpt_is_bitwise_equal_to_reference(tmp_path, configs, references, stages, replicas,
                                           schedule):
    assert_matches_reference("gpt", tmp_path / "train", configs, references, stages,
                             replicas, schedule)


def test_transformer_stopped_and_resumed_on_other_stages_is_bitwise(tmp_path, configs,
                                                                     references):
    """SIGTERM mid-run (checkpoint at the next step boundary, exit 0), then --resume with a
    different stage count: block parameters and their Adam moments are named by global layer,
    so any cut of the model loads them; the result is the uninterrupted run's, bitwise."""
    run_dir = tmp_path / "train"
    env = cli_env(Plan(step_delay_s=0.05))
    proc = start_cli("train", str(configs["gpt"]), "--run-dir", str(run_dir), "--stages", "3",
                     "--dtype", DTYPE[1], "--quiet", env=env)
    try:
        wait_for(lambda: len(step_events(run_dir)) >= 3, timeout_s=60, what="step 3")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and run_state(run_dir)["state"] == "stopped"
    stopped_at = step_events(run_dir)[-1]["step"]
    run_cli("train", "--run-dir", str(run_dir), "--resume", "--stages", "2", "--quiet",
            check=True)
    reference = references("gpt", 1)
    assert run_state(run_dir)["state"] == "done"
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    resumed = [e for e in events(run_dir) if e["event"] == "run_start"][-1]
    assert resumed["from_step"] == stopped_at
