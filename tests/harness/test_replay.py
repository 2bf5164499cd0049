"""Exact replay, end to end on real runs: a fault lands at its named point (the history shows
what was complete when it did), N runs of a scenario give N identical canonical histories, and
``replay REPORT`` reruns a report to the same digest, or says where it parted."""

from __future__ import annotations

import json
import subprocess
import sys

from pipetrain_harness.scenario import scenario_to_toml
from tests.helpers import REPO, cli_env

HARNESS = [sys.executable, "-P", "-m", "pipetrain_harness"]


def harness(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*HARNESS, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=cli_env())


def scenario(tmp_path, name: str, faults: list[dict], restarts: int, **train) -> str:
    plan = {"name": name, "description": "a test of exact replay", "seed": 3,
            "train": {"stages": 3, "epochs": 1, "checkpoint_every": 4, **train},
            "faults": faults,
            "expect": {"equivalence": "bitwise", "restarts": restarts, "no_leaks": True}}
    path = tmp_path / f"{name}.toml"
    path.write_text(scenario_to_toml(plan))
    return str(path)


def history(report_dir, name: str) -> list[dict]:
    return json.loads((report_dir / name / "report.json").read_text())["canonical_history"]


def test_two_kills_one_step_apart_replay_to_two_restarts(tmp_path):
    path = scenario(tmp_path, "one-step-apart",
                    [{"kind": "kill", "target": "stage:1", "at_step": 6},
                     {"kind": "kill", "target": "stage:1", "at_step": 7}], restarts=2)
    result = harness("run", path, "--replays", "3", "--report-dir", str(tmp_path / "r"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "canonical histories 3 of 3 identical" in result.stdout
    events = history(tmp_path / "r", "one-step-apart")
    landed = [e for e in events if e.get("op") == "fault_landed"]
    assert [(e["step"], e["generation"], e["point"]) for e in landed] == [
        (6, 0, "before_step"), (7, 1, "before_step")]
    # Each kill found step N-1 complete and nothing of step N done: the step events before a
    # landing end at N-1, and the next restart goes back to the checkpoint of step 4.
    for entry in landed:
        at = events.index(entry)
        steps_before = [e["step"] for e in events[:at] if e.get("event") == "step"]
        assert steps_before[-1] == entry["step"] - 1
        after = events[at + 1:]
        restart = next(e for e in after if e.get("event") == "restart")
        assert restart["from_step"] == 4
        assert all(e.get("event") != "step" for e in after[:after.index(restart)])


def test_a_fault_before_an_action_lands_there_and_replays(tmp_path):
    path = scenario(tmp_path, "at-action",
                    [{"kind": "kill", "target": "stage:1", "at_step": 5, "at_action": "B1",
                      "signal": "SIGTERM"},
                     {"kind": "signal_storm", "at_step": 11, "signals": ["SIGUSR1", "SIGTSTP",
                                                                         "SIGCONT"],
                      "count": 300, "rate_per_s": 0}],
                    restarts=1, schedule="1f1b", microbatches=2)
    result = harness("run", path, "--replays", "2", "--report-dir", str(tmp_path / "r"))
    assert result.returncode == 0, result.stdout + result.stderr
    events = history(tmp_path / "r", "at-action")
    landed = [(e["point"], e["step"]) for e in events if e.get("op") == "fault_landed"]
    assert landed == [("1B1", 5), ("boundary", 11)]
    # Every signal of the storm is read at the boundary where it landed, after step 10: one
    # checkpoint there, no pause (the storm ends with SIGCONT).
    storm = next(i for i, e in enumerate(events) if e.get("point") == "boundary")
    assert events[storm + 1] == {"event": "checkpoint", "step": 10, "epoch": 0,
                                 "path": "checkpoints/step-00000010"}
    assert not [e for e in events if e.get("event") in ("paused", "resumed")]


def test_replay_reruns_a_report_to_the_same_digest_and_finds_a_difference(tmp_path):
    path = scenario(tmp_path, "to-replay", [{"kind": "kill", "target": "stage:0",
                                             "at_step": 6}], restarts=1, stages=2)
    first = harness("run", path, "--report-dir", str(tmp_path / "r"))
    assert first.returncode == 0, first.stdout + first.stderr
    report = tmp_path / "r" / "to-replay" / "report.json"
    data = json.loads(report.read_text())
    assert len(data["history_digest"]) == 64 and data["replay"]["seed"] == 3
    again = harness("replay", str(report))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "same history, same verdict" in again.stdout
    assert (report.parent / "replay" / "to-replay" / "report.json").exists()
    # A report whose history was different: the replay says where they part.
    landed = next(e for e in data["canonical_history"] if e.get("op") == "fault_landed")
    landed["step"] = 5
    data["history_digest"] = "0" * 64
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(data))
    differs = harness("replay", str(tampered), "--report-dir", str(tmp_path / "t"))
    assert differs.returncode == 1, differs.stdout
    assert '"step": 5' in differs.stdout and '"step": 6' in differs.stdout


def test_replay_of_something_that_is_not_a_report_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    result = harness("replay", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a report" in result.stderr
    missing = harness("replay", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "no such report" in missing.stderr
