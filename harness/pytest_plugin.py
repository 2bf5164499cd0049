"""Scenario files as pytest items: ``pytest -p pipetrain_harness.pytest_plugin scenarios/``.

Each ``*.toml`` under the given paths becomes one test that runs the scenario and fails with the
failed checks and the command that reproduces it. With pytest-xdist, scenarios run in parallel;
reference runs are cached under the report directory and shared between workers. With
``--replays N`` each scenario runs N times and also fails unless all N canonical histories are
identical (``tox -e scenarios-replays`` runs every scenario 5 times).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--report-dir", default="reports", help="where scenario reports go")
    parser.addoption("--replays", type=int, default=1,
                     help="run each scenario N times; fail unless the histories are identical")


def pytest_collect_file(parent: pytest.Collector, file_path: Path):
    # scenarios/found/ holds what `fuzz` saved: failures to reproduce and fix, run on purpose
    # (`python -m pipetrain_harness run scenarios/found/...`), not part of the suite until fixed.
    if file_path.suffix == ".toml" and "found" not in file_path.parent.parts[-1:]:
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


class ScenarioFile(pytest.File):
    def collect(self):
        from pipetrain_harness.scenario import load_scenario

        scenario = load_scenario(self.path)
        yield ScenarioItem.from_parent(self, name=scenario.name, scenario=scenario)


class ScenarioFailed(Exception):
    pass


class ScenarioItem(pytest.Item):
    def __init__(self, *, scenario, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scenario = scenario

    def runtest(self) -> None:
        from pipetrain_harness.runner import run_scenario

        report_dir = Path(self.config.getoption("--report-dir"))
        replays = self.config.getoption("--replays")
        if replays > 1:
            self._replays(report_dir, replays)
            return
        verdict, results, _report, reproduce = run_scenario(self.scenario, report_dir=report_dir)
        if verdict != "valid":
            lines = [f"{r.status}: {r.name}: {r.message}" for r in results if r.status != "valid"]
            raise ScenarioFailed("\n".join([*lines, f"reproduce: {reproduce}"]))

    def _replays(self, report_dir: Path, replays: int) -> None:
        from pipetrain_harness.replay import run_replays

        outcome = run_replays(self.scenario, report_dir=report_dir, replays=replays)
        if outcome.difference is not None or set(outcome.verdicts) != {"valid"}:
            raise ScenarioFailed(f"{outcome.summary()}\nreproduce: {outcome.reproduce}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ScenarioFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, 0, f"scenario {self.scenario.name}"
