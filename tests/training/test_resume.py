"""`pipetrain train --resume` through the command line: damaged checkpoints, changed configs,
a crash while a checkpoint is being written.

A finished run refuses --resume, so most tests copy one finished run (checkpoints at steps 20,
30 and 40 of 44), mark the copy "stopped" and remove its final.npz: resuming it must recompute
the tail and land bitwise on the reference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipetrain.run import checkpoint
from pipetrain_harness.plan import Plan
from tests.helpers import (
    assert_bitwise_equal,
    cli_env,
    load_params,
    read_events,
    run_cli,
    run_state,
    start_cli,
    step_events,
)

OPTIONS = ("--epochs", "2", "--quiet")  # 44 steps
CHECKPOINT_EVERY = ("--checkpoint-every", "10")


def events_named(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == name]


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    """Re-check ``predicate`` every 20 ms until it holds; fail clearly otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()
            if value:
                return value
            pytest.fail(f"the run exited with status {proc.returncode} before {what}")
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def assert_steps_match(run_dir: Path, reference: Path) -> None:
    expected = {e["step"]: (e["loss"], e["grad_digest"]) for e in step_events(reference)}
    seen = set()
    for event in step_events(run_dir):
        assert (event["loss"], event["grad_digest"]) == expected[event["step"]], (
            f"step {event['step']} differs from the reference")
        seen.add(event["step"])
    assert seen == set(expected)


def resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("train", "--run-dir", str(run_dir), "--resume", "--quiet", *extra, timeout=120)


def assert_resumed_like_reference(run_dir: Path, reference: Path, result, from_step: int):
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr
    assert run_state(run_dir)["state"] == "done"
    assert events_named(run_dir, "run_start")[-1]["from_step"] == from_step
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert_steps_match(run_dir, reference)
    for path in (run_dir / "checkpoints").iterdir():
        assert not path.name.startswith("."), f"temporary left behind: {path.name}"
        checkpoint.verify(path)  # a refused checkpoint was rewritten by the resumed run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_cli("reference", "--run-dir", str(run_dir), *OPTIONS, check=True)
    return run_dir


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_cli("train", "--run-dir", str(run_dir), *OPTIONS, *CHECKPOINT_EVERY, check=True)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000020", "step-00000030", "step-00000040"], names
    return run_dir


