"""The Python API: ``pipetrain.train(config)`` and ``pipetrain.reference(config)``.

::

    import pipetrain

    result = pipetrain.train({"epochs": 5, "stages": 2}, run_dir="runs/first")
    result.status, result.accuracy, result.final_params   # "done", 0.95..., runs/first/final.npz
    params = result.params()                              # {"layers.0.weight": array, ...}

``config`` is a :class:`~pipetrain.config.TrainConfig`, a dict of config keys, the path of a
TOML file, or None (the built-in example); keyword options override it, exactly as command-line
options override a config file. The same checks as the command line refuse a bad config or
data with a :class:`~pipetrain.status.UserError` (``ConfigError``, ``DataError``) before anything
starts; a run that starts returns a :class:`RunResult` whatever its outcome (``done``,
``stopped``, ``failed``, ``aborted``). Runs go to ``runs/<command>-<time>`` unless ``run_dir``
says otherwise.

Works from a script or a notebook. On the main thread the run takes the control signals for
its duration (``pipetrain stop RUN_DIR``, a notebook's interrupt: checkpoint and stop); off the
main thread, where Python cannot handle signals, it runs without them and says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipetrain.config import TrainConfig, build_config, load_toml
from pipetrain.data.workload import Workload
from pipetrain.run.metrics import read_metrics
from pipetrain.run.rundir import default_run_dir, load_params, read_events, read_state
from pipetrain.status import ExitCode, RunState, UserError
from pipetrain.training.evaluate import load_workload

ConfigLike = TrainConfig | dict[str, Any] | str | Path | None


@dataclass(frozen=True)
class Prepared:
    """A run checked and ready to start: its config, directory and data."""

    command: str
    config: TrainConfig
    run_dir: Path
    workload: Workload
    resume: bool


def _read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return read_state(run_dir)
    except FileNotFoundError:
        raise UserError(f"{run_dir}: not a run directory (no run.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{run_dir / 'run.json'}: unreadable ({exc})") from None


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Paths as the strings a config holds (``run_dir=Path(...)`` from Python)."""
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in values.items()}


def prepare(command: str, config: ConfigLike = None, options: dict[str, Any] | None = None,
            *, resume: bool = False) -> Prepared:
    """Resolve and check a run, in the order a user's mistakes are best explained: the
    values, then the data against the model, then the stage count against the model."""
    values: dict[str, Any] = {}
    recorded: dict[str, Any] = {}
    source = "options"
    options = _plain({k: v for k, v in (options or {}).items() if v is not None})
    run_dir_given = options.get("run_dir") or (
        config.get("run_dir") if isinstance(config, dict) else None)
    if resume and not run_dir_given and not (isinstance(config, TrainConfig)
                                             and config.run_dir):
        raise UserError("--resume needs --run-dir: the directory of the run to continue")
    if resume and run_dir_given:
        # A resumed run starts from the config it was started with; options still override.
        recorded = _read_state(Path(run_dir_given)).get("config", {})
        values.update({k: v for k, v in recorded.items() if k != "run_dir"})
        source = f"{run_dir_given}/run.json"
    if isinstance(config, TrainConfig):
        values.update(config.to_json())
        source = "config"
    elif isinstance(config, dict):
        values.update(_plain(config))
        source = "config"
    elif config is not None:
        values.update(load_toml(config))
        source = str(config)
    values.update(options)
    if resume and run_dir_given and values.get("schedule") != recorded.get("schedule") \
            and "virtual_stages" not in options:  # resumed under another schedule: its own
        values.pop("virtual_stages", None)
    # The data first: "64 features but the first layer expects 10" is the mistake to report,
    # not the stage count that the wrong layers then cannot hold.
    one_stage = {"stages": 1}
    if values.get("schedule") == "interleaved":  # a ring of one stage: checked with --stages
        one_stage.update(schedule="1f1b", virtual_stages=0)
    checked = build_config({**values, **one_stage}, source=source)
    workload = load_workload(checked)
    if command == "reference":
        if "stages" in values:  # validated like train: a stage count given must fit too
            build_config(values, source=source)
        final = checked  # one process by definition: the run's stage count is moot here
    else:
        final = build_config(values, source=source)
    run_dir = Path(final.run_dir) if final.run_dir else default_run_dir(command)
    if resume:
        state = _read_state(run_dir)
        recorded_epochs = (state.get("config") or {}).get("epochs", 0)
        if state.get("state") == RunState.DONE and final.epochs <= recorded_epochs:
            raise UserError(f"{run_dir}: the run already finished; nothing to resume (give "
                            f"more --epochs than its {recorded_epochs} to extend it)")
    elif (run_dir / "events.jsonl").exists():
        raise UserError(f"{run_dir}: already holds a run (use --resume, or another --run-dir)")
    return Prepared(command, final.replace(run_dir=str(run_dir)), run_dir, workload, resume)


