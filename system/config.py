"""The run configuration: defaults, TOML files, command-line overrides and validation.

A config file holds the same keys as the command-line options, in snake_case
(``batch_size = 64`` for ``--batch-size 64``), and the model either as ``layers = [...]`` (the
dense/ReLU shorthand) or as ``[[model]]`` tables, one per layer (``type`` and its keys, see
``pipetrain.nn.model.LAYER_KEYS``; a ``block`` may carry ``repeat = n``). Unknown keys and
out-of-range values are refused with a :class:`ConfigError` whose one-line message names the key
(or the model table); a model that does not fit its data is refused before anything starts,
naming the layer and the fix (:func:`check_data`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipetrain.data.datasets import NORMALIZATIONS, DataError
from pipetrain.data.workload import DataSpec, Workload, input_spec
from pipetrain.nn.model import LAYER_KEYS, LayerSpec, ModelError, resolve, shorthand
from pipetrain.nn.optim import OPTIMIZERS
from pipetrain.pipeline.schedule import DEFAULT_VIRTUAL_STAGES, Action
from pipetrain.pipeline.schedule import SCHEDULES as SCHEDULE_BUILDERS
from pipetrain.pipeline.schedule import build as build_schedule
from pipetrain.pipeline.stage import ModelSpec
from pipetrain.status import UserError

SCHEDULES = tuple(SCHEDULE_BUILDERS)
DTYPES = ("float64", "float32")
TRANSPORTS = ("pipe", "mpi")
BALANCES = ("params", "time")


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message is one line and names the key."""


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "digits"
    layers: tuple[int, ...] = (64, 128, 64, 10)  # () when `model` is given
    model: tuple[LayerSpec, ...] | None = None  # the [[model]] tables, `repeat` expanded
    stages: int = 3
    replicas: int = 1
    microbatches: int = 4
    schedule: str = "1f1b"
    virtual_stages: int = 0  # pieces per stage, interleaved only (0: its default, 2)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "momentum"
    dtype: str = "float64"
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    max_restarts: int = 3
    heartbeat_timeout: float = 5.0
    holdout: float = 0.2
    normalize: str = "none"
    transport: str = "pipe"
    loader_threads: int = -1  # per stage; 0: its main thread loads; -1: chosen (auto_threads)
    prefetch: int = 4
    augment: bool = False
    balance: str = "params"
    blas_threads: int = 1
    run_dir: str | None = field(default=None, metadata={"math": False})
    # Record a Chrome trace of every process into RUN_DIR/trace.json (pipetrain.tracing).
    trace: bool = field(default=False, metadata={"math": False})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        # Without [[model]] tables the JSON (run.json, the config digest) is what it always was.
        if self.model is None:
            del data["model"]
        else:
            data["model"] = [spec.to_json() for spec in self.model]
        return data

    def math_config(self) -> dict[str, Any]:
        """The keys that decide the numbers (not where or how fast they run)."""
        return {key: value for key, value in self.to_json().items() if key in MATH_KEYS}

    def math_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.math_config(), sort_keys=True).encode()).hexdigest()

    @property
    def specs(self) -> tuple[LayerSpec, ...]:
        """The model's layers: the [[model]] tables, or the shorthand's dense layers."""
        return self.model if self.model is not None else shorthand(self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.specs)

    @property
    def pieces_per_stage(self) -> int:
        """V: the model is cut into ``stages * V`` pieces (1 unless interleaved)."""
        return self.virtual_stages or DEFAULT_VIRTUAL_STAGES.get(self.schedule, 1)

    @property
    def ring(self) -> bool:
        """Whether the last stage links round to the first (its later pieces feed stage 0)."""
        return self.pieces_per_stage > 1

    def build_schedule(self) -> list[list[Action]]:
        """The schedule's actions, one list per stage."""
        return build_schedule(self.schedule, self.stages, self.microbatches,
                              self.pieces_per_stage if self.ring else None)

    @property
    def op_timeout_s(self) -> float:
        """How long one send or receive of a frame may take before the link counts as stalled."""
        return max(60.0, 10 * self.heartbeat_timeout)

    @property
    def augmentation(self) -> str | None:
        """The augmentation ``--augment`` means for this dataset (``pipetrain.data.augment``)."""
        if not self.augment:
            return None
        return "digits" if self.dataset == "digits" else "noise"

    def data_spec(self) -> DataSpec:
        first = self.specs[0]
        return DataSpec(dataset=self.dataset, holdout=self.holdout, seed=self.seed,
                        normalize=self.normalize, dtype=self.dtype, batch_size=self.batch_size,
                        epochs=self.epochs,
                        context=first.get("context") if first.type == "embedding" else None,
                        images=first.type == "conv2d")

    def model_spec(self) -> ModelSpec:
        """The model and its step, with the data's shape (the dataset is read, once per
        process, to learn it)."""
        return ModelSpec(layers=self.specs, data=input_spec(self.data_spec()), seed=self.seed,
                         dtype=self.dtype, optimizer=self.optimizer, lr=self.lr,
                         batch_size=self.batch_size, microbatches=self.microbatches,
                         replicas=self.replicas)


