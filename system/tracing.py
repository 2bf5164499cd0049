"""Trace recording: what each thread of each process did, and when (``--trace``).

Every process of a traced run (the coordinator and each worker) installs a :class:`Recorder`
at start-up; the system marks spans at a few call sites (each schedule action, each send and
receive, the all-reduce of a layer, a digest, a snapshot copy, a checkpoint) through
:func:`current`. Untraced, :func:`current` is a :class:`NullRecorder` whose methods do nothing,
so an untraced run pays one attribute look-up and a no-op call per site, as with the hooks seam.

A span is kept as a plain tuple in a list (appending is all a traced call site adds: about a
microsecond), stamped with ``time.monotonic_ns()`` and the kernel's thread id. On Linux
CLOCK_MONOTONIC is one clock for every process of the machine, so the files of one run line up
without any offset; under MPI across machines they would not (each file also records the wall
clock at its start, to align them by hand). Each process writes its own file when it exits
(:meth:`Recorder.write`); ``pipetrain.run.trace_file`` merges them into one Chrome trace-event
JSON (``RUN_DIR/trace.json``) that Perfetto and chrome://tracing open.

Why not ``sys.setprofile`` or py-spy: they show functions, not the schedule's actions, and their
cost per call would itself be most of a small model's step.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Categories (the Chrome trace "cat" field): the timeline colours by them.
COMPUTE = "compute"      # a schedule action (F, B, I, W) or the optimizer update
WAIT = "wait"            # the main thread blocked on a neighbour's frame or a helper
SEND = "send"            # writing a frame to a neighbour
RECV = "recv"            # a receiver thread reading a frame
ALLREDUCE = "allreduce"  # a layer's gradients summed with the other replicas
DIGEST = "digest"        # hashing a step's gradients
SNAPSHOT = "snapshot"    # copying the state into the in-memory snapshot
CHECKPOINT = "checkpoint"
STEP = "step"            # a whole step (worker) or a step's round trip (coordinator)
CONTROL = "control"      # the coordinator's own work between steps (events, evaluation)
# At most this many spans per process: a long run keeps its first ones and says how many it
# dropped, rather than growing without bound.
MAX_SPANS = 2_000_000


class NullRecorder:
    """Tracing off: every method does nothing."""

    enabled = False

    def start(self) -> int:
        return 0

    def end(self, name: str, cat: str, start_ns: int, args: dict[str, Any] | None = None
            ) -> None:
        pass

    # The hot call sites (every action and frame) pass their parts, not a formatted name or
    # an args dict: untraced, building those would be most of what the call costs.
    def action(self, action: Any, step: int, start_ns: int) -> None:
        pass

    def waited(self, source: str, action: Any, start_ns: int) -> None:
        pass

    def frame(self, verb: str, link: str, start_ns: int, kind: Any, step: int,
              index: int, nbytes: int) -> None:
        pass

    @contextlib.contextmanager
    def span(self, name: str, cat: str, args: dict[str, Any] | None = None) -> Iterator[None]:
        yield

    def write(self) -> Path | None:
        return None


class Recorder(NullRecorder):
    """Spans of one process, written to ``directory/<file_stem>.json`` by :meth:`write`."""

    enabled = True

    def __init__(self, directory: Path | str, file_stem: str, process_name: str, *,
                 sort_index: int = 0) -> None:
        self.directory = Path(directory)
        self.file_stem = file_stem
        self.process_name = process_name
        self.sort_index = sort_index
        self.pid = os.getpid()
        self.spans: list[tuple[str, str, int, int, int, dict[str, Any] | None]] = []
        self.thread_names: dict[int, str] = {}
        self.dropped = 0
        self.wall_ns, self.mono_ns = time.time_ns(), time.monotonic_ns()

    def start(self) -> int:
        return time.monotonic_ns()

    def end(self, name: str, cat: str, start_ns: int, args: dict[str, Any] | None = None
            ) -> None:
        """Record a span from ``start_ns`` (from :meth:`start`) until now on this thread."""
        end_ns = time.monotonic_ns()
        if len(self.spans) >= MAX_SPANS:
            self.dropped += 1
            return
        tid = threading.get_native_id()
        if tid not in self.thread_names:
            self.thread_names[tid] = threading.current_thread().name
        self.spans.append((name, cat, start_ns, end_ns, tid, args))

    def action(self, action: Any, step: int, start_ns: int) -> None:
        """A schedule action (a NamedTuple such as ``2F0``) that ran from ``start_ns``."""
        self.end(str(action), COMPUTE, start_ns, {"step": step, **action._asdict()})

    def waited(self, source: str, action: Any, start_ns: int) -> None:
        """The main thread waited from ``start_ns`` for ``source``'s frame for ``action``."""
        self.end(f"wait {source}", WAIT, start_ns, {"for": str(action)})

    def frame(self, verb: str, link: str, start_ns: int, kind: Any, step: int,
              index: int, nbytes: int) -> None:
        """A frame sent or received (``verb``) on ``link`` from ``start_ns``."""
        self.end(f"{verb} {link}", SEND if verb == "send" else RECV, start_ns,
                 {"kind": kind.name.lower(), "step": step, "mb": index, "bytes": nbytes})

    @contextlib.contextmanager
    def span(self, name: str, cat: str, args: dict[str, Any] | None = None) -> Iterator[None]:
        start_ns = time.monotonic_ns()
        try:
            yield
        finally:
            self.end(name, cat, start_ns, args)

    def events(self) -> list[dict[str, Any]]:
        """The spans as Chrome trace events ("X": complete, microseconds) and the names of
        this process and its threads as metadata events ("M")."""
        pid = self.pid
        out: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
             "args": {"name": self.process_name}},
            {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
             "args": {"sort_index": self.sort_index}},
        ]
        for tid, name in self.thread_names.items():
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                        "args": {"name": "main" if name == "MainThread" else name}})
        for name, cat, start_ns, end_ns, tid, args in self.spans:
            event = {"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid,
                     "ts": start_ns / 1000, "dur": (end_ns - start_ns) / 1000}
            if args:
                event["args"] = args
            out.append(event)
        return out

    def write(self) -> Path:
        """Write this process's events (atomically: a reader never sees half a file)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.file_stem}.json"
        temporary = path.with_suffix(".tmp")
        document = {"traceEvents": self.events(),
                    "otherData": {"process": self.process_name, "pid": self.pid,
                                  "wall_ns_at_start": self.wall_ns,
                                  "monotonic_ns_at_start": self.mono_ns,
                                  "dropped_spans": self.dropped}}
        temporary.write_text(json.dumps(document, separators=(",", ":")))
        os.replace(temporary, path)
        return path


_current: NullRecorder = NullRecorder()


def current() -> NullRecorder:
    """The process's recorder (a :class:`NullRecorder` unless tracing was switched on)."""
    return _current


def install(recorder: NullRecorder) -> None:
    global _current
    _current = recorder
