"""`pipetrain reference` and `pipetrain status` as real subprocesses: accuracy, determinism,
micro-batch invariance, the run directory, and one-line usage errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from tests.helpers import run_cli

TIMEOUT = 120


def reference(run_dir: Path, *options: str) -> subprocess.CompletedProcess:
    result = run_cli("reference", "--run-dir", str(run_dir), *options)
    assert result.returncode == 0, result.stderr
    return result


def events(run_dir: Path) -> list[dict]:
    with open(run_dir / "events.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def run_json(run_dir: Path) -> dict:
    with open(run_dir / "run.json", encoding="utf-8") as handle:
        return json.load(handle)


def params(run_dir: Path, name: str = "final.npz") -> dict[str, np.ndarray]:
    with np.load(run_dir / name, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def step_digests(run_dir: Path) -> list[str]:
    return [e["grad_digest"] for e in events(run_dir) if e["event"] == "step"]


def assert_usage_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, exactly one line on stderr naming the problem, no traceback anywhere."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pipetrain: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------- successful runs


def test_reference_default_config_learns_digits(tmp_path):
    run_dir = tmp_path / "run"
    result = reference(run_dir)
    assert f"run directory: {run_dir}" in result.stdout.splitlines()
    assert "Traceback" not in result.stderr

    state = run_json(run_dir)
    assert state["state"] == "done"
    assert state["command"] == "reference"
    assert state["config"]["layers"] == [64, 128, 64, 10]
    assert state["config"]["run_dir"] == str(run_dir)

    log = events(run_dir)
    assert log[0]["event"] == "run_start"
    assert log[-1]["event"] == "run_end" and log[-1]["status"] == "done"
    steps = [e for e in log if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, state["total_steps"] + 1))
    assert state["total_steps"] == 20 * ((1797 - int(1797 * 0.2)) // 64)
    assert all(np.isfinite(e["loss"]) and len(e["grad_digest"]) == 32 for e in steps)
    evaluations = [e for e in log if e["event"] == "evaluate"]
    assert len(evaluations) == 20
    assert evaluations[-1]["accuracy"] >= 0.95
    assert steps[-1]["loss"] < steps[0]["loss"]

    initial, final = params(run_dir, "initial.npz"), params(run_dir)
    expected = {f"layers.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")}
    assert set(initial) == set(final) == expected
    for i, (fan_in, fan_out) in enumerate([(64, 128), (128, 64), (64, 10)]):
        assert final[f"layers.{i}.weight"].shape == (fan_in, fan_out)
        assert final[f"layers.{i}.bias"].shape == (fan_out,)
        assert final[f"layers.{i}.weight"].dtype == np.float64
        assert not np.array_equal(initial[f"layers.{i}.weight"], final[f"layers.{i}.weight"])


def test_same_config_twice_is_bitwise_equal(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    reference(first, "--epochs", "2", "--quiet")
    reference(second, "--epochs", "2", "--quiet")
    a, b = params(first), params(second)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    digests = step_digests(first)
    assert len(digests) == 2 * 22
    assert len(set(digests)) == len(digests)  # every step's gradients differ
    assert digests == step_digests(second)


def test_microbatches_change_only_rounding(tmp_path):
    one, three = tmp_path / "m1", tmp_path / "m3"
    reference(one, "--epochs", "1", "--microbatches", "1", "--dtype", "float64", "--quiet")
    reference(three, "--epochs", "1", "--microbatches", "3", "--dtype", "float64", "--quiet")
    assert run_json(one)["config"]["microbatches"] == 1
    assert run_json(three)["config"]["microbatches"] == 3
    a, b = params(one), params(three)
    assert a.keys() == b.keys()
    for name in a:
        # Max relative error over the array (bitwise equality is not required here).
        error = np.abs(a[name] - b[name]).max() / np.abs(a[name]).max()
        assert error <= 1e-12, (name, error)


def test_status_json_after_a_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    reference(run_dir, "--epochs", "1", "--quiet")
    result = run_cli("status", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["state"] == "done"
    assert summary["step"] == summary["total_steps"] == 22
    assert 0 <= summary["accuracy"] <= 1
    plain = run_cli("status", str(run_dir))
    assert plain.returncode == 0
    assert any(line.split() == ["state", "done"] for line in plain.stdout.splitlines())


# ----------------------------------------------------------------------- usage errors


def test_unknown_option(tmp_path):
    assert_usage_error(run_cli("reference", "--run-dir", str(tmp_path / "r"), "--frobnicate"),
                       "--frobnicate")
    assert not (tmp_path / "r").exists()


def test_bad_layers_option(tmp_path):
    assert_usage_error(run_cli("reference", "--run-dir", str(tmp_path / "r"), "--layers", "64,x"),
                       "layers", "64,x")


def test_zero_stages(tmp_path):
    # Refused while resolving the config, before any stage process could be started.
    assert_usage_error(run_cli("train", "--run-dir", str(tmp_path / "r"), "--stages", "0"),
                       "stages")
    assert not (tmp_path / "r").exists()


def test_zero_stages_reference(tmp_path):
    assert_usage_error(
        run_cli("reference", "--run-dir", str(tmp_path / "r"), "--stages", "0", "--epochs", "1",
                "--quiet"),
        "stages",
    )


def test_config_file_with_unknown_key(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("epochs = 1\nlearning_rate = 0.1\n")
    assert_usage_error(run_cli("reference", str(config), "--run-dir", str(tmp_path / "r")),
                       str(config), "learning_rate")


def test_config_file_not_toml(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("epochs = = 1\n")
    assert_usage_error(run_cli("reference", str(config), "--run-dir", str(tmp_path / "r")),
                       str(config), "TOML")


def test_config_file_not_utf8(tmp_path):
    config = tmp_path / "run.toml"
    config.write_bytes(b'dataset = "caf\xe9.csv"\n')
    assert_usage_error(run_cli("reference", str(config), "--run-dir", str(tmp_path / "r")),
                       str(config))


def test_missing_config_file(tmp_path):
    config = tmp_path / "absent.toml"
    assert_usage_error(run_cli("reference", str(config), "--run-dir", str(tmp_path / "r")),
                       str(config))


def test_missing_dataset_file(tmp_path):
    data = tmp_path / "absent.csv"
    assert_usage_error(
        run_cli("reference", "--dataset", str(data), "--run-dir", str(tmp_path / "r")),
        str(data),
    )


def test_csv_with_non_numeric_cell(tmp_path):
    data = tmp_path / "bad.csv"
    data.write_text("a,b,c,label\n1,2,3,0\n4,5,6,1\n7,eight,9,0\n")
    line = assert_usage_error(
        run_cli("reference", "--dataset", str(data), "--layers", "3,4,2", "--stages", "1",
                "--run-dir", str(tmp_path / "r")),
        f"{data}:4:", "eight",
    )
    assert "number" in line


def test_empty_npz_dataset(tmp_path):
    data = tmp_path / "empty.npz"
    data.write_bytes(b"")
    assert_usage_error(
        run_cli("reference", "--dataset", str(data), "--run-dir", str(tmp_path / "r")), str(data)
    )


def test_layers_not_matching_dataset_features(tmp_path):
    assert_usage_error(
        run_cli("reference", "--layers", "10,16,10", "--stages", "2",
                "--run-dir", str(tmp_path / "r")),
        "64 features", "10",
    )


def test_status_without_run_json(tmp_path):
    assert_usage_error(run_cli("status", str(tmp_path)), str(tmp_path), "run.json")
    assert_usage_error(run_cli("status", str(tmp_path), "--json"), str(tmp_path))


def test_reusing_a_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    reference(run_dir, "--epochs", "1", "--quiet")
    before = {name: (run_dir / name).read_bytes()
              for name in ("events.jsonl", "run.json", "final.npz")}
    assert_usage_error(run_cli("reference", "--run-dir", str(run_dir), "--epochs", "1"),
                       str(run_dir), "already")
    for name, content in before.items():
        assert (run_dir / name).read_bytes() == content, f"{name} was touched"
