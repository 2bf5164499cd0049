"""Running a scenario again and proving it went the same way.

* :func:`run_replays` (``run X --replays N``): N runs of one scenario; they pass only if every
  run's canonical history is the first one's (and each verdict holds as usual). The first
  difference is printed: which entry, and what each run had there.
* :func:`replay` (``replay REPORT.json``): a report carries everything its run needs
  (``replay``: the scenario as data, planted bugs included, the seed, the environment that picks
  BLAS kernels and threads) and the digest of its canonical history; this runs it again into a
  directory of its own and says whether it reached the same digest and the same verdict. It is
  the command a failure prints to reproduce itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipetrain_harness.canonical import describe_difference
from pipetrain_harness.scenario import Scenario, ScenarioError, load_scenario, scenario_to_toml


@dataclass
class Replays:
    """N runs of one scenario: their verdicts, digests, and where the first odd one out
    differs from the first run (None: all identical)."""

    name: str
    verdicts: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    difference: str | None = None
    reproduce: str = ""

    @property
    def identical(self) -> int:
        return sum(d == self.digests[0] for d in self.digests)

    def summary(self) -> str:
        n = len(self.digests)
        if self.difference is None:
            return (f"{self.name}: canonical histories {n} of {n} identical "
                    f"(digest {self.digests[0][:16]}), verdicts {counts(self.verdicts)}")
        return (f"{self.name}: canonical histories {self.identical} of {n} identical to the "
                f"first; {self.difference}")


def counts(verdicts: list[str]) -> str:
    return ", ".join(f"{verdicts.count(v)} {v}" for v in sorted(set(verdicts)))


def run_replays(scenario: Scenario, *, report_dir: Path, replays: int,
                seed: int | None = None) -> Replays:
    """Runs ``scenario`` ``replays`` times: the first into ``report_dir``, the others into
    ``report_dir/replays/K``; the reference run is built once for all of them."""
    from pipetrain_harness.runner import run_scenario

    outcome = Replays(scenario.name)
    first_history: list[dict[str, Any]] | None = None
    cache = Path(report_dir).resolve() / ".references"
    for index in range(replays):
        directory = Path(report_dir) if index == 0 else Path(report_dir) / "replays" / str(index)
        verdict, _results, report, reproduce = run_scenario(
            scenario, report_dir=directory, seed=seed, cache_dir=cache)
        outcome.verdicts.append(verdict)
        outcome.digests.append(report["history_digest"])
        if index == 0:
            first_history, outcome.reproduce = report["canonical_history"], reproduce
        elif outcome.difference is None and report["history_digest"] != outcome.digests[0]:
            outcome.difference = (f"run {index + 1} differs at " + describe_difference(
                first_history, report["canonical_history"], ("run 1", f"run {index + 1}")))
    return outcome


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment (which the run inherits), then restored."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such report") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not a JSON report ({exc})") from None
    if not isinstance(data, dict) or "replay" not in data or "history_digest" not in data:
        raise ScenarioError(f"{path}: not a report of this harness's (no replay information; "
                            f"reports written before replays existed cannot be replayed)")
    return data


def replay(path: Path, *, report_dir: Path | None = None) -> int:
    """0 if a rerun of the report's scenario reaches the same digest and verdict, else 1."""
    from pipetrain_harness.runner import run_scenario

    report = load_report(path)
    block = report["replay"]
    report_dir = Path(report_dir) if report_dir else Path(path).resolve().parent / "replay"
    report_dir.mkdir(parents=True, exist_ok=True)
    scenario_path = report_dir / f"{block['scenario']['name']}.toml"
    scenario_path.write_text(scenario_to_toml(block["scenario"]))
    scenario = load_scenario(scenario_path)
    versions = block.get("versions", {})
    import numpy

    if versions.get("numpy") not in (None, numpy.__version__):
        print(f"replay: note: recorded with numpy {versions['numpy']}, this is "
              f"{numpy.__version__}: kernels may differ", file=sys.stderr)
    with _environment(block.get("env", {})):
        verdict, results, again, _ = run_scenario(scenario, report_dir=report_dir,
                                                  seed=block["seed"])
    same_digest = again["history_digest"] == report["history_digest"]
    same_verdict = verdict == report.get("verdict")
    print(f"replay of {scenario.name} (seed {block['seed']}): verdict {verdict} "
          f"(recorded {report.get('verdict')}), history digest "
          f"{again['history_digest'][:16]} (recorded {report['history_digest'][:16]})")
    for result in results:
        if result.status != "valid":
            print(f"   {result.status}: {result.name}: {result.message}")
    if same_digest and same_verdict:
        print("replay: same history, same verdict")
        return 0
    if not same_digest:
        print("replay: the history differs at " + describe_difference(
            report.get("canonical_history", []), again["canonical_history"],
            ("the report", "the replay")))
    return 1
