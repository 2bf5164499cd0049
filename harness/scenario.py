"""Scenario files: load and validate one failure case (a TOML file in ``scenarios/``).

A scenario names a training run (``[train]``, the keys of the training config), the faults to
inject into it (``[[faults]]``, built by ``pipetrain_harness.faults.build_fault``) and what must
hold afterwards (``[expect]``). Everything is checked when the file is loaded, so a typo fails
in one line naming the file and the key, before any process starts, and never half-way through
a run. ``scenario_to_toml`` writes the same structure back (the fuzzer saves failing plans with
it); it is a small writer for plain data rather than a new dependency.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.config import ConfigError, TrainConfig, build_config, load_toml
from pipetrain.data.datasets import BUILT_IN

NAME_RE = re.compile(r"[a-z0-9-]+")
EQUIVALENCES = ("bitwise", "tolerance", "none")
MAX_RESUMES = 5  # resume_after_stop relaunches at most this many times

TOP_KEYS = {"name", "description", "seed", "step_delay_s", "resume_after_stop", "timeout_s",
            "train", "faults", "expect"}


class ScenarioError(ValueError):
    """A scenario file that cannot be used: ``"<file>: <key>: <reason>"``, one line."""


@dataclass(frozen=True)
class Expect:
    equivalence: str = "bitwise"
    tolerance: float | None = None  # relative; only with equivalence = "tolerance"
    restarts: int | None = None
    no_leaks: bool = True
    max_rss_mb: float | None = None  # per process peak RSS
    max_wall_s: float | None = None
    exit_status: int = 0
    error_matches: str | None = None  # regex searched in the run's stderr
    state: str | None = None  # final run.json state; None: not checked

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__dataclass_fields__
                if getattr(self, key) is not None}


EXPECT_KEYS = set(Expect.__dataclass_fields__)


@dataclass(frozen=True)
class Scenario:
    path: Path
    name: str
    description: str
    seed: int
    train: dict[str, Any]
    faults: list[Any]  # pipetrain_harness.faults.base.Fault instances, in file order
    expect: Expect
    step_delay_s: float = 0.0
    resume_after_stop: bool = False
    timeout_s: float = 300.0

    def train_config(self) -> TrainConfig:
        return build_config(self.train, source=f"{self.path}: train")

    def to_dict(self) -> dict[str, Any]:
        """The scenario as the plain data of its file (for ``scenario_to_toml``)."""
        return {
            "name": self.name, "description": self.description, "seed": self.seed,
            "step_delay_s": self.step_delay_s, "resume_after_stop": self.resume_after_stop,
            "timeout_s": self.timeout_s, "train": dict(self.train),
            "faults": [dict(fault.table) for fault in self.faults],
            "expect": self.expect.to_dict(),
        }


# -- loading ---------------------------------------------------------------------------------


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    return parse_scenario(load_toml(path, error=ScenarioError, what="scenario"), path)


def load_all(directory: str | Path) -> list[Scenario]:
    """Every ``*.toml`` directly in ``directory``, sorted by file name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScenarioError(f"{directory}: not a directory of scenarios")
    return [load_scenario(path) for path in sorted(directory.glob("*.toml"))]


