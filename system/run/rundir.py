"""The run directory of the contract: ``run.json``, ``events.jsonl``, parameter files, logs.

``run.json`` is rewritten atomically (temporary file, fsync, rename) so a reader never sees half
of it; ``events.jsonl`` is appended one line per event and flushed at once, so a crash loses at
most the event being written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def default_run_dir(command: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{command}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old or the new content.

    ``durable`` adds the fsyncs that make this hold across a machine crash too; frequent
    progress updates skip them (a lost update is harmless, an fsync per step is not).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_params(path: Path, params: dict[str, np.ndarray]) -> None:
    """An ``.npz`` of named arrays, written atomically (no pickle: plain arrays only)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez(handle, **params)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_params(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


class RunDir:
    """Owns one run directory: its state file, its event log and its parameter files."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            (self.path / "logs").mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
        self.state: dict[str, Any] = {}
        self._events = None
        # Called with every event once it is written: the terminal, metrics.csv, TensorBoard.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def update_state(self, *, durable: bool = True, **fields: Any) -> None:
        self.state.update(fields)
        write_atomic(self.run_json, (json.dumps(self.state, indent=2) + "\n").encode(),
                     durable=durable)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        if self._events is None:
            self._events = open(self.events_path, "a", encoding="utf-8")  # noqa: SIM115
        record = {"t": round(time.time(), 6), "event": event, **fields}
        self._events.write(json.dumps(record) + "\n")
        self._events.flush()
        for listener in self.listeners:
            listener(record)
        return record

    def close(self) -> None:
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            close = getattr(listener, "close", None)
            if close is not None:
                close()
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_state(path: str | Path) -> dict[str, Any]:
    run_json = Path(path) / "run.json"
    with open(run_json, encoding="utf-8") as handle:
        return json.load(handle)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    events_path = Path(path) / "events.jsonl"
    with open(events_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
