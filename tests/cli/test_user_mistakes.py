"""Fifteen mistakes a new user makes in the first hour, each refused by the real command line
with exit 2, one line on stderr that names the problem (and the likely fix), and no traceback.

``python -m tests.cli.test_user_mistakes`` prints the same table as Markdown (what the user
typed, the line, the exit status).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import run_cli

# (what the user did, command line with {tmp} and {done} for paths, words the line must hold)
MISTAKES: list[tuple[str, list[str], list[str]]] = [
    ("option misspelt", ["train", "--epoch", "3"], ["--epoch", "did you mean '--epochs'"]),
    ("command misspelt", ["trian"], ["'trian'", "did you mean 'train'"]),
    ("choice misspelt", ["train", "--schedule", "gpip"], ["--schedule", "did you mean 'gpipe'"]),
    ("a word for a number", ["train", "--stages", "two"], ["--stages", "'two'"]),
    ("more stages than layers, in reference", ["reference", "--stages", "5"],
     ["stages", "5 stages for 3 layers"]),
    ("layers that do not fit the data (and too many stages)",
     ["train", "--layers", "10,16,10", "--stages", "5"],
     ["64 features", "first layer expects 10", "--layers 64,"]),
    ("config key misspelt", ["train", "{tmp}/typo.toml"],
     ["typo.toml", "'epoch'", "did you mean 'epochs'"]),
    ("config file not TOML", ["train", "{tmp}/broken.toml"], ["broken.toml", "not valid TOML"]),
    ("dataset file missing", ["train", "--dataset", "{tmp}/absent.csv"], ["absent.csv"]),
    ("a CSV cell that is no number", ["train", "--dataset", "{tmp}/bad.csv", "--layers",
                                      "3,4,2", "--stages", "1"], ["bad.csv:3:", "eight"]),
    ("--resume without --run-dir", ["train", "--resume"], ["--resume needs --run-dir"]),
    ("resuming a finished run", ["train", "--resume", "--run-dir", "{done}"],
     ["already finished", "more --epochs"]),
    ("a run directory already used", ["train", "--run-dir", "{done}"],
     ["already holds a run", "--resume"]),
    ("status of a folder that is no run", ["status", "{tmp}"], ["not a run directory"]),
    ("stopping a run that is not running", ["stop", "{done}"], ["not running", "done"]),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_cli("reference", "--epochs", "1", "--quiet", "--run-dir", str(run_dir), check=True)
    return run_dir


def write_inputs(folder: Path) -> None:
    (folder / "typo.toml").write_text("epoch = 3\n")
    (folder / "broken.toml").write_text("epochs = = 3\n")
    (folder / "bad.csv").write_text("a,b,c,label\n1,2,3,0\n7,eight,9,1\n")


def command(args: list[str], tmp: Path, done: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)).replace("{done}", str(done)) for a in args]


@pytest.mark.parametrize(("what", "args", "words"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_and_exit_2(tmp_path, finished, what, args, words):
    write_inputs(tmp_path)
    before = sorted(p.name for p in finished.iterdir())
    result = run_cli(*command(args, tmp_path, finished), timeout=60)
    assert result.returncode == 2, (what, result.returncode, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pipetrain: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert sorted(p.name for p in finished.iterdir()) == before  # nothing touched
    assert not (tmp_path / "runs").exists()


def test_there_are_fifteen():
    assert len(MISTAKES) == 15


if __name__ == "__main__":  # the table for a person
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        done = tmp / "done"
        run_cli("reference", "--epochs", "1", "--quiet", "--run-dir", str(done), check=True)
        write_inputs(tmp)
        print("| # | mistake | command | stderr | exit |\n| --- | --- | --- | --- | --- |")
        for number, (what, args, _words) in enumerate(MISTAKES, 1):
            result = run_cli(*command(args, tmp, done), timeout=60)
            shown = " ".join(args).replace("{tmp}/", "").replace("{done}", "runs/done")
            line = result.stderr.strip().replace(str(tmp) + "/", "").replace("|", "\\|")
            print(f"| {number} | {what} | `pipetrain {shown}` | `{line}` | "
                  f"{result.returncode} |")
        sys.exit(0)