def execute(prepared: Prepared, *, quiet: bool = False, tensorboard: bool = False) -> int:
    """Run a prepared run; its exit status (``pipetrain.status.ExitCode``)."""
    from threadpoolctl import threadpool_limits

    config = prepared.config
    # The coordinator only evaluates: its BLAS stays single-threaded (see pipetrain.cli).
    with threadpool_limits(config.blas_threads if prepared.command == "reference" else 1):
        if prepared.command == "reference":
            from pipetrain.training.reference import run_reference

            return run_reference(config, prepared.run_dir, quiet=quiet,
                                 tensorboard=tensorboard, workload=prepared.workload)
        from pipetrain.training.trainer import run_training

        return run_training(config, prepared.run_dir, quiet=quiet, resume=prepared.resume,
                            tensorboard=tensorboard, workload=prepared.workload)


@dataclass(frozen=True)
class RunResult:
    """What a run ended with. ``final_params`` is None unless it finished (``done``)."""

    status: str                  # done, stopped, failed or aborted
    exit_code: int               # what `pipetrain` would exit with
    run_dir: Path
    final_params: Path | None
    step: int                    # the last step done
    total_steps: int
    loss: float | None           # the last step's training loss
    eval_loss: float | None      # held-out loss after the last epoch
    accuracy: float | None       # held-out accuracy after the last epoch
    best_accuracy: float | None
    wall_s: float
    restarts: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.OK

    def params(self) -> dict[str, np.ndarray]:
        """The final parameters, by their global names (``layers.{i}.weight``, ...)."""
        if self.final_params is None:
            raise UserError(f"{self.run_dir}: the run is {self.status}; no final parameters")
        return load_params(self.final_params)

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.run_dir)

    def metrics(self) -> list[dict[str, float | None]]:
        """``metrics.csv``: a row per step (loss, samples/s, per-stage compute and wait)."""
        return read_metrics(self.run_dir / "metrics.csv")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def result_of(run_dir: Path, exit_code: int, wall_s: float) -> RunResult:
    state = read_state(run_dir)
    events = read_events(run_dir)
    evaluations = [e for e in events if e.get("event") == "evaluate"]
    scores = [a for a in (_number(e.get("accuracy")) for e in evaluations) if a is not None]
    final = run_dir / "final.npz"
    status = str(state.get("state"))
    return RunResult(
        status=status, exit_code=int(exit_code), run_dir=run_dir,
        final_params=final if status == RunState.DONE and final.exists() else None,
        step=int(state.get("step") or 0), total_steps=int(state.get("total_steps") or 0),
        loss=_number(next((e["loss"] for e in reversed(events) if e.get("event") == "step"),
                          None)),
        eval_loss=_number(evaluations[-1].get("loss")) if evaluations else None,
        accuracy=_number(evaluations[-1].get("accuracy")) if evaluations else None,
        best_accuracy=max(scores) if scores else None, wall_s=round(wall_s, 3),
        restarts=int(state.get("restarts", 0)), error=state.get("error"))


def _run(command: str, config: ConfigLike, options: dict[str, Any], *, resume: bool,
         quiet: bool, tensorboard: bool) -> RunResult:
    prepared = prepare(command, config, options, resume=resume)
    started = time.monotonic()
    code = execute(prepared, quiet=quiet, tensorboard=tensorboard)
    return result_of(prepared.run_dir, code, time.monotonic() - started)


def train(config: ConfigLike = None, *, resume: bool = False, quiet: bool = False,
          tensorboard: bool = False, **options: Any) -> RunResult:
    """The distributed run (``pipetrain train``): stage processes joined by pipes.

    ``options`` are config keys (``epochs=5``, ``stages=2``, ``run_dir="runs/x"``).
    ``resume=True`` continues the run in ``run_dir``.
    """
    return _run("train", config, options, resume=resume, quiet=quiet, tensorboard=tensorboard)


def reference(config: ConfigLike = None, *, quiet: bool = False, tensorboard: bool = False,
              **options: Any) -> RunResult:
    """The same run in one process (``pipetrain reference``): the oracle a distributed run
    equals bitwise."""
    return _run("reference", config, options, resume=False, quiet=quiet,
                tensorboard=tensorboard)
