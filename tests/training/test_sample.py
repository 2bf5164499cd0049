"""`pipetrain sample` writes with a trained text model; each task's evaluate event carries its
own metrics."""

from __future__ import annotations

import pytest

from tests.helpers import events, run_cli

TEXT = "def add(a, b):\n    return a + b\n\n" * 40

TEXT_MODEL = """
holdout = 0.2
batch_size = 8
microbatches = 2
epochs = 2
optimizer = "adam"
lr = 0.01
[[model]]
type = "embedding"
dim = 16
context = 16
[[model]]
type = "block"
heads = 2
hidden = 32
[[model]]
type = "layernorm"
[[model]]
type = "dense"
"""


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "code.txt").write_text(TEXT, encoding="utf-8")
    config = root / "text.toml"
    config.write_text(f'dataset = "{root / "code.txt"}"\n' + TEXT_MODEL)
    run_dir = root / "run"
    run_cli("train", str(config), "--run-dir", str(run_dir), "--stages", "2", "--quiet",
            check=True)
    return run_dir


def test_text_run_reports_held_out_loss_per_character_only(text_run):
    evaluated = [e for e in events(text_run) if e["event"] == "evaluate"]
    assert len(evaluated) == 2 and "accuracy" not in evaluated[-1]
    assert 0 < evaluated[-1]["loss"] < evaluated[0]["loss"]


def test_sample_writes_the_same_text_for_the_same_seed(text_run):
    first = run_cli("sample", str(text_run), "--prompt", "def ", "--tokens", "40", check=True)
    again = run_cli("sample", str(text_run), "--prompt", "def ", "--tokens", "40", check=True)
    other = run_cli("sample", str(text_run), "--prompt", "def ", "--tokens", "40", "--seed",
                    "1", check=True)
    assert first.stdout == again.stdout
    written = first.stdout.rstrip("\n")
    assert written.startswith("def ") and len(written) >= 40
    assert set(written) <= set(TEXT)
    assert other.stdout != first.stdout


@pytest.mark.parametrize("args,words", [
    (["--prompt", "DEF"], "never saw"),
    (["--tokens", "-1"], "--tokens"),
    (["--temperature", "0"], "--temperature"),
])
def test_sample_refuses_bad_input_in_one_line(text_run, args, words):
    result = run_cli("sample", str(text_run), *args)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sample_refuses_a_run_that_is_not_a_text(tmp_path):
    run_dir = tmp_path / "digits"
    run_cli("reference", "--run-dir", str(run_dir), "--epochs", "1", "--quiet", check=True)
    evaluated = [e for e in events(run_dir) if e["event"] == "evaluate"]
    assert {"loss", "accuracy"} <= set(evaluated[0])
    result = run_cli("sample", str(run_dir))
    assert result.returncode == 2 and "not a text" in result.stderr
    missing = run_cli("sample", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "not a run directory" in missing.stderr
