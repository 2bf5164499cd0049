"""The harness catches a broken system: each planted bug makes a scenario fail with the right
check and message, and the fuzzer finds a bug that only shows under a restart."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest

from pipetrain_harness.runner import run_scenario
from pipetrain_harness.scenario import load_scenario, scenario_to_toml
from pipetrain_harness.shrink import size
from tests.helpers import REPO, cli_env

HARNESS = [sys.executable, "-P", "-m", "pipetrain_harness"]


def scenario_file(tmp_path, name: str, bug: str):
    plan = {
        "name": name, "description": f"planted bug {bug}", "seed": 1,
        # No step delay: the run is over in a few tenths of a second, too short for the 0.2 s
        # monitor to sample a worker before and after its leak; each process's own start and
        # exit samples still show it.
        "train": {"stages": 3, "epochs": 1},
        "faults": [{"kind": "planted_bug", "bug": bug, "stage": 1, "at_step": 3}],
        "expect": {"equivalence": "bitwise", "no_leaks": True, "restarts": 0},
    }
    path = tmp_path / f"{name}.toml"
    path.write_text(scenario_to_toml(plan))
    return load_scenario(path)


@pytest.mark.parametrize("bug,check,needle", [
    ("wrong_gradient", "equivalence", "differ"),
    ("leak_fd", "no_leaks", "(worker) exited with"),
    ("leak_child", "no_leaks", "process left behind"),
])
def test_planted_bug_is_reported(tmp_path, bug, check, needle):
    scenario = scenario_file(tmp_path, f"planted-{bug.replace('_', '-')}", bug)
    verdict, results, report, reproduce = run_scenario(scenario, report_dir=tmp_path / "reports")
    assert verdict == "invalid"
    failed = {r.name: r for r in results if r.status == "invalid"}
    assert check in failed, results
    assert needle in failed[check].message, failed[check].message
    report_path = tmp_path / "reports" / scenario.name / "report.json"
    assert reproduce == f"python -m pipetrain_harness replay {report_path.resolve()}"
    assert (tmp_path / "reports" / scenario.name / "report.html").exists()
    [landed] = [e for e in report["canonical_history"] if e.get("op") == "fault_landed"]
    assert (landed["kind"], landed["step"], landed["target"]) == ("planted_bug", 3,
                                                                  "stage:1:replica:0")


def test_a_correct_run_is_valid(tmp_path):
    plan = {"name": "clean", "description": "no fault", "seed": 1,
            "train": {"stages": 2, "epochs": 1}, "faults": [],
            "expect": {"equivalence": "bitwise", "restarts": 0}}
    path = tmp_path / "clean.toml"
    path.write_text(scenario_to_toml(plan))
    verdict, results, _, _ = run_scenario(load_scenario(path), report_dir=tmp_path / "reports")
    assert verdict == "valid", results


def test_fuzzer_finds_the_planted_restart_bug_shrinks_and_saves_it(tmp_path):
    """`stale_restart` drops stage 0's optimizer state on a restart: only plans with a restart
    after a checkpoint and a stateful optimizer reveal it. Seed 12's first plan is one (a
    gradient frame corrupted after the first checkpoint, momentum, and a delay that does not
    matter); a few shrinking runs make it smaller, and the saved plan replays to the same digest
    and the same invalid verdict."""
    save_dir = tmp_path / "found"
    result = subprocess.run(
        [*HARNESS, "fuzz", "--seconds", "1", "--seed", "12", "--shrink-runs", "6",
         "--plant", "stale_restart", "--report-dir", str(tmp_path / "reports"),
         "--save-dir", str(save_dir)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=cli_env(),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    saved = sorted(save_dir.glob("*.toml"))
    assert len(saved) == 1, result.stdout
    drawn = tomllib.loads((tmp_path / "reports" / "plans" / "fuzz-12-0.toml").read_text())
    shrunk = tomllib.loads(saved[0].read_text())
    assert size(shrunk) < size(drawn), result.stdout
    assert re.search(r"shrunk in [1-6] run\(s\): ", result.stdout), result.stdout
    replay_file = saved[0].with_suffix("").with_suffix(".replay.json")
    assert f"reproduce: python -m pipetrain_harness replay {replay_file}" in result.stdout
    recorded = json.loads(replay_file.read_text())
    assert recorded["verdict"] == "invalid"
    assert recorded["history_digest"][:16] in result.stdout
    # The reproduce line alone reaches the same history and the same invalid verdict ...
    again = subprocess.run(
        [*HARNESS, "replay", str(replay_file), "--report-dir", str(tmp_path / "again")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=cli_env(),
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "verdict invalid (recorded invalid)" in again.stdout
    # ... and the same plan without the planted bug passes.
    plan = tomllib.loads(saved[0].read_text())
    plan["faults"] = [f for f in plan["faults"] if f["kind"] != "planted_bug"]
    fixed_path = tmp_path / "fixed.toml"
    fixed_path.write_text(scenario_to_toml(plan))
    fixed = subprocess.run(
        [*HARNESS, "run", str(fixed_path), "--report-dir", str(tmp_path / "fixed")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=cli_env(),
    )
    assert fixed.returncode == 0, fixed.stdout
