"""pipetrain.run.rundir under a file-size limit: a write that fails is one line naming the file,
and nothing half-written stays (a real RLIMIT_FSIZE, in a child process)."""

from __future__ import annotations

import json
import subprocess
import sys

from pipetrain.run.rundir import RunDir
from tests.helpers import REPO, cli_env

CHILD = """
import json, resource, sys
from pathlib import Path
from pipetrain.run.rundir import RunDir
from pipetrain.run.storage import StorageError
run = RunDir(Path(sys.argv[1]))
run.update_state(state="running", padding="x" * 100)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
errors = {}
try:
    for step in range(1000):
        run.emit("step", step=step, padding="y" * 100)
except StorageError as exc:
    errors["emit"] = str(exc)
try:
    run.update_state(state="failed", padding="z" * 8000)
except StorageError as exc:
    errors["state"] = str(exc)
run.close()
print(json.dumps(errors))
"""


def test_a_refused_write_is_one_line_and_leaves_nothing_half_written(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", CHILD, str(run_dir)], capture_output=True,
                            text=True, timeout=60, cwd=REPO, env=cli_env())
    assert result.returncode == 0, result.stderr
    errors = json.loads(result.stdout)
    assert errors["emit"] == f"{run_dir / 'events.jsonl'}: File too large (EFBIG)"
    assert errors["state"] == f"{run_dir / 'run.json'}: File too large (EFBIG)"
    text = (run_dir / "events.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    assert json.loads((run_dir / "run.json").read_text())["state"] == "running"  # the old one
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "events.jsonl", "lock",
                                                         "logs", "run.json"]


def test_a_half_line_left_by_a_crash_is_cut_off_when_the_run_is_opened(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text('{"event": "run_start"}\n{"event": "st')
    with RunDir(run_dir) as run:
        run.emit("step", step=1)
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["run_start", "step"]
