"""``python -m pipetrain_harness run|replay|list|fuzz|report``: the harness's command line.

Exit status: 0 when every expectation held (and, with ``--replays``, every replay's canonical
history was the same; for ``replay``, the same history and verdict as the report), 1 when a
scenario failed (its reproduce command is printed), 2 for bad usage, a bad scenario file or a
report that cannot be replayed (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from pipetrain_harness.faults.base import FaultError
from pipetrain_harness.scenario import ScenarioError, load_all, load_scenario

HERE = Path(__file__).resolve().parent


def default_scenarios() -> Path:
    """The scenarios shipped in the wheel (``pipetrain_harness/scenarios``), or those of the
    source tree (``scenarios/`` beside ``harness/``) when running from a checkout."""
    for candidate in (HERE / "scenarios", HERE.parent / "scenarios"):
        if candidate.is_dir():
            return candidate
    return HERE / "scenarios"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipetrain_harness", description="pipetrain's scenario harness")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="run scenario files; exit 0 iff every one held")
    run.add_argument("paths", nargs="+", type=Path)
    run.add_argument("--seed", type=int, help="override each scenario's seed")
    run.add_argument("--report-dir", type=Path, default=Path("reports"))
    run.add_argument("--replays", type=_positive, default=1, metavar="N",
                     help="run each scenario N times; fail unless every canonical history is "
                          "the same")
    again = commands.add_parser("replay", help="rerun a report's scenario; exit 0 iff it "
                                               "reaches the same history and verdict")
    again.add_argument("report", type=Path, help="a report.json (or a fuzzer's .replay.json)")
    again.add_argument("--report-dir", type=Path,
                       help="where the rerun goes (default: replay/ beside the report)")
    listing = commands.add_parser("list", help="the scenarios in a directory (default: the "
                                  "ones shipped with the package)")
    listing.add_argument("directory", nargs="?", type=Path, default=None)
    fuzz = commands.add_parser("fuzz", help="random fault plans; failures saved as scenarios")
    fuzz.add_argument("--seconds", type=float, required=True)
    fuzz.add_argument("--seed", type=int, default=0)
    fuzz.add_argument("--report-dir", type=Path, default=Path("reports/fuzz"))
    fuzz.add_argument("--save-dir", type=Path, default=Path("reports/fuzz/found"),
                      help="where failing plans are saved as scenarios (default: "
                      "reports/fuzz/found, outside the source tree)")
    fuzz.add_argument("--plant", help="switch on a planted system bug the fuzzer should find")
    fuzz.add_argument("--shrink-runs", type=int, default=40, metavar="N",
                      help="at most N runs spent shrinking a failing plan (0: save it as found)")
    report = commands.add_parser("report", help="report.html of any run directory")
    report.add_argument("run_dir", type=Path)
    report.add_argument("-o", "--output", type=Path, help="default: RUN_DIR/report.html")
    report.add_argument("--reference", type=Path, help="a reference run to compare with")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def command_run(args: argparse.Namespace) -> int:
    from pipetrain_harness.replay import counts, run_replays
    from pipetrain_harness.report import summary_table
    from pipetrain_harness.runner import run_scenario

    scenarios = []
    for path in args.paths:
        scenarios += load_all(path) if path.is_dir() else [load_scenario(path)]
    rows, failed = [], []
    for scenario in scenarios:
        print(f"== {scenario.name}: {scenario.description}", flush=True)
        if args.replays > 1:
            replays = run_replays(scenario, report_dir=args.report_dir, replays=args.replays,
                                  seed=args.seed)
            print(f"   {replays.summary()}", flush=True)
            rows.append({"scenario": scenario.name, "verdict": counts(replays.verdicts),
                         "failed": [] if replays.difference is None else ["replays"]})
            if replays.difference is not None or set(replays.verdicts) != {"valid"}:
                failed.append(replays.reproduce)
            continue
        verdict, results, report, reproduce = run_scenario(
            scenario, report_dir=args.report_dir, seed=args.seed
        )
        rows.append(report.get("summary", {"scenario": scenario.name, "verdict": verdict}))
        for result in results:
            if result.status != "valid":
                print(f"   {result.status}: {result.name}: {result.message}")
        if "html" in report:
            print(f"   report: {report['html']}", flush=True)
        if verdict != "valid":
            failed.append(reproduce)
    print(summary_table(rows))
    print(f"reports: {args.report_dir}")
    for reproduce in failed:
        print(f"reproduce: {reproduce}")
    return 1 if failed else 0


def command_replay(args: argparse.Namespace) -> int:
    from pipetrain_harness.replay import replay

    return replay(args.report, report_dir=args.report_dir)


def command_list(args: argparse.Namespace) -> int:
    for scenario in load_all(args.directory or default_scenarios()):
        print(f"{scenario.name:32} {scenario.description}")
    return 0


def command_fuzz(args: argparse.Namespace) -> int:
    from pipetrain_harness.fuzz import fuzz

    return fuzz(seconds=args.seconds, seed=args.seed, report_dir=args.report_dir,
                save_dir=args.save_dir, plant=args.plant, shrink_runs=args.shrink_runs)


def command_report(args: argparse.Namespace) -> int:
    from pipetrain_harness.report import write_run_report

    if not (args.run_dir / "run.json").is_file():
        raise UsageError(f"{args.run_dir}: not a run directory (no run.json)")
    if args.reference is not None and not (args.reference / "events.jsonl").is_file():
        raise UsageError(f"{args.reference}: not a run directory (no events.jsonl)")
    print(f"report: {write_run_report(args.run_dir, args.output, args.reference)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        handler = {"run": command_run, "replay": command_replay, "list": command_list,
                   "fuzz": command_fuzz, "report": command_report}
        return handler[args.command](args)
    except (UsageError, ScenarioError, FaultError) as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
