"""Frames from every inbound channel, handed to whoever waits for them, by source.

A source is read one of two ways:

* **directly** (:meth:`Inbox.read_directly`), by the thread that waits for it: the main thread
  polls the pipe itself, so a frame costs no thread hand-off. Only for a channel whose pipe holds
  everything the peer can send before this side reads (a worker's links when a step's frames fit,
  the control pipe): the peer's send then never blocks, so no send/send deadlock between two
  stages is possible. While it waits, the main thread also reads the *fatal* direct source (the
  control pipe), so a command still interrupts the wait at once.
* by a **receiver thread** (:class:`Receivers`), one per channel: a neighbour's send never waits
  for this stage's main thread even when a frame exceeds the pipe buffer, and reading overlaps
  compute. The threads and the waiters meet under one ``Condition``: a condition (not a Queue
  per source) because a waiter must also wake when *any* receiver fails, and one condition
  variable covers both "my frame arrived" and "everything is broken".
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipetrain import tracing
from pipetrain.runtime.spinning import poll_spinning
from pipetrain.threads import start_helper
from pipetrain.wire.channel import Channel, ChannelClosed


class InboxFailure(RuntimeError):
    """A receiver failed (peer gone, corrupt frame, timeout); names the source."""


class PeerClosed(InboxFailure):
    """The peer closed its pipe: usually the consequence of its own failure, not ours."""


class InboxClosed(InboxFailure):
    """The worker is shutting down: whoever still waits for a frame gives up."""


@dataclass
class _Direct:
    """A source read by its waiter: the channel and how long a frame may take once begun."""

    channel: Channel
    fd: int
    op_timeout_s: float | None
    fatal: bool


class Inbox:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[str, deque[Any]] = {}
        self._failure: InboxFailure | None = None
        self._source_failures: dict[str, InboxFailure] = {}
        self._direct: dict[str, _Direct] = {}
        self._polls: dict[tuple[int, ...], select.poll] = {}  # poll sets of direct waits
        self.reading = False  # a direct source's frame is being read (the peer is sending)
        self.spin_s = 0.0  # how long a direct wait polls before it sleeps (runtime.spinning)

    def read_directly(self, source: str, channel: Channel, *, op_timeout_s: float | None,
                      fatal: bool = False) -> None:
        """Read ``source`` on the waiting thread (the worker's main thread only), not on a
        receiver thread. A ``fatal`` source's failure fails every source, and it is read
        during any direct wait (the control pipe: a command interrupts every wait)."""
        self._direct[source] = _Direct(channel, channel.fileno(), op_timeout_s, fatal)
        self._polls.clear()

    def put(self, source: str, item: Any) -> None:
        with self._cond:
            self._items.setdefault(source, deque()).append(item)
            self._cond.notify_all()

    def fail(self, exc: InboxFailure, source: str | None = None) -> None:
        """Record a failure and wake every waiter. With ``source``, only that source failed:
        its items already received are still delivered, then its failure is raised. A
        neighbour that closes its pipe after the last step is not an error for anyone who no
        longer reads from it. Without ``source`` every ``get`` fails (the first failure wins)."""
        with self._cond:
            if source is not None:
                self._source_failures.setdefault(source, exc)
            elif self._failure is None:
                self._failure = exc
            self._cond.notify_all()

    def get(self, source: str, *, interrupted: Callable[[], bool] = lambda: False) -> Any:
        """The next item from ``source``; raises the recorded failure if there is one.

        Waits in slices of 0.5 s only so that ``interrupted`` (a signal flag) is looked at even if
        a signal landed while this thread was not in a system call.
        """
        direct = self._direct.get(source)
        with self._cond:
            while True:
                queue = self._items.get(source)
                if queue:
                    return queue.popleft()
                failure = self._failure or self._source_failures.get(source)
                if failure is not None:
                    # A fresh exception for each waiter (one object raised in several threads
                    # would share a traceback), of the same kind, caused by the recorded one.
                    raise type(failure)(*failure.args) from failure
                if interrupted():
                    raise InterruptedError("interrupted by a signal")
                if direct is None:
                    self._cond.wait(0.5)
                    continue
                self._cond.release()  # the read files what it gets under the lock
                try:
                    self._read_when_ready(source, direct, 500)
                finally:
                    self._cond.acquire()

    def pump(self) -> None:
        """Read what a fatal direct source (the control pipe) holds, without waiting: called
        by the main thread while it waits on something else (a helper, the all-reduce)."""
        for source, direct in self._direct.items():
            if direct.fatal and source not in self._source_failures and self._failure is None:
                self._read_when_ready(source, direct, 0)

    def _read_when_ready(self, source: str, direct: _Direct, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for ``source`` (or a fatal source) to be readable, and
        read one frame from each that is."""
        watched = [(source, direct)]
        watched += [(name, other) for name, other in self._direct.items()
                    if other.fatal and name != source]
        fds = tuple(entry.fd for _, entry in watched)
        poller = self._polls.get(fds)
        if poller is None:
            poller = self._polls[fds] = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
        spin_s = self.spin_s if timeout_ms else 0.0
        ready = {fd for fd, _ in poll_spinning(poller, spin_s, timeout_ms)}
        for name, entry in watched:
            if entry.fd in ready:
                self._read_one(name, entry)

    def _read_one(self, source: str, direct: _Direct) -> None:
        self.reading = True
        try:
            span_ns = tracing.current().start()
            frame = direct.channel.recv_frame(timeout_s=direct.op_timeout_s)
            tracing.current().frame("recv", source, span_ns, frame.kind, frame.step,
                                    frame.microbatch, frame.array.nbytes)
            self.put(source, frame)
        except Exception as exc:  # noqa: BLE001 - filed for the waiter, as a receiver would
            self.fail(read_failure(source, exc), None if direct.fatal else source)
        finally:
            self.reading = False

    def discard(self, sources: list[str]) -> None:
        """Forget the frames and failures of ``sources`` (their links are being replaced)."""
        with self._cond:
            for source in sources:
                self._items.pop(source, None)
                self._source_failures.pop(source, None)
                if self._direct.pop(source, None) is not None:
                    self._polls.clear()

    def depth(self, source: str) -> int:
        with self._cond:
            return len(self._items.get(source, ()))


def read_failure(source: str, exc: Exception) -> InboxFailure:
    """What a waiter for ``source`` is told when reading it failed with ``exc``."""
    if isinstance(exc, ChannelClosed):
        return PeerClosed(f"{source} closed its pipe (the process exited?)")
    return InboxFailure(f"{source}: {type(exc).__name__}: {exc}")


def reads_directly(channel: Channel, most_bytes_in_flight: int) -> bool:
    """Whether ``channel``'s pipe holds ``most_bytes_in_flight`` (what the peer may send
    before this side reads), so that its waiter may read it itself (:meth:`Inbox.read_directly`)."""
    capacity = channel.read_capacity()
    return capacity is not None and most_bytes_in_flight <= capacity


class Receivers:
    """Owns the receiver threads: starts one per channel, always stops and joins them."""

    def __init__(self, inbox: Inbox, *, op_timeout_s: float | None) -> None:
        self.inbox = inbox
        self.op_timeout_s = op_timeout_s
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._threads: list[threading.Thread] = []

    def start(self, source: str, channel: Channel, *, fatal: bool = False) -> None:
        """Read ``channel`` into the inbox under ``source``; a ``fatal`` channel's failure fails
        every source (the control pipe: without the coordinator nothing should go on)."""
        self._threads.append(start_helper(self._run, name=f"recv-{source}",
                                          args=(source, channel, fatal)))

    def _run(self, source: str, channel: Channel, fatal: bool) -> None:
        poller = select.poll()
        poller.register(channel.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    return
                # Readable (or hung up): a whole frame must now arrive within the timeout,
                # else the sender is stalled mid-frame.
                span_ns = tracing.current().start()
                frame = channel.recv_frame(timeout_s=self.op_timeout_s)
                tracing.current().frame("recv", source, span_ns, frame.kind, frame.step,
                                        frame.microbatch, frame.array.nbytes)
                self.inbox.put(source, frame)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the main thread
            self.inbox.fail(read_failure(source, exc), None if fatal else source)

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