# Keys whose change changes the parameters a run produces; a checkpoint is only resumed under
# the same values. Stage count and schedule (and the pieces per stage) are absent on purpose:
# they never change the bits.
MATH_KEYS = (
    "dataset", "layers", "model", "replicas", "microbatches", "epochs", "batch_size", "lr",
    "optimizer", "dtype", "seed", "holdout", "normalize", "augment",
)

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_toml(path: str | Path, *, error: type[Exception] = ConfigError,
              what: str = "config") -> dict[str, Any]:
    """A TOML file's tables; any problem is ``error`` with a one-line message naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        reason = " ".join(str(exc).split())  # TOML errors can span lines: keep one
        raise error(f"{path}: not valid TOML ({reason})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    return data


def build_config(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """A validated config from defaults overridden by ``values`` (file keys or options)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(FIELDS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(FIELDS))}"
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} ({hint})")
    converted = {key: _convert(key, value, source) for key, value in values.items()}
    if converted.get("model") is not None:
        if converted.get("layers"):
            raise ConfigError(f"{source}: give either layers (the dense/ReLU shorthand) or "
                              "[[model]] tables, not both")
        converted["layers"] = ()
    config = TrainConfig(**converted)
    validate(config, source)
    return config


def _convert(key: str, value: Any, source: str) -> Any:
    default = getattr(TrainConfig, key, None)
    where = f"{source}: {key}"
    if key == "model":
        return None if value is None else _convert_model(value, source)
    if key == "layers":
        if isinstance(value, str):
            try:
                value = [int(part) for part in value.split(",")]
            except ValueError:
                raise ConfigError(
                    f"{where}: expected sizes like 64,128,10, got {value!r}"
                ) from None
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where}: expected a list of integers, got {value!r}")
        return tuple(value)
    if key == "run_dir":
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


# Model keys and what their values may be: (lowest value, type).
_MODEL_VALUES: dict[str, tuple[float, type]] = {
    "units": (1, int), "channels": (1, int), "kernel": (1, int), "stride": (1, int),
    "padding": (0, int), "size": (1, int), "p": (0.0, float), "dim": (1, int),
    "context": (1, int), "heads": (1, int), "hidden": (1, int), "repeat": (1, int),
}
MAX_MODEL_LAYERS = 1000


def _convert_model(tables: Any, source: str) -> tuple[LayerSpec, ...]:
    """The [[model]] tables as layer specs, each key checked; ``repeat`` expanded."""
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{source}: model: expected [[model]] tables (one per layer), got "
                          f"{tables!r}")
    specs: list[LayerSpec] = []
    for number, table in enumerate(tables, start=1):
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: model table {number}: expected a table, got {table!r}")
        kind = table.get("type")
        if kind not in LAYER_KEYS:
            raise ConfigError(f"{source}: model table {number}: type {kind!r} is not one of "
                              f"{', '.join(LAYER_KEYS)}")
        where = f"{source}: model table {number} ({kind})"
        required, optional = LAYER_KEYS[kind]
        known = {*required, *optional, "type", *(("repeat",) if kind == "block" else ())}
        for key in table:
            if key not in known:
                raise ConfigError(f"{where}: unknown key {key!r} (known: "
                                  f"{', '.join(sorted(known - {'type'})) or 'none'})")
        for key in required:
            if key not in table:
                raise ConfigError(f"{where}: needs {key!r}")
        options = []
        for key, value in table.items():
            if key in ("type", "repeat"):
                continue
            low, kind_of = _MODEL_VALUES[key]
            number_ok = isinstance(value, int | float) if kind_of is float else isinstance(
                value, int)
            if isinstance(value, bool) or not number_ok or value < low:
                what = "a number" if kind_of is float else "an integer"
                raise ConfigError(f"{where}: {key} must be {what} >= {low}, got {value!r}")
            if key == "p" and not value < 1:
                raise ConfigError(f"{where}: p must be below 1, got {value!r}")
            options.append((key, float(value) if kind_of is float else value))
        repeat = table.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ConfigError(f"{where}: repeat must be an integer >= 1, got {repeat!r}")
        specs += [LayerSpec(kind, tuple(options))] * repeat
        if len(specs) > MAX_MODEL_LAYERS:
            raise ConfigError(f"{source}: model: more than {MAX_MODEL_LAYERS} layers")
    return tuple(specs)


