"""One timestamped history of a scenario run: the trainer's events and the harness's operations.

Checks read this after the run; nothing judges while the run is going. Entries are plain dicts
with ``t`` (unix seconds) and ``source`` (``"run"`` for events.jsonl lines, ``"harness"`` for
fault operations and observations), so the history serialises to JSON as it is. What of it must
replay is its canonical form (``pipetrain_harness.canonical``).
"""

from __future__ import annotations

import threading
import time
from typing import Any


class History:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # the runner loop and fault threads both record
        self.entries: list[dict[str, Any]] = []

    def record(self, op: str, **fields: Any) -> dict[str, Any]:
        """A harness operation (``fault_invoke``, ``fault_heal``, ``launch``, ...)."""
        entry = {"t": time.time(), "source": "harness", "op": op, **fields}
        with self._lock:
            self.entries.append(entry)
        return entry

    def add(self, entry: dict[str, Any]) -> None:
        """A harness entry made afterwards (``steps_replayed``), with the time it refers to."""
        with self._lock:
            self.entries.append({"source": "harness", **entry})

    def add_run_events(self, events: list[dict[str, Any]]) -> None:
        with self._lock:
            self.entries.extend({"source": "run", **event} for event in events)

    def sorted(self) -> list[dict[str, Any]]:
        with self._lock:
            return sorted(self.entries, key=lambda entry: entry.get("t", 0.0))

    def run_events(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.entries
                    if e["source"] == "run" and (name is None or e.get("event") == name)]

    def ops(self, op: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.entries
                    if e["source"] == "harness" and (op is None or e.get("op") == op)]
