"""Shrinking a failing fault plan to a minimal one that still fails the same way (as hypothesis
shrinks a failing example): fewest faults, earliest and plainest points, smallest config.

Greedy and deterministic: the candidates of a plan are tried in a fixed order (drop a fault;
move a fault's point earlier or make it plainer; fewer stages, replicas, epochs, micro-batches),
and the first one that fails with the same failed checks replaces the plan, until no candidate
does or the budget of runs is spent. Each candidate's expectations are recomputed for its faults
(``fuzz.finish_plan``), so a smaller plan is judged by what *it* should do. A candidate that is
not a valid scenario (a target beyond the smaller grid, two faults at one moment) is skipped
without a run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipetrain_harness.scenario import ScenarioError, load_scenario, scenario_to_toml

POINT_DETAILS = ("at_action", "at_reduce", "at_microbatch", "when")


def size(plan: dict[str, Any]) -> tuple[int, ...]:
    """Smaller is simpler: faults, the sum of their points (a higher stage or replica counts
    as a later point), grid, epochs, micro-batches."""
    train = plan["train"]
    points = sum(f.get("at_step", 0) + f.get("after_checkpoint", 0) + _where(f)
                 + sum(1 for key in POINT_DETAILS if key in f) for f in plan["faults"])
    return (len(plan["faults"]), points, train.get("stages", 3) * train.get("replicas", 1),
            train.get("epochs", 20), train.get("microbatches", 4))


def _where(fault: dict[str, Any]) -> int:
    """How far up the grid a fault's process is (0: stage 0 of replica 0)."""
    numbers = [int(part) for part in fault.get("target", "").split(":") if part.isdigit()]
    if fault.get("link"):
        numbers = [int(part) for part in fault["link"].split("->")]
    return sum(numbers) + fault.get("replica", 0)


def describe_size(plan: dict[str, Any]) -> str:
    train = plan["train"]
    faults = ", ".join(_describe_fault(f) for f in plan["faults"]) or "none"
    return (f"{len(plan['faults'])} fault(s) [{faults}], {train.get('stages', 3)} stage(s) x "
            f"{train.get('replicas', 1)} replica(s), {train.get('epochs', 20)} epoch(s), "
            f"{train.get('microbatches', 4)} micro-batch(es)")


def _describe_fault(fault: dict[str, Any]) -> str:
    where = [f"{key}={fault[key]}" for key in ("target", "link", "at_step", "at_action",
                                               "at_reduce", "at_resume", "after_checkpoint",
                                               "phase", "at_microbatch", "when", "bug")
             if key in fault]
    return f"{fault['kind']}({' '.join(where)})"


def candidates(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Simpler plans, most promising first."""
    faults = plan["faults"]
    for index in range(len(faults)):  # fewest faults
        yield {**plan, "faults": faults[:index] + faults[index + 1:]}
    for index, fault in enumerate(faults):  # earliest, plainest points
        for simpler in _simpler_points(fault):
            yield {**plan, "faults": [*faults[:index], simpler, *faults[index + 1:]]}
    train = plan["train"]
    for key, smallest in (("stages", 1), ("replicas", 1), ("epochs", 1), ("microbatches", 1)):
        value = train.get(key)
        if value is not None and value > smallest:
            for smaller in sorted({smallest, value - 1}):
                yield {**plan, "train": {**train, key: smaller}}


def _simpler_points(fault: dict[str, Any]) -> Iterator[dict[str, Any]]:
    target = fault.get("target", "")
    if target.startswith("stage:"):  # the lowest stage and replica: room for a smaller grid
        parts = target.split(":")
        lower = "stage:0" + (f":replica:{parts[3]}" if len(parts) == 4 else "")
        if lower != target and not target.startswith("stage:0"):
            yield {**fault, "target": lower}
        if len(parts) == 4 and parts[3] != "0":
            yield {**fault, "target": f"stage:{parts[1]}:replica:0"}
    if fault.get("link") not in (None, "0->1", "1->0"):
        sender, receiver = (int(x) for x in fault["link"].split("->"))
        yield {**fault, "link": "0->1" if receiver > sender else "1->0"}
    if fault.get("replica"):
        yield {**fault, "replica": 0}
    for key in POINT_DETAILS:
        if key in fault:
            yield {k: v for k, v in fault.items() if k != key}
    for key, lowest in (("at_step", 1), ("after_checkpoint", 0)):
        value = fault.get(key)
        if value is not None and value > lowest:
            for earlier in sorted({lowest, (value + lowest) // 2, value - 1}):
                if earlier < value:
                    yield {**fault, key: earlier}


def shrink(plan: dict[str, Any], report: dict[str, Any], failing: list[str], *,
           report_dir: Path, max_runs: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(minimal plan, the report of its run, runs spent); ``failing``: the checks the
    original plan failed, which every accepted candidate must fail too, and only them."""
    from pipetrain_harness.fuzz import finish_plan
    from pipetrain_harness.runner import run_scenario

    work = Path(report_dir) / "shrink"
    work.mkdir(parents=True, exist_ok=True)
    best, best_report, runs = copy.deepcopy(plan), report, 0
    improved = True
    while improved and runs < max_runs:
        improved = False
        for candidate in candidates(best):
            if runs >= max_runs:
                break
            candidate = finish_plan({**candidate, "name": f"{plan['name']}-min"})
            if size(candidate) >= size(best):
                continue
            path = work / f"{candidate['name']}.toml"
            path.write_text(scenario_to_toml(candidate))
            try:
                scenario = load_scenario(path)
            except ScenarioError:
                continue  # not a plan the run can reach (a target past a smaller grid, ...)
            runs += 1
            verdict, results, again, _ = run_scenario(scenario, report_dir=work)
            if sorted(r.name for r in results if r.status != "valid") == failing:
                best, best_report, improved = candidate, again, True
                print(f"   shrink run {runs}: still fails: {describe_size(best)}", flush=True)
                break
    return best, best_report, runs