def validate(config: TrainConfig, source: str = "config") -> None:
    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{source}: {key}: {why}")

    sizes = config.layers if config.model is None else ()  # the shorthand's layer sizes
    if config.model is None and (len(sizes) < 2 or any(size < 1 for size in sizes)):
        fail("layers", f"need at least an input and an output size, all >= 1, got "
             f"{','.join(map(str, sizes))}")
    widths = [*sizes, *(value for spec in config.specs for key, value in spec.options
                        if key in ("units", "channels", "dim", "hidden", "context"))]
    if any(width > 1_000_000 for width in widths):
        fail("layers" if config.model is None else "model",
             "a layer wider than 1,000,000 units is refused")
    for key, low in (("stages", 1), ("replicas", 1), ("microbatches", 1), ("epochs", 1),
                     ("batch_size", 1), ("keep_checkpoints", 1), ("prefetch", 1),
                     ("blas_threads", 1), ("checkpoint_every", 0), ("max_restarts", 0),
                     ("seed", 0)):
        if getattr(config, key) < low:
            fail(key, f"must be >= {low}, got {getattr(config, key)}")
    if config.loader_threads < -1:
        fail("loader_threads", "must be >= 0, or -1 to let each stage choose, got "
             f"{config.loader_threads}")
    if config.seed >= 2**63:
        fail("seed", "must be below 2**63")
    if config.stages > config.num_layers:
        fail("stages", f"{config.stages} stages for {config.num_layers} layers: each stage "
             "needs at least one layer (lower --stages or add layers)")
    if config.batch_size < config.replicas * config.microbatches:
        fail("batch_size", f"{config.batch_size} cannot feed {config.replicas} replica(s) x "
             f"{config.microbatches} micro-batches with at least one sample each")
    if not config.lr > 0 or config.lr > 1e3:
        fail("lr", f"must be in (0, 1000], got {config.lr}")
    if not 0 <= config.holdout < 1:
        fail("holdout", f"must be in [0, 1), got {config.holdout}")
    if not 0 < config.heartbeat_timeout <= 3600:
        fail("heartbeat_timeout", f"must be in (0, 3600] seconds, got {config.heartbeat_timeout}")
    for key, allowed in (("schedule", SCHEDULES), ("dtype", DTYPES), ("transport", TRANSPORTS),
                         ("optimizer", tuple(OPTIMIZERS)), ("normalize", NORMALIZATIONS),
                         ("balance", BALANCES)):
        if getattr(config, key) not in allowed:
            fail(key, f"{getattr(config, key)!r} is not one of {', '.join(allowed)}")
    if not config.dataset:
        fail("dataset", "must be 'digits' or a path")
    _validate_pieces(config, fail)


def _validate_pieces(config: TrainConfig, fail: Callable[[str, str], None]) -> None:
    """The combinations interleaved 1F1B cannot run, refused before anything starts."""
    if config.virtual_stages < 0:
        fail("virtual_stages", f"must be >= 2, got {config.virtual_stages}")
    if config.schedule not in DEFAULT_VIRTUAL_STAGES:
        if config.virtual_stages:
            fail("virtual_stages", f"only with --schedule interleaved (schedule "
                 f"{config.schedule!r} runs one piece per stage)")
        return
    pieces = config.pieces_per_stage
    if pieces < 2:
        fail("virtual_stages", f"must be >= 2 for interleaved, got {pieces} (one piece per "
             "stage is --schedule 1f1b)")
    if config.stages < 2:
        fail("stages", "interleaved needs at least 2 stages (it passes pieces round a ring of "
             "stages; use --schedule 1f1b for 1)")
    if config.stages * pieces > config.num_layers:
        fail("virtual_stages", f"{config.stages} stages x {pieces} pieces need "
             f"{config.stages * pieces} layers, the model has {config.num_layers} (lower "
             "--virtual-stages or --stages, or add layers)")
    if config.microbatches % config.stages:
        fail("microbatches", f"interleaved needs a multiple of the stages ({config.stages}), "
             f"got {config.microbatches}")


def check_data(config: TrainConfig, workload: Workload) -> None:
    """Refuse a model that does not fit its data, with a message that says how to fix it."""
    dataset = workload.dataset
    if config.augment and dataset.tokens:
        raise DataError(f"{dataset.name}: augment adds noise to numbers; these are tokens "
                        "(set augment = false)")
    if config.model is not None:
        try:
            resolve(config.model, input_spec(config.data_spec()))
        except ModelError as exc:
            raise DataError(f"{dataset.name}: model {exc}") from None
        return
    if dataset.x.ndim != 2 or dataset.tokens:
        raise DataError(f"{dataset.name}: samples of shape {dataset.x.shape[1:]} need [[model]] "
                        "tables (the layers shorthand takes feature vectors)")
    if dataset.num_features != config.layers[0]:
        raise DataError(
            f"{dataset.name}: {dataset.num_features} features but the first layer expects "
            f"{config.layers[0]} (set --layers {dataset.num_features},...)"
        )
    if dataset.num_classes > config.layers[-1]:
        raise DataError(
            f"{dataset.name}: labels go up to {dataset.num_classes - 1} but the last layer has "
            f"{config.layers[-1]} outputs"
        )
