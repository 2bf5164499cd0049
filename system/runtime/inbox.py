"""Frames read ahead by receiver threads, handed to the main thread by source.

Each inbound channel has its own receiver thread, so a neighbour's send never waits for this
stage's main thread (no send/send deadlock between two stages whose frames exceed the pipe
buffer) and reading overlaps compute. The threads and the main thread meet here, under one
``Condition``: a condition (not a Queue per source) because the main thread must also wake when
*any* receiver fails, and one condition variable covers both "my frame arrived" and "everything
is broken".
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from pipetrain import tracing
from pipetrain.threads import start_helper
from pipetrain.wire.channel import Channel, ChannelClosed


class InboxFailure(RuntimeError):
    """A receiver failed (peer gone, corrupt frame, timeout); names the source."""


class PeerClosed(InboxFailure):
    """The peer closed its pipe: usually the consequence of its own failure, not ours."""


class InboxClosed(InboxFailure):
    """The worker is shutting down: whoever still waits for a frame gives up."""


class Inbox:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[str, deque[Any]] = {}
        self._failure: InboxFailure | None = None
        self._source_failures: dict[str, InboxFailure] = {}

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
                self._cond.wait(0.5)

    def discard(self, sources: list[str]) -> None:
        """Forget the frames and failures of ``sources`` (their links are being replaced)."""
        with self._cond:
            for source in sources:
                self._items.pop(source, None)
                self._source_failures.pop(source, None)

    def depth(self, source: str) -> int:
        with self._cond:
            return len(self._items.get(source, ()))


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
        except ChannelClosed:
            self.inbox.fail(PeerClosed(f"{source} closed its pipe (the process exited?)"),
                            None if fatal else source)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the main thread
            self.inbox.fail(InboxFailure(f"{source}: {type(exc).__name__}: {exc}"),
                            None if fatal else source)

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