def parse_scenario(data: dict[str, Any], path: str | Path) -> Scenario:
    """A validated scenario from the parsed TOML of ``path`` (used for messages)."""
    path = Path(path)
    checker = _Checker(path)
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        checker.fail(unknown[0], f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    name = checker.get(data, "name", str, required=True)
    if not NAME_RE.fullmatch(name):
        checker.fail("name", f"{name!r} may only hold a-z, 0-9 and '-'")
    description = checker.get(data, "description", str, required=True)
    seed = checker.get(data, "seed", int, default=0)
    if seed < 0:
        checker.fail("seed", f"must be >= 0, got {seed}")
    step_delay_s = float(checker.get(data, "step_delay_s", (int, float), default=0.0))
    if not 0 <= step_delay_s <= 60:
        checker.fail("step_delay_s", f"must be in [0, 60] seconds, got {step_delay_s}")
    resume_after_stop = checker.get(data, "resume_after_stop", bool, default=False)
    timeout_s = float(checker.get(data, "timeout_s", (int, float), default=300.0))
    if not 0 < timeout_s <= 86_400:
        checker.fail("timeout_s", f"must be in (0, 86400] seconds, got {timeout_s}")
    train = _parse_train(checker, checker.get(data, "train", dict, default={}))
    faults = _parse_faults(checker, data.get("faults", []))
    expect = _parse_expect(checker, checker.get(data, "expect", dict, default={}))
    _check_points(faults, train, seed, path)
    return Scenario(path=path, name=name, description=description, seed=seed, train=train,
                    faults=faults, expect=expect, step_delay_s=step_delay_s,
                    resume_after_stop=resume_after_stop, timeout_s=timeout_s)


class _Checker:
    """Type checks whose failures name the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> None:
        raise ScenarioError(f"{self.path}: {key}: {_one_line(reason)}")

    def get(self, table: dict[str, Any], key: str, kind: type | tuple[type, ...], *,
            prefix: str = "", required: bool = False, default: Any = None) -> Any:
        if key not in table:
            if required:
                self.fail(prefix + key, "required")
            return default
        value = table[key]
        # TOML booleans are not numbers here, even though bool subclasses int in Python.
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            self.fail(prefix + key, f"expected {_type_name(kind)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(prefix + key, f"must be a finite number, got {value!r}")
        return value


def _parse_train(checker: _Checker, train: dict[str, Any]) -> dict[str, Any]:
    if "run_dir" in train:
        checker.fail("train.run_dir", "not allowed: the harness chooses the run directory")
    dataset = train.get("dataset")
    if isinstance(dataset, str) and dataset not in BUILT_IN:
        # A dataset path is relative to the scenario file, wherever the harness runs from.
        train = {**train, "dataset": str((checker.path.parent / dataset).resolve())}
    try:
        build_config(train, source=f"{checker.path}: train")
    except ConfigError as exc:
        raise ScenarioError(_one_line(exc)) from None
    return dict(train)


def _parse_faults(checker: _Checker, tables: Any) -> list[Any]:
    from pipetrain_harness.faults import FaultError, build_fault

    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        checker.fail("faults", "expected an array of tables ([[faults]])")
    faults = []
    for i, table in enumerate(tables):
        if "kind" not in table:
            checker.fail(f"faults[{i}]", "needs a 'kind'")
        try:
            faults.append(build_fault(table, where=f"{checker.path}: faults[{i}]"))
        except FaultError as exc:
            raise ScenarioError(_one_line(exc)) from None
    return faults


def _check_points(faults: list[Any], train: dict[str, Any], seed: int, path: Path) -> None:
    """Every fault's point must be one the run reaches, and no two may race."""
    import random

    from pipetrain_harness.faults import FaultError
    from pipetrain_harness.landing import resolve_places, run_shape

    if not faults:
        return
    try:
        shape = run_shape(build_config(train, source=f"{path}: train"))
        resolve_places(faults, shape, random.Random(seed))  # noqa: S311 - the runner's draw
    except FaultError as exc:
        raise ScenarioError(_one_line(exc)) from None


def _parse_expect(checker: _Checker, table: dict[str, Any]) -> Expect:
    unknown = sorted(set(table) - EXPECT_KEYS)
    if unknown:
        checker.fail(f"expect.{unknown[0]}",
                     f"unknown key (known: {', '.join(sorted(EXPECT_KEYS))})")

    def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        return checker.get(table, key, kind, prefix="expect.", default=default)

    equivalence = get("equivalence", str, "bitwise")
    if equivalence not in EQUIVALENCES:
        checker.fail("expect.equivalence",
                     f"{equivalence!r} is not one of {', '.join(EQUIVALENCES)}")
    tolerance = get("tolerance", (int, float))
    if tolerance is not None and equivalence != "tolerance":
        checker.fail("expect.tolerance", 'only allowed with equivalence = "tolerance"')
    if equivalence == "tolerance":
        if tolerance is None:
            checker.fail("expect.tolerance", 'required with equivalence = "tolerance"')
        if not tolerance > 0:
            checker.fail("expect.tolerance", f"must be > 0, got {tolerance}")
    restarts = get("restarts", int)
    if restarts is not None and restarts < 0:
        checker.fail("expect.restarts", f"must be >= 0, got {restarts}")
    max_rss_mb = get("max_rss_mb", (int, float))
    max_wall_s = get("max_wall_s", (int, float))
    for key, value in (("max_rss_mb", max_rss_mb), ("max_wall_s", max_wall_s)):
        if value is not None and not value > 0:
            checker.fail(f"expect.{key}", f"must be > 0, got {value}")
    exit_status = get("exit_status", int, 0)
    if not 0 <= exit_status <= 255:
        checker.fail("expect.exit_status", f"must be in [0, 255], got {exit_status}")
    error_matches = get("error_matches", str)
    if error_matches is not None:
        try:
            re.compile(error_matches)
        except re.error as exc:
            checker.fail("expect.error_matches", f"not a valid regular expression ({exc})")
    state = get("state", str)
    if state is not None and not state:
        checker.fail("expect.state", "must not be empty")
    return Expect(
        equivalence=equivalence, tolerance=None if tolerance is None else float(tolerance),
        restarts=restarts, no_leaks=get("no_leaks", bool, True),
        max_rss_mb=None if max_rss_mb is None else float(max_rss_mb),
        max_wall_s=None if max_wall_s is None else float(max_wall_s),
        exit_status=exit_status, error_matches=error_matches, state=state,
    )


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             dict: "a table", list: "an array"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        return "a number"
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# -- writing ---------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
Scalar = str | int | float | bool


def scenario_to_toml(data: dict[str, Any]) -> str:
    """TOML text for plain data: str, int, float, bool, (nested) arrays of those, tables and
    arrays of tables. ``tomllib.loads`` of the result gives ``data`` back."""
    lines: list[str] = []
    _write_table(lines, data, [])
    return "\n".join(lines).strip("\n") + "\n"


def _write_table(lines: list[str], table: dict[str, Any], path: list[str]) -> None:
    subtables, arrays = [], []
    for key, value in table.items():
        if not isinstance(key, str):
            raise TypeError(f"TOML keys are strings, got {key!r}")
        if isinstance(value, dict):
            subtables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subtables:
        lines += ["", f"[{_dotted([*path, key])}]"]
        _write_table(lines, value, [*path, key])
    for key, items in arrays:
        for item in items:
            lines += ["", f"[[{_dotted([*path, key])}]]"]
            _write_table(lines, item, [*path, key])


def _dotted(path: list[str]) -> str:
    return ".".join(_key(part) for part in path)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form, always with '.' or 'e'
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        if any(isinstance(v, dict) for v in value):
            raise TypeError("an array mixing tables and values cannot be written")
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _string(text: str) -> str:
    """A TOML basic string: quote, backslash and every control character escaped."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


__all__ = ["EQUIVALENCES", "Expect", "MAX_RESUMES", "Scenario", "ScenarioError", "load_all",
           "load_scenario", "parse_scenario", "scenario_to_toml"]
