"""The run directory of the contract: ``run.json``, ``events.jsonl``, parameter files, logs.

``run.json`` is rewritten atomically (temporary file, fsync, rename) so a reader never sees half
of it; ``events.jsonl`` is appended one whole line per event with one ``write``, so a crash
loses at most the event being written, and a line that a full disk cut short is cut off again
(a half line left by a crash is cut off when the run directory is next opened). Every write
that fails becomes a one-line :class:`~pipetrain.run.storage.StorageError` naming the file; a
directory that cannot be a run directory at all is a :class:`~pipetrain.run.storage.RunDirError`.
The coordinator holds the directory's lock (``pipetrain.run.lock``) while the run lives.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipetrain.run.lock import RunLock
from pipetrain.run.storage import RunDirError, StorageError, writing


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
    with writing(path), _removed_on_error(tmp):
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)


@contextlib.contextmanager
def _removed_on_error(tmp: Path) -> Iterator[None]:
    """A temporary file that is removed if the block fails (nothing half-written stays)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_params(path: Path, params: dict[str, np.ndarray]) -> None:
    """An ``.npz`` of named arrays, written atomically (no pickle: plain arrays only)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path), _removed_on_error(tmp):
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
        self.lock = RunLock(self.path)
        if create:
            if self.path.exists() and not self.path.is_dir():
                raise RunDirError(f"{self.path}: cannot be used as a run directory (it is a "
                                  "file, not a directory)")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunDirError(f"{self.path}: cannot be used as a run directory "
                                  f"({exc.strerror})") from None
            self.lock.acquire()  # before anything is written: one coordinator per directory
            try:
                for sub in ("logs", "checkpoints"):
                    (self.path / sub).mkdir(exist_ok=True)
                _cut_partial_line(self.events_path)
            except OSError as exc:
                self.lock.release()
                raise RunDirError(f"{self.path}: cannot be used as a run directory "
                                  f"({exc.strerror})") from None
        self.state: dict[str, Any] = {}
        self._events: int | None = None
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
        record = {"t": round(time.time(), 6), "event": event, **fields}
        line = (json.dumps(record) + "\n").encode()
        with writing(self.events_path):
            if self._events is None:
                self._events = os.open(self.events_path,
                                       os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                       0o644)
            size = os.fstat(self._events).st_size
            try:
                written = 0
                while written < len(line):
                    written += os.write(self._events, line[written:])
            except OSError:
                with contextlib.suppress(OSError):  # no half line stays behind
                    os.ftruncate(self._events, size)
                raise
        for listener in self.listeners:
            try:
                listener(record)
            except OSError as exc:  # metrics.csv and the like: the same one line
                raise StorageError.from_os_error(
                    exc, getattr(listener, "path", self.path)) from None
        return record

    def close(self) -> None:
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            close = getattr(listener, "close", None)
            if close is not None:
                with contextlib.suppress(OSError):  # a full disk: the run has said so already
                    close()
        if self._events is not None:
            os.close(self._events)
            self._events = None
        self.lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_partial_line(path: Path) -> None:
    """Drop a last line without its newline (a crash in the middle of writing it)."""
    try:
        handle = open(path, "r+b")  # noqa: SIM115
    except FileNotFoundError:
        return
    with handle:
        end = handle.seek(0, os.SEEK_END)
        if end == 0:
            return
        handle.seek(max(0, end - 65536))
        tail = handle.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        handle.truncate(end - len(tail) + cut + 1 if cut >= 0 else max(0, end - len(tail)))


def read_state(path: str | Path) -> dict[str, Any]:
    run_json = Path(path) / "run.json"
    with open(run_json, encoding="utf-8") as handle:
        return json.load(handle)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    events_path = Path(path) / "events.jsonl"
    with open(events_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
