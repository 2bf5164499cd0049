"""`mpirun -n N pipetrain train --transport mpi` end to end: bitwise equal to `pipetrain reference`
and to the pipe transport, for both schedules and two replicas; signals sent to mpirun; a rank
killed mid-run and the run resumed; failures that must end the whole job cleanly.

Every mpirun runs as a subprocess with a timeout and is ended (with all its ranks) if it
overruns; tests synchronise on what the run writes (events.jsonl, run.json), never on sleeps.
Runs that must be interrupted mid-way are slowed with the harness plan's step_delay_s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipetrain_harness.plan import Plan
from tests.helpers import (
    assert_bitwise_equal,
    assert_same_steps,
    cli_env,
    load_params,
    read_events,
    run_cli,
    run_state,
    step_events,
)
from tests.mpi.mpirun import (
    assert_no_survivors,
    finish,
    mpi_env,
    run_mpi,
    start_mpi,
)

SMALL = ("--epochs", "1", "--batch-size", "48", "--quiet")
SLOW_STEP_S = "0.03"
START_TIMEOUT_S = 120.0  # mpirun and 4-5 Python ranks on 2 shared cores can take a while


def named(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == name]


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            value = predicate()
            if value:
                return value
            stdout, stderr = proc.communicate()
            pytest.fail(f"mpirun exited {proc.returncode} before {what}:\n{stdout}\n{stderr}")
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def last_step(run_dir: Path) -> int:
    steps = named(run_dir, "step")
    return steps[-1]["step"] if steps else 0


# -- bitwise equality ---------------------------------------------------------------------------

# (ranks, stages, replicas, schedule): -n 3 and -n 4, both schedules (and zb), R = 2.
CASES = [
    (3, 2, 1, "gpipe"),
    (3, 2, 1, "1f1b"),
    (4, 3, 1, "1f1b"),
    (4, 3, 1, "gpipe"),
    (3, 1, 2, "1f1b"),
    (5, 2, 2, "gpipe"),
    (5, 2, 2, "zb"),
]


@pytest.mark.parametrize("ranks,stages,replicas,schedule", CASES)
def test_mpi_run_is_bitwise_equal_to_reference_and_pipes(
    tmp_path, shm_dir, reference_runs, ranks, stages, replicas, schedule
):
    options = ("--stages", str(stages), "--replicas", str(replicas), "--schedule", schedule,
               *SMALL)
    mpi_dir, pipe_dir = tmp_path / "mpi", tmp_path / "pipe"
    result = run_mpi(ranks, "train", "--transport", "mpi", "--run-dir", str(mpi_dir), *options,
                     env=mpi_env(shm_dir), check=True)
    run_cli("train", "--transport", "pipe", "--run-dir", str(pipe_dir), *options, check=True)
    reference = reference_runs("--replicas", str(replicas), *SMALL)
    for other in (reference, pipe_dir):
        assert_bitwise_equal(load_params(mpi_dir), load_params(other))
        assert_bitwise_equal(load_params(mpi_dir, "initial.npz"),
                             load_params(other, "initial.npz"))
        assert_same_steps(mpi_dir, other)  # loss and grad_digest of every step
    state = run_state(mpi_dir)
    assert state["state"] == "done" and state["transport"] == "mpi", state
    assert [r["rank"] for r in state["mpi_ranks"]] == list(range(ranks))
    # The run directory has what a pipe run's has: one log per worker, the same events.
    assert sorted(p.name for p in (mpi_dir / "logs").iterdir()) == sorted(
        p.name for p in (pipe_dir / "logs").iterdir())
    kinds = {e["event"] for e in read_events(mpi_dir)}
    assert kinds == {e["event"] for e in read_events(pipe_dir)}, kinds
    exits = named(mpi_dir, "worker_exit")
    assert len(exits) == ranks - 1 and all(e["returncode"] == 0 for e in exits), exits
    # --quiet prints the run directory alone, first, as the pipe transport does
    assert result.stdout.splitlines()[0] == f"run directory: {mpi_dir.resolve()}", result.stdout
    assert_no_survivors(mpi_dir)


def test_world_size_must_match_stages_times_replicas(tmp_path, shm_dir):
    run_dir = tmp_path / "run"
    result = run_mpi(3, "train", "--transport", "mpi", "--run-dir", str(run_dir),
                     "--stages", "3", *SMALL, env=mpi_env(shm_dir), timeout=120)
    assert result.returncode == 2, result
    assert ("mpirun started 3 rank(s) but --stages 3 x --replicas 1 needs 4"
            in result.stderr), result.stderr
    assert result.stderr.count("pipetrain: error:") == 1, result.stderr  # rank 0 only
    assert not (run_dir / "events.jsonl").exists()
    assert_no_survivors(run_dir)


def test_mpi_transport_without_mpirun_says_how_to_launch(tmp_path):
    result = run_cli("train", "--transport", "mpi", "--run-dir", str(tmp_path / "run"),
                     "--stages", "2", "--replicas", "2", *SMALL, env=cli_env())
    assert result.returncode == 2, result
    assert "mpirun -n 5 pipetrain train --transport mpi" in result.stderr, result.stderr


def test_pipe_transport_under_mpirun_is_refused(tmp_path, shm_dir):
    result = run_mpi(4, "train", "--run-dir", str(tmp_path / "run"), *SMALL,
                     env=mpi_env(shm_dir), timeout=120)
    assert result.returncode == 2, result
    assert "add --transport mpi" in result.stderr, result.stderr


# -- signals sent to mpirun ---------------------------------------------------------------------


def slow_env(shm_dir: Path) -> dict[str, str]:
    return mpi_env(shm_dir, Plan(step_delay_s=float(SLOW_STEP_S)))


def test_sigusr1_to_mpirun_writes_a_checkpoint_and_training_goes_on(tmp_path, shm_dir,
                                                                    reference_runs):
    run_dir = tmp_path / "run"
    options = ("--epochs", "2", "--quiet")
    proc = start_mpi(4, "train", "--transport", "mpi", "--run-dir", str(run_dir), *options,
                     env=slow_env(shm_dir))
    try:
        wait_for(lambda: last_step(run_dir) >= 3, START_TIMEOUT_S, "step 3", proc)
        proc.send_signal(signal.SIGUSR1)
        checkpoint = wait_for(lambda: named(run_dir, "checkpoint"), 30, "a checkpoint", proc)
    finally:
        stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr
    assert checkpoint[0]["step"] >= 3
    assert (run_dir / checkpoint[0]["path"] / "manifest.json").exists()
    assert run_state(run_dir)["state"] == "done"
    assert_bitwise_equal(load_params(run_dir), load_params(reference_runs(*options)))
    assert_no_survivors(run_dir)


def test_sigusr2_to_mpirun_stops_at_the_end_of_the_epoch(tmp_path, shm_dir):
    run_dir = tmp_path / "run"
    proc = start_mpi(4, "train", "--transport", "mpi", "--run-dir", str(run_dir), "--epochs", "3",
                     "--quiet", env=slow_env(shm_dir))
    try:
        wait_for(lambda: last_step(run_dir) >= 2, START_TIMEOUT_S, "step 2", proc)
        proc.send_signal(signal.SIGUSR2)
    finally:
        stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr
    steps_per_epoch = run_state(run_dir)["total_steps"] // 3
    stop = named(run_dir, "stop")
    assert stop and stop[0]["reason"] == "epoch_stop", stop
    assert stop[0]["step"] % steps_per_epoch == 0
    assert named(run_dir, "checkpoint")[-1]["step"] == stop[0]["step"]
    assert run_state(run_dir)["state"] == "stopped"
    assert_no_survivors(run_dir)


def test_sigterm_to_mpirun_stops_with_a_checkpoint_and_resume_is_exact(tmp_path, shm_dir,
                                                                       reference_runs):
    """mpirun's kill sequence is SIGCONT, 0.25 s, SIGTERM, at most 0.25 s, SIGKILL: the
    checkpoint must be on disk before the SIGKILL, and --resume must land on the reference."""
    run_dir = tmp_path / "run"
    options = ("--epochs", "2", "--quiet")
    proc = start_mpi(4, "train", "--transport", "mpi", "--run-dir", str(run_dir), *options,
                     env=slow_env(shm_dir))
    try:
        wait_for(lambda: last_step(run_dir) >= 5, START_TIMEOUT_S, "step 5", proc)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
    finally:
        stdout, stderr = finish(proc)
    stop = named(run_dir, "stop")
    assert stop and stop[0]["reason"] == "signal", (read_events(run_dir)[-5:], stderr)
    checkpoints = named(run_dir, "checkpoint")
    assert checkpoints[-1]["step"] == stop[0]["step"]
    assert checkpoints[-1]["t"] - sent < 0.5, "the checkpoint came after mpirun's SIGKILL"
    assert named(run_dir, "run_end")[-1]["status"] == "stopped"
    assert run_state(run_dir)["state"] == "stopped"
    assert_no_survivors(run_dir)
    stopped_at = stop[0]["step"]

    run_mpi(4, "train", "--transport", "mpi", "--run-dir", str(run_dir), "--resume", "--quiet",
            env=mpi_env(shm_dir), check=True)
    reference = reference_runs(*options)
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    resumed = [e for e in step_events(run_dir) if e["step"] > stopped_at]
    expected = {e["step"]: e["grad_digest"] for e in step_events(reference)}
    assert resumed and all(e["grad_digest"] == expected[e["step"]] for e in resumed)
    assert_no_survivors(run_dir)


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", [0, 3])  # stage 0 of replica 0; stage 1 of replica 1
def test_killed_rank_ends_the_job_cleanly_and_resume_is_exact(tmp_path, shm_dir,
                                                              reference_runs, victim):
    run_dir = tmp_path / "run"
    options = ("--epochs", "2", "--stages", "2", "--replicas", "2", "--quiet")
    proc = start_mpi(5, "train", "--transport", "mpi", "--run-dir", str(run_dir), *options,
                     "--checkpoint-every", "5", env=slow_env(shm_dir))
    try:
        wait_for(lambda: named(run_dir, "checkpoint"), START_TIMEOUT_S, "a checkpoint", proc)
        pid = run_state(run_dir)["worker_pids"][victim]
        os.kill(pid, signal.SIGKILL)
    finally:
        stdout, stderr = finish(proc)
    assert proc.returncode != 0
    assert f"PID {pid}" in stderr and "signal 9" in stderr, stderr  # mpirun names the rank
    assert_no_survivors(run_dir)  # Open MPI took every other rank down

    run_mpi(5, "train", "--transport", "mpi", "--run-dir", str(run_dir), "--resume", "--quiet",
            env=mpi_env(shm_dir), check=True)
    reference = reference_runs("--replicas", "2", "--epochs", "2", "--quiet")
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert run_state(run_dir)["state"] == "done"
    assert_no_survivors(run_dir)


def test_worker_error_fails_the_run_with_its_message(tmp_path, shm_dir):
    run_dir = tmp_path / "run"
    fault = {"stage": 1, "step": 4, "kind": "raise"}
    result = run_mpi(4, "train", "--transport", "mpi", "--run-dir", str(run_dir), *SMALL,
                     env=mpi_env(shm_dir, Plan(stage_faults=[fault])))
    assert result.returncode == 1, result
    assert "stage 1 (layers 1-1)" in result.stderr and "injected fault" in result.stderr
    assert "[MPI rank 2 on " in result.stderr and "--resume" in result.stderr, result.stderr
    assert "MPI_ABORT" not in result.stderr  # every rank stopped when told: no abort needed
    errors = named(run_dir, "error")
    assert errors and "injected fault at stage 1 step 4" in errors[0]["message"]
    assert named(run_dir, "run_end")[-1]["status"] == "failed"
    exits = {e["role"]: e["returncode"] for e in named(run_dir, "worker_exit")}
    assert exits == {"stage 0 (layers 0-0)": 0, "stage 1 (layers 1-1)": 1,
                     "stage 2 (layers 2-2)": 0}, exits
    assert "injected fault" in (run_dir / "logs" / "stage-1.log").read_text()
    assert_no_survivors(run_dir)


def test_hung_worker_is_detected_and_the_job_aborted(tmp_path, shm_dir):
    run_dir = tmp_path / "run"
    fault = {"stage": 2, "step": 4, "kind": "hang"}
    result = run_mpi(4, "train", "--transport", "mpi", "--run-dir", str(run_dir), *SMALL,
                     "--heartbeat-timeout", "1",
                     env=mpi_env(shm_dir, Plan(stage_faults=[fault])))
    assert result.returncode == 1, result
    assert "no heartbeat for" in result.stderr and "[MPI rank 3 on " in result.stderr
    assert "rank 3 (pid" in result.stderr and "aborting the MPI job" in result.stderr
    assert named(run_dir, "run_end")[-1]["status"] == "failed"
    assert_no_survivors(run_dir)
