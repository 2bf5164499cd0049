"""The harness catches a broken system: each planted bug makes a scenario fail with the right
check and message, and the fuzzer finds a bug that only shows under a restart."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from pipetrain_harness.runner import run_scenario
from pipetrain_harness.scenario import load_scenario, scenario_to_toml
from tests.helpers import REPO, cli_env

HARNESS = [sys.executable, "-P", "-m", "pipetrain_harness"]


def scenario_file(tmp_path, name: str, bug: str):
    plan = {
        "name": name, "description": f"planted bug {bug}", "seed": 1,
        # Slow enough that the 0.2 s monitor samples every worker before and after the leak:
        # the digits run is otherwise over in a few tenths of a second.
        "step_delay_s": 0.02,
        "train": {"stages": 3, "epochs": 1},
        "faults": [{"kind": "planted_bug", "bug": bug, "stage": 1, "at_step": 3}],
        "expect": {"equivalence": "bitwise", "no_leaks": True, "restarts": 0},
    }
    path = tmp_path / f"{name}.toml"
    path.write_text(scenario_to_toml(plan))
    return load_scenario(path)


@pytest.mark.parametrize("bug,check,needle", [
    ("wrong_gradient", "equivalence", "differ"),
    ("leak_fd", "no_leaks", "fd leak"),
    ("leak_child", "no_leaks", "process left behind"),
])
def test_planted_bug_is_reported(tmp_path, bug, check, needle):
    scenario = scenario_file(tmp_path, f"planted-{bug.replace('_', '-')}", bug)
    verdict, results, report, reproduce = run_scenario(scenario, report_dir=tmp_path / "reports")
    assert verdict == "invalid"
    failed = {r.name: r for r in results if r.status == "invalid"}
    assert check in failed, results
    assert needle in failed[check].message, failed[check].message
    assert reproduce.startswith("python -m pipetrain_harness run ")
    assert str(scenario.path) in reproduce
    assert (tmp_path / "reports" / scenario.name / "report.html").exists()


def test_a_correct_run_is_valid(tmp_path):
    plan = {"name": "clean", "description": "no fault", "seed": 1,
            "train": {"stages": 2, "epochs": 1}, "faults": [],
            "expect": {"equivalence": "bitwise", "restarts": 0}}
    path = tmp_path / "clean.toml"
    path.write_text(scenario_to_toml(plan))
    verdict, results, _, _ = run_scenario(load_scenario(path), report_dir=tmp_path / "reports")
    assert verdict == "valid", results


def test_fuzzer_finds_the_planted_restart_bug_and_saves_it(tmp_path):
    """`stale_restart` drops stage 0's optimizer state on a restart: only plans with a restart
    and a stateful optimizer reveal it. Seed 3's first plans include one."""
    save_dir = tmp_path / "found"
    result = subprocess.run(
        [*HARNESS, "fuzz", "--seconds", "40", "--seed", "3",
         "--plant", "stale_restart", "--report-dir", str(tmp_path / "reports"),
         "--save-dir", str(save_dir)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=cli_env(),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    saved = sorted(save_dir.glob("*.toml"))
    assert saved, result.stdout
    assert f"reproduce: python -m pipetrain_harness run {saved[0]}" in result.stdout
    # The saved plan carries its bug: the reproduce line alone fails again ...
    again = subprocess.run(
        [*HARNESS, "run", str(saved[0]), "--report-dir", str(tmp_path / "again")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=cli_env(),
    )
    assert again.returncode == 1, again.stdout
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