@pytest.fixture
def stopped(finished, tmp_path) -> Path:
    """A copy of the finished run that looks as if it had been stopped after its last checkpoint
    (final.npz removed, so the resumed run has to write it again)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    state = run_state(run_dir)
    state["state"] = "stopped"
    (run_dir / "run.json").write_text(json.dumps(state))
    (run_dir / "final.npz").unlink()
    return run_dir


def segment(run_dir: Path, step: int, index: int) -> Path:
    return run_dir / "checkpoints" / checkpoint.step_dir_name(step) / f"segment-{index}.npz"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_manifest(path: Path) -> None:
    (path.parent / checkpoint.MANIFEST).unlink()


def garble_manifest(path: Path) -> None:
    (path.parent / checkpoint.MANIFEST).write_text("{ this is not json")


# -- tests -------------------------------------------------------------------------------------


def test_resume_from_the_newest_checkpoint(stopped, reference):
    result = resume(stopped)
    assert_resumed_like_reference(stopped, reference, result, from_step=40)
    assert "refusing" not in result.stderr


@pytest.mark.parametrize("damage", [flip_byte, truncate, drop_manifest, garble_manifest],
                         ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_is_refused_and_the_older_one_used(stopped, reference, damage):
    damage(segment(stopped, 40, 1))
    result = resume(stopped)
    refusals = [line for line in result.stderr.splitlines() if "refusing checkpoint" in line]
    assert len(refusals) == 1, result.stderr
    assert "step-00000040" in refusals[0]
    assert_resumed_like_reference(stopped, reference, result, from_step=30)


def test_two_damaged_checkpoints_fall_back_to_the_third(stopped, reference):
    flip_byte(segment(stopped, 40, 0))
    truncate(segment(stopped, 30, 2))
    result = resume(stopped)
    refusals = [line for line in result.stderr.splitlines() if "refusing checkpoint" in line]
    assert len(refusals) == 2, result.stderr
    assert "step-00000040" in refusals[0] and "step-00000030" in refusals[1]
    assert_resumed_like_reference(stopped, reference, result, from_step=20)


def test_resume_with_a_different_math_key_is_refused(stopped):
    events_before = (stopped / "events.jsonl").read_bytes()
    result = resume(stopped, "--lr", "0.1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "lr" in lines[0] and "step-00000040" in lines[0], lines[0]
    assert (stopped / "events.jsonl").read_bytes() == events_before, "the run was touched"
    assert not (stopped / "final.npz").exists()


@pytest.mark.parametrize("stages,schedule", [("2", "gpipe"), ("1", "zb")])
def test_resume_under_another_stage_split(stopped, reference, stages, schedule):
    """Stage count and schedule never change the bits: a checkpoint written by 3 stages loads
    into any split."""
    result = resume(stopped, "--stages", stages, "--schedule", schedule)
    assert_resumed_like_reference(stopped, reference, result, from_step=40)
    assert events_named(stopped, "run_start")[-1]["config"]["stages"] == int(stages)


def test_stale_temporary_from_a_crash_mid_write_is_removed(stopped, reference):
    stale = stopped / "checkpoints" / ".step-00000044.tmp-123"
    stale.mkdir()
    (stale / "segment-0.npz").write_bytes(b"PK\x03\x04 half a segment")
    result = resume(stopped)
    assert not stale.exists()
    assert "refusing" not in result.stderr
    assert_resumed_like_reference(stopped, reference, result, from_step=40)


def test_a_finished_run_refuses_resume(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    result = resume(run_dir)
    assert result.returncode == 2
    assert "already finished" in result.stderr and "Traceback" not in result.stderr


def test_kill_9_while_checkpointing_every_step_leaves_a_loadable_one(tmp_path, reference):
    """A checkpoint at every step makes writing one the likeliest thing to be interrupted."""
    run_dir = tmp_path / "run"
    proc = start_cli("train", "--run-dir", str(run_dir), *OPTIONS, "--checkpoint-every", "1",
                     env=cli_env(Plan(step_delay_s=0.005)))
    try:
        wait_for(lambda: any(e["step"] >= 15 for e in events_named(run_dir, "checkpoint")),
                 60, "a checkpoint at step >= 15", proc)
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -9
    intact, refused = checkpoint.find_intact(run_dir / "checkpoints")
    assert intact is not None and refused == []
    result = resume(run_dir)
    assert_resumed_like_reference(run_dir, reference, result, from_step=intact.step)
    assert intact.step >= 15


def test_resume_with_another_replica_count_is_refused_saying_why(stopped):
    events_before = (stopped / "events.jsonl").read_bytes()
    result = resume(stopped, "--replicas", "2")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--replicas 1, not 2" in lines[0] and "changes the bits" in lines[0], lines[0]
    assert (stopped / "events.jsonl").read_bytes() == events_before


def csv_dataset(path: Path, rows: int = 300) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((rows, 8))
    y = rng.integers(0, 3, rows)
    lines = [",".join([*(f"f{i}" for i in range(8)), "label"])]
    lines += [",".join([*(f"{v:.6f}" for v in row), str(label)]) for row, label in zip(x, y,
                                                                                   strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_resume_on_a_changed_dataset_is_refused_naming_the_file(tmp_path):
    data = csv_dataset(tmp_path / "data.csv")
    run_dir = tmp_path / "run"
    options = ("--dataset", str(data), "--layers", "8,16,3", "--stages", "2", "--epochs", "2",
               "--checkpoint-every", "3", "--quiet")
    run_cli("train", "--run-dir", str(run_dir), *options, check=True)
    state = run_state(run_dir)
    state["state"] = "stopped"
    (run_dir / "run.json").write_text(json.dumps(state))
    manifest = checkpoint.find_intact(run_dir / "checkpoints")[0]
    assert manifest.data["file"] == str(data) and len(manifest.data["sha256"]) == 64
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")  # rows reordered
    events_before = (run_dir / "events.jsonl").read_bytes()
    result = run_cli("train", "--run-dir", str(run_dir), "--resume", "--quiet")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(data) in lines[0] and "changed since" in lines[0], lines[0]
    assert (run_dir / "events.jsonl").read_bytes() == events_before
