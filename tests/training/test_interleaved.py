"""Interleaved 1F1B over real processes and pipes: bitwise the reference (every step's
grad_digest and the final parameters) for S = 2, 3, 4, M = S and 2S, R = 1 and 2; the same
under signals, a stop and resume (also under another schedule), and a killed worker replaced in
place; impossible combinations refused in one line."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pipetrain_harness.plan import Plan
from tests.helpers import (
    assert_bitwise_equal,
    assert_no_survivors,
    assert_same_steps,
    cli_env,
    events,
    finish,
    last_step,
    load_params,
    read_events,
    run_cli,
    run_state,
    start_cli,
    wait_for,
)

LAYERS = "64,24,20,18,16,14,12,10"  # 7 dense layers: S * V up to 6 (S = 3, V = 2)
SMALL = ["--epochs", "1", "--batch-size", "48", "--layers", LAYERS, "--quiet"]
SLOW = cli_env(Plan(step_delay_s=0.01))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    made: dict[tuple[str, ...], Path] = {}

    def reference(*options: str) -> Path:
        if options not in made:
            run_dir = tmp_path_factory.mktemp("ref")
            run_cli("reference", "--run-dir", str(run_dir), *options, check=True)
            made[options] = run_dir
        return made[options]

    return reference


def interleaved(stages: int, virtual: int = 2) -> list[str]:
    return ["--stages", str(stages), "--schedule", "interleaved", "--virtual-stages",
            str(virtual)]


# (stages, micro-batches, replicas, pieces per stage): each S with M = S and 2S, R = 1 and 2
CASES = [(2, 2, 1, 2), (2, 4, 2, 2), (3, 3, 2, 2), (3, 6, 1, 2), (2, 4, 1, 3)]


@pytest.mark.parametrize(("stages", "microbatches", "replicas", "virtual"), CASES)
def test_interleaved_is_bitwise_the_reference(tmp_path, references, stages, microbatches,
                                              replicas, virtual):
    math = ("--microbatches", str(microbatches), "--replicas", str(replicas), *SMALL)
    run_dir = tmp_path / "train"
    run_cli("train", "--run-dir", str(run_dir), *interleaved(stages, virtual), *math,
            check=True)
    reference = references(*math)
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert_same_steps(run_dir, reference)
    assert run_state(run_dir)["state"] == "done"
    assert_no_survivors(run_dir)


def test_four_stages_of_two_pieces_each(tmp_path, references):
    math = ("--microbatches", "8", "--layers", "64,20,20,20,20,20,20,20,10", "--epochs", "1",
            "--batch-size", "48", "--quiet")
    run_dir = tmp_path / "train"
    run_cli("train", "--run-dir", str(run_dir), *interleaved(4), *math, check=True)
    assert_same_steps(run_dir, references(*math))
    assert_bitwise_equal(load_params(run_dir), load_params(references(*math)))


@pytest.mark.parametrize(("options", "message"), [
    (["--schedule", "1f1b", "--virtual-stages", "2"], "only with --schedule interleaved"),
    (["--schedule", "interleaved", "--stages", "1"], "at least 2 stages"),
    (["--schedule", "interleaved", "--virtual-stages", "1"], "must be >= 2"),
    (["--schedule", "interleaved", "--stages", "2", "--virtual-stages", "4"],
     "2 stages x 4 pieces need 8 layers, the model has 7"),
    (["--schedule", "interleaved", "--stages", "2", "--microbatches", "3"],
     "multiple of the stages"),
])
@pytest.mark.parametrize("command", ["train", "reference"])
def test_impossible_combinations_are_refused_in_one_line(tmp_path, options, message, command):
    if command == "reference" and "--stages" not in options:
        options = [*options, "--stages", "2"]
    result = run_cli(command, "--run-dir", str(tmp_path / "run"), "--layers", LAYERS,
                     *options)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()



def event_seen(run_dir: Path, name: str) -> bool:
    return any(e["event"] == name for e in read_events(run_dir))



MATH = ("--microbatches", "4", "--layers", LAYERS, "--epochs", "3", "--batch-size", "48",
        "--quiet")


def test_signals_then_resume_under_another_schedule_stay_bitwise(tmp_path, references):
    """SIGUSR1 checkpoints, SIGTSTP/SIGCONT pause and resume, SIGTERM stops with a checkpoint
    of the interleaved run; it resumes as 1F1B on three stages and ends on the reference."""
    run_dir = tmp_path / "run"
    proc = start_cli("train", "--run-dir", str(run_dir), *interleaved(2), *MATH, env=SLOW)
    try:
        wait_for(lambda: last_step(run_dir) >= 5, timeout_s=120, what="step 5")
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for(lambda: event_seen(run_dir, "checkpoint"), timeout_s=60, what="checkpoint")
        os.kill(proc.pid, signal.SIGTSTP)
        wait_for(lambda: event_seen(run_dir, "paused"), timeout_s=60, what="paused")
        os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: event_seen(run_dir, "resumed"), timeout_s=60, what="resumed")
        os.kill(proc.pid, signal.SIGTERM)
    finally:
        status = finish(proc)
    assert status == 0
    assert run_state(run_dir)["state"] == "stopped"
    stopped_at = last_step(run_dir)
    # segment files are per stage process; each holds its pieces' parameters by global name
    saved = [e for e in events(run_dir) if e["event"] == "checkpoint"][-1]
    assert sorted(p.name for p in (run_dir / saved["path"]).glob("segment-*.npz")) == [
        "segment-0.npz", "segment-1.npz"]
    with_layer_2 = load_params(run_dir / saved["path"], "segment-0.npz")
    assert "param.layers.0.weight" in with_layer_2 and "param.layers.2.weight" in with_layer_2
    run_cli("train", "--run-dir", str(run_dir), "--resume", "--quiet", "--stages", "3",
            "--schedule", "1f1b", check=True)
    assert [e["from_step"] for e in events(run_dir) if e["event"] == "run_start"] == [
        0, stopped_at]
    reference = references(*MATH)
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    steps = {e["step"]: e["grad_digest"] for e in events(run_dir) if e["event"] == "step"}
    assert steps == {e["step"]: e["grad_digest"] for e in events(reference)
                     if e["event"] == "step"}
    assert_no_survivors(run_dir)


def test_a_1f1b_checkpoint_resumes_interleaved(tmp_path, references):
    run_dir = tmp_path / "run"
    proc = start_cli("train", "--run-dir", str(run_dir), "--stages", "2", *MATH, env=SLOW)
    try:
        wait_for(lambda: last_step(run_dir) >= 8, timeout_s=120, what="step 8")
        os.kill(proc.pid, signal.SIGTERM)
    finally:
        assert finish(proc) == 0
    run_cli("train", "--run-dir", str(run_dir), "--resume", "--quiet", *interleaved(2, 3),
            check=True)
    assert_bitwise_equal(load_params(run_dir), load_params(references(*MATH)))


@pytest.mark.parametrize(("replicas", "victim", "most_lost"), [(1, 0, 1), (2, 3, 0)])
def test_a_killed_worker_is_replaced_in_place(tmp_path, references, replicas, victim,
                                              most_lost):
    math = (*MATH, "--replicas", str(replicas))
    run_dir = tmp_path / "run"
    proc = start_cli("train", "--run-dir", str(run_dir), *interleaved(2), *math, env=SLOW)
    try:
        wait_for(lambda: last_step(run_dir) >= 20, timeout_s=120, what="step 20")
        before = run_state(run_dir)["worker_pids"]
        os.kill(before[victim], signal.SIGKILL)
    finally:
        status = finish(proc)
    assert status == 0
    restarts = [e for e in events(run_dir) if e["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["mode"] == "in_place", restarts
    assert restarts[0]["steps_lost"] <= most_lost
    after = run_state(run_dir)["worker_pids"]
    assert [a == b for a, b in zip(before, after, strict=True)] == [
        i != victim for i in range(len(before))]
    assert_bitwise_equal(load_params(run_dir), load_params(references(*math)))
    assert_no_survivors(run_dir)
