"""``pipetrain``: the command line of the contract.

User mistakes (bad options, configs, datasets) exit 2 with one line on stderr and no traceback;
a failed run exits 1 with a clear message; a run stopped on request exits 0.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

# Before numpy loads (the imports below): the coordinator must stay the only thread of its
# process, so that every control signal lands on its main thread (see
# pipetrain.runtime.signals: handlers running on two threads at once could reorder a SIGTSTP
# and the SIGCONT after it). BLAS would
# otherwise start a thread pool at import. `reference --blas-threads N` still gets N threads
# (threadpoolctl raises the count); stage workers get theirs from the coordinator.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import pipetrain  # noqa: E402
from pipetrain.config import (  # noqa: E402
    BALANCES,
    DTYPES,
    SCHEDULES,
    TRANSPORTS,
    TrainConfig,
)
from pipetrain.data.datasets import NORMALIZATIONS  # noqa: E402
from pipetrain.nn.optim import OPTIMIZERS  # noqa: E402
from pipetrain.run.storage import StorageError  # noqa: E402
from pipetrain.status import ACTIVE_STATES, ExitCode, UserError  # noqa: E402
from pipetrain.threads import CONTROL_SIGNALS  # noqa: E402
from pipetrain.training import sample  # noqa: E402

D = TrainConfig  # the defaults every option's help text shows


class UsageError(UserError):
    """A mistake on the command line: reported in one line, exit 2."""


def suggestion(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean '--epochs'?)`` when ``word`` is close to one of ``choices``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--epoch 1` is a typo, not `--epochs 1`
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2))
            message += suggestion(match.group(1), choices)
        raise UsageError(message)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # The unknown option belongs to the subcommand: suggest from its options.
            parser = getattr(self, "subcommands", {}).get(getattr(parsed, "command", None), self)
            options = list(parser._option_string_actions)
            first = next((e for e in extras if e.startswith("-")), extras[0])
            name = first.split("=", 1)[0]
            self.error(f"unrecognized arguments: {' '.join(extras)}"
                       + (suggestion(name, options) if name.startswith("-") else ""))
        return parsed


# (option, type or action, help); the default comes from TrainConfig.
RUN_OPTIONS: list[tuple[str, Any, str]] = [
    ("--dataset", str, "digits or sort (built in), or a .csv / .npz / .txt file"),
    ("--layers", str, "layer sizes, input first, e.g. 64,128,10 (or [[model]] tables in the "
     "config file)"),
    ("--stages", int, "pipeline stages, one process each"),
    ("--replicas", int, "data-parallel copies of the pipeline"),
    ("--microbatches", int, "micro-batches per replica per step"),
    ("--schedule", SCHEDULES, "pipeline schedule"),
    ("--virtual-stages", int, "interleaved: model pieces per stage, stage s holding pieces s, "
     "s+S, ... (Megatron's virtual pipeline stages)"),
    ("--epochs", int, "epochs to train (may grow on --resume)"),
    ("--batch-size", int, "global batch; an epoch's last incomplete batch is dropped"),
    ("--lr", float, "learning rate"),
    ("--optimizer", tuple(OPTIMIZERS), "optimizer (momentum: 0.9)"),
    ("--dtype", DTYPES, "floating-point type of parameters and data"),
    ("--seed", int, "seeds initialisation, split, shuffle and augmentation"),
    ("--checkpoint-every", int, "checkpoint every K steps (0: only on request)"),
    ("--keep-checkpoints", int, "newest checkpoints kept"),
    ("--max-restarts", int, "worker-group restarts before the run fails"),
    ("--heartbeat-timeout", float, "seconds without a heartbeat before a worker counts as hung"),
    ("--holdout", float, "fraction held out for evaluation (0: train on all)"),
    ("--normalize", NORMALIZATIONS, "file datasets: statistics from the training split"),
    ("--transport", TRANSPORTS, "pipe, or mpi under mpirun"),
    ("--loader-threads", int, "data-loading threads per stage (0: the main thread loads)"),
    ("--prefetch", int, "micro-batches loaded ahead"),
    ("--balance", BALANCES, "cut stages by parameter count or by measured time"),
    ("--blas-threads", int, "BLAS threads per process (1 keeps kernels reproducible)"),
]


def _add_run_options(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG.toml",
                        help="TOML config file with the same keys in snake_case "
                        "(default: the built-in digits example)")
    for option, kind, text in RUN_OPTIONS:
        default = getattr(D, option[2:].replace("-", "_"))
        if option == "--virtual-stages":
            default = "2 with --schedule interleaved"
        if option == "--loader-threads":
            default = "0 for micro-batches of up to 64 KiB without --augment, else 2"
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        extra = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        parser.add_argument(option, help=f"{text} (default: {default})",
                            metavar=None if isinstance(kind, tuple) else option[2:].upper()
                            .replace("-", "_"), **extra)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="seeded augmentation: shifts and noise for the digits "
                        f"(default: {str(D.augment).lower()})")
    parser.add_argument("--run-dir", metavar="DIR",
                        help=f"where the run directory goes (default: runs/{command}-<time>)")
    if command == "train":
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in --run-dir from its newest checkpoint")
        parser.add_argument("--trace", action="store_true", default=None,
                            help="record every process's actions, sends and receives into "
                            "RUN_DIR/trace.json (Perfetto; pipetrain trace RUN_DIR draws it)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress output; the run directory is still printed")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard scalars to RUN_DIR/tensorboard "
                        "(the tensorboard extra)")


EPILOG = """exit status: 0 done or stopped on request, 1 the run failed, 2 bad usage, config or
data, 130 aborted by a second Ctrl-C.  Python: pipetrain.train(config) -> RunResult."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pipetrain", epilog=EPILOG,
                     description="Train a neural network across OS processes (pipeline stages "
                     "and data-parallel replicas), bitwise equal to one process.")
    parser.add_argument("--version", action="version",
                        version=f"pipetrain {pipetrain.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                     metavar="COMMAND")
    parser.subcommands = {}

    def add(name: str, text: str) -> argparse.ArgumentParser:
        sub = parser.subcommands[name] = commands.add_parser(name, help=text, description=text)
        return sub

    _add_run_options(add("train", "train across stage processes"), "train")
    _add_run_options(add("reference", "the same run in one process (the oracle)"), "reference")
    for name, text in (("pause", "pause at the next step boundary (SIGTSTP)"),
                       ("resume", "resume a paused run (SIGCONT)"),
                       ("checkpoint", "checkpoint at the next step boundary (SIGUSR1)"),
                       ("stop", "checkpoint and stop (SIGTERM)")):
        add(name, text).add_argument("run_dir", metavar="RUN_DIR")
    status = add("status", "state, progress, elapsed time, ETA and live processes of a run")
    status.add_argument("run_dir", metavar="RUN_DIR")
    status.add_argument("--json", action="store_true", help="one JSON object instead")
    plot = add("plot", "a PNG of a run: loss, held-out metric, throughput (the plot extra)")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("-o", "--output", metavar="PNG", help="default: RUN_DIR/plot.png")
    trace = add("trace", "a --trace run's pipeline timeline (PNG) and per-stage compute, "
                "wait and bubble against the ideal pipeline")
    trace.add_argument("run_dir", metavar="RUN_DIR")
    trace.add_argument("-o", "--output", metavar="PNG", help="default: RUN_DIR/timeline.png")
    trace.add_argument("--steps", metavar="A-B", help="the steps drawn (default: three from "
                       "the middle of the run)")
    trace.add_argument("--json", action="store_true", help="print the summary as JSON")
    report = add("report", "the harness's HTML report of any run (the harness extra)")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("-o", "--output", metavar="HTML", help="default: RUN_DIR/report.html")
    report.add_argument("--reference", metavar="DIR",
                        help="a reference run directory to compare with (default: none)")
    sample.add_arguments(add("sample", sample.HELP))
    add("bench", "the benchmark suite: pipetrain bench [--quick] [--repeats N] [--out DIR]")
    completion = add("completion", "print the shell completion script: "
                     "eval \"$(pipetrain completion bash)\"")
    completion.add_argument("shell", choices=("bash", "zsh"))
    return parser


SIGNALS = {
    "pause": signal.SIGTSTP, "resume": signal.SIGCONT,
    "checkpoint": signal.SIGUSR1, "stop": signal.SIGTERM,
}


def _read_run(run_dir: str) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{run_dir}: not a run directory (no run.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable ({exc})") from None


def send_control(command: str, run_dir: str) -> int:
    """Signal the run's coordinator: only the process holding the run directory's lock, if it
    is the pid run.json names and started when run.json says (``pipetrain.run.lock``)."""
    from pipetrain.run.lock import signal_coordinator

    state = _read_run(run_dir)
    pid = state.get("coordinator_pid")
    if state.get("state") not in ACTIVE_STATES or not pid:
        raise UsageError(f"{run_dir}: the run is not running (state: {state.get('state')})")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise UsageError(f"{run_dir}/run.json: coordinator_pid {pid!r} is not a pid")
    ticks = state.get("coordinator_start_ticks")
    signal_coordinator(Path(run_dir), pid, ticks if isinstance(ticks, int) else None,
                       SIGNALS[command])
    print(f"sent {SIGNALS[command].name} to coordinator pid {pid}")
    return ExitCode.OK


def show_status(run_dir: str, as_json: bool) -> int:
    from pipetrain.run.rundir import read_events
    from pipetrain.run.summary import format_summary, summarize

    state = _read_run(run_dir)
    try:
        events = read_events(run_dir)
    except (OSError, ValueError):
        events = []
    summary = summarize(state, events)
    print(json.dumps(summary) if as_json else format_summary(summary, run_dir))
    return ExitCode.OK


def plot(run_dir: str, output: str | None) -> int:
    from pipetrain.run.plot import plot_run
    from pipetrain.run.rundir import read_events

    _read_run(run_dir)
    try:
        events = read_events(run_dir)
    except FileNotFoundError:
        raise UsageError(f"{run_dir}: no events.jsonl; nothing to plot") from None
    out = Path(output) if output else Path(run_dir) / "plot.png"
    print(f"plot: {plot_run(events, out, title=str(run_dir))}")
    return ExitCode.OK


def _delegate(module: str, args: list[str], missing: str) -> int:
    """Run ``python -m module ARGS`` (the harness and the benchmarks sit above the system,
    which never imports them: a subprocess is the only way down to up)."""
    import importlib.util

    if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
        raise UsageError(missing)
    code = subprocess.call([sys.executable, "-P", "-m", module, *args])
    return code if code >= 0 else 128 - code


def report(run_dir: str, output: str | None, reference: str | None) -> int:
    _read_run(run_dir)
    args = ["report", run_dir, *(["-o", output] if output else []),
            *(["--reference", reference] if reference else [])]
    return _delegate("pipetrain_harness.__main__", args,
                     "report: needs the harness (pip install 'pipetrain[harness]')")


def run_bench(args: list[str]) -> int:
    """``pipetrain bench ARGS``: ``python -m bench.run ARGS`` in a source checkout (results
    into ``bench/``), else the installed suite, ``pipetrain_harness.bench`` (results into
    ``./bench-results``)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "bench" / "run.py").is_file() and (root / "pyproject.toml").is_file():
        code = subprocess.call([sys.executable, "-m", "bench.run", *args], cwd=root)
        return code if code >= 0 else 128 - code
    return _delegate("pipetrain_harness.bench.run", args,
                     "bench: needs the harness (pip install 'pipetrain[harness]')")


def completion(shell: str) -> int:
    import argcomplete

    print(argcomplete.shellcode(["pipetrain"], shell=shell))
    return ExitCode.OK


def prepare_run(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The resolved config and run directory of a train or reference command, checked."""
    prepared = _prepare(args)
    return prepared.config, prepared.run_dir


def _prepare(args: argparse.Namespace):  # -> pipetrain.training.api.Prepared
    from pipetrain.run.lock import busy, lock_holder
    from pipetrain.training.api import prepare

    if args.run_dir and Path(args.run_dir).exists() and not Path(args.run_dir).is_dir():
        raise UsageError(f"{args.run_dir}: cannot be used as a run directory (it is a file, "
                         "not a directory)")
    if args.run_dir and lock_holder(Path(args.run_dir)) is not None:  # a live run: at once
        raise busy(Path(args.run_dir), lock_holder(Path(args.run_dir)))
    options = {key: getattr(args, key, None) for key in TrainConfig.__dataclass_fields__}
    return prepare(args.command, args.config, options, resume=getattr(args, "resume", False))


def train_or_reference(args: argparse.Namespace) -> int:
    from pipetrain.training.api import execute

    if args.command == "train":  # --transport mpi: every rank of `mpirun -n N ...` comes here
        from pipetrain.training import mpi_run

        if mpi_run.launched_by_mpirun():
            return mpi_run.main(lambda: prepare_run(args), quiet=args.quiet,
                                resume=args.resume)
    if args.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboardX") is None:
            raise UsageError("--tensorboard needs tensorboardX "
                             "(pip install 'pipetrain[tensorboard]')")
    prepared = _prepare(args)
    if args.command == "train" and prepared.config.transport == "mpi":
        raise UsageError(mpi_run.launch_hint(prepared.config))
    # Printed first, even with --quiet: the handle for `pipetrain status|stop|plot RUN_DIR`.
    print(f"run directory: {prepared.run_dir}", flush=True)
    if args.command == "train":
        # Outside the run's own handling (installed first thing in run_training and
        # restored when it returns) a late control signal must not kill or stop the
        # process on its way out: its work is done, the exit status must stand.
        for sig in CONTROL_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    return execute(prepared, quiet=args.quiet, tensorboard=args.tensorboard)


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options are bench.run's, passed through unparsed
        return run_bench(argv[1:])
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # a shell asking for completions: answer and exit
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if args.command in SIGNALS:
        return send_control(args.command, args.run_dir)
    match args.command:
        case "status":
            return show_status(args.run_dir, args.json)
        case "plot":
            return plot(args.run_dir, args.output)
        case "trace":
            from pipetrain.run.trace_report import show_trace

            return show_trace(args.run_dir, args.output, args.steps, as_json=args.json)
        case "report":
            return report(args.run_dir, args.output, args.reference)
        case "completion":
            return completion(args.shell)
        case "sample":
            return sample.run_sample(args)
    return train_or_reference(args)


def main(argv: list[str] | None = None) -> NoReturn:
    try:
        status = run(argv)
    except UserError as exc:
        print(f"pipetrain: error: {exc}", file=sys.stderr)
        status = ExitCode.USAGE
    except StorageError as exc:  # a write the disk refused (the run itself reports its own)
        print(f"pipetrain: error: {exc}", file=sys.stderr)
        status = ExitCode.FAILED
    except KeyboardInterrupt:
        print("pipetrain: aborted", file=sys.stderr)
        status = ExitCode.ABORTED
    sys.exit(status)


if __name__ == "__main__":
    main()
