"""``pipetrain``: the command line of the contract.

User mistakes (bad options, configs, datasets) exit 2 with one line on stderr and no traceback;
a failed run exits 1 with a clear message; a run stopped on request exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
    ConfigError,
    TrainConfig,
    build_config,
    load_toml,
)
from pipetrain.data.datasets import NORMALIZATIONS  # noqa: E402
from pipetrain.nn.optim import OPTIMIZERS  # noqa: E402
from pipetrain.status import ACTIVE_STATES, ExitCode, RunState, UserError  # noqa: E402
from pipetrain.threads import CONTROL_SIGNALS  # noqa: E402
from pipetrain.train import sample  # noqa: E402


class UsageError(UserError):
    """A mistake on the command line: reported in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config file (default: built-in example)")
    add = parser.add_argument
    add("--dataset", help="digits, or a .csv / .npz path")
    add("--layers", help="layer sizes, e.g. 64,128,10")
    add("--stages", type=int)
    add("--replicas", type=int)
    add("--microbatches", type=int)
    add("--schedule", choices=SCHEDULES)
    add("--epochs", type=int)
    add("--batch-size", type=int)
    add("--lr", type=float)
    add("--optimizer", choices=tuple(OPTIMIZERS))
    add("--dtype", choices=DTYPES)
    add("--seed", type=int)
    add("--checkpoint-every", type=int, help="checkpoint every K steps (0: never)")
    add("--keep-checkpoints", type=int)
    add("--max-restarts", type=int)
    add("--heartbeat-timeout", type=float, help="seconds")
    add("--holdout", type=float, help="fraction held out for evaluation")
    add("--normalize", choices=NORMALIZATIONS)
    add("--transport", choices=TRANSPORTS)
    add("--loader-threads", type=int)
    add("--prefetch", type=int)
    add("--augment", action=argparse.BooleanOptionalAction, default=None)
    add("--balance", choices=BALANCES)
    add("--blas-threads", type=int)
    add("--run-dir")
    add("--resume", action="store_true", help="continue the run in --run-dir")
    add("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pipetrain", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version",
                        version=f"pipetrain {pipetrain.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run_options(commands.add_parser("train", help="the distributed run"))
    _add_run_options(commands.add_parser("reference", help="the same run in one process"))
    for name, text in (("pause", "pause at the next step boundary"),
                       ("resume", "resume a paused run"),
                       ("checkpoint", "write a checkpoint at the next step boundary"),
                       ("stop", "checkpoint and stop")):
        commands.add_parser(name, help=text).add_argument("run_dir")
    commands.add_parser("bench", help="the benchmark suite: python -m bench.run [ARGS] "
                        "(--quick, --repeats N, --out DIR)")
    sample.add_parser(commands)
    status = commands.add_parser("status", help="state of a run")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true")
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    source = "options"
    if getattr(args, "resume", False) and args.run_dir:
        # A resumed run starts from the config it was started with; options still override.
        recorded = _read_run(args.run_dir).get("config", {})
        values.update({k: v for k, v in recorded.items() if k != "run_dir"})
        source = f"{args.run_dir}/run.json"
    if args.config:
        values.update(load_toml(args.config))
        source = args.config
    for key in TrainConfig.__dataclass_fields__:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    if args.command == "reference":
        stages = values.get("stages", 1)
        if not isinstance(stages, int) or stages < 1:
            raise ConfigError(f"{source}: stages: must be >= 1, got {stages!r}")
        values["stages"] = 1  # one process by definition; the run's stage count is moot here
    return build_config(values, source=source)


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
    state = _read_run(run_dir)
    pid = state.get("coordinator_pid")
    if state.get("state") not in ACTIVE_STATES or not pid:
        raise UsageError(f"{run_dir}: the run is not running (state: {state.get('state')})")
    try:
        os.kill(int(pid), SIGNALS[command])
    except ProcessLookupError:
        raise UsageError(f"{run_dir}: coordinator pid {pid} is gone") from None
    print(f"sent {SIGNALS[command].name} to coordinator pid {pid}")
    return ExitCode.OK


def show_status(run_dir: str, as_json: bool) -> int:
    state = _read_run(run_dir)
    summary = {
        key: state.get(key)
        for key in ("state", "step", "total_steps", "epoch", "last_loss", "samples_per_s",
                    "accuracy", "coordinator_pid", "worker_pids", "last_checkpoint")
    }
    if as_json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:16} {value}")
    return ExitCode.OK


def prepare_run(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The resolved config and run directory of a train or reference command, checked."""
    from pipetrain.run.rundir import default_run_dir

    config = resolve_config(args)
    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(args.command)
    if args.resume and not config.run_dir:
        raise UsageError("--resume needs --run-dir of the run to continue")
    if args.resume and _read_run(str(run_dir)).get("state") == RunState.DONE:
        raise UsageError(f"{run_dir}: the run already finished; nothing to resume")
    if not args.resume and (run_dir / "events.jsonl").exists():
        raise UsageError(f"{run_dir}: already holds a run (use --resume, or another --run-dir)")
    return config.replace(run_dir=str(run_dir)), run_dir


def run_bench(args: list[str]) -> int:
    """``pipetrain bench ARGS`` is ``python -m bench.run ARGS`` from the source checkout."""
    import subprocess

    roots = [Path(__file__).resolve().parent.parent, Path.cwd()]
    root = next((r for r in roots if (r / "bench" / "run.py").is_file()), None)
    if root is None:
        raise UsageError("bench: needs the source checkout (bench/run.py not found next to "
                         "the system package or in the current directory)")
    code = subprocess.call([sys.executable, "-m", "bench.run", *args], cwd=root)
    return code if code >= 0 else 128 - code


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options are bench.run's, passed through unparsed
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in SIGNALS:
        return send_control(args.command, args.run_dir)
    if args.command == "status":
        return show_status(args.run_dir, args.json)
    if args.command == "sample":
        return sample.run_sample(args)
    from threadpoolctl import threadpool_limits

    if args.command == "train":  # --transport mpi: every rank of `mpirun -n N ...` comes here
        from pipetrain.train import mpi_run

        if mpi_run.launched_by_mpirun():
            return mpi_run.main(lambda: prepare_run(args), quiet=args.quiet,
                                resume=args.resume)
    config, run_dir = prepare_run(args)
    if args.command == "train" and config.transport == "mpi":
        raise UsageError(mpi_run.launch_hint(config))
    # The coordinator only evaluates: its BLAS stays single-threaded (see the top of this file).
    with threadpool_limits(config.blas_threads if args.command == "reference" else 1):
        if args.command == "reference":
            from pipetrain.train.reference import run_reference

            status = run_reference(config, run_dir, quiet=args.quiet)
        else:
            from pipetrain.train.trainer import run_training

            # Outside the run's own handling (installed first thing in run_training and
            # restored when it returns) a late control signal must not kill or stop the
            # process on its way out: its work is done, the exit status must stand.
            for sig in CONTROL_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            status = run_training(config, run_dir, quiet=args.quiet, resume=args.resume)
    if not args.quiet:
        print(f"run directory: {run_dir}")
    return status


def main(argv: list[str] | None = None) -> NoReturn:
    try:
        status = run(argv)
    except UserError as exc:
        print(f"pipetrain: error: {exc}", file=sys.stderr)
        status = ExitCode.USAGE
    except KeyboardInterrupt:
        print("pipetrain: aborted", file=sys.stderr)
        status = ExitCode.ABORTED
    sys.exit(status)


if __name__ == "__main__":
    main()
