"""Frames to and from one MPI peer rank (``--transport mpi``); see ``pipetrain.wire.mpi_hub``."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque

import numpy as np

from pipetrain.wire.channel import Channel, ChannelClosed, ChannelTimeout
from pipetrain.wire.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    Frame,
    Kind,
    ProtocolError,
    byte_view,
    describe,
    encode_header,
)
from pipetrain.wire.mpi_hub import MpiHub


class MpiChannel(Channel):
    """Frames to and from one peer rank on one tag (see the module docstring).

    ``fileno()`` is readable exactly while received frames are queued, so ``poll`` works on it as
    on a pipe. One thread may send while another receives, as with pipes. ``stall_timeout_s``
    bounds how long a payload may lag behind its header (the mid-frame receive timeout).
    """

    def __init__(self, hub: MpiHub, peer: int, tag: int, *, name: str,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 stall_timeout_s: float | None = None) -> None:
        self.hub = hub
        self.peer = peer
        self.tag = tag
        self.name = name
        self.max_frame_bytes = max_frame_bytes
        self.stall_timeout_s = stall_timeout_s
        self._notify_r, self._notify_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._cond = threading.Condition()
        self._queue: deque[Frame | BaseException] = deque()
        self._signalled = False
        self._closed = False
        self._rx_broken: str | None = None
        self._tx_broken: str | None = None
        self._send_lock = threading.Lock()
        self._in_flight = 0  # bytes of sends not yet complete; guarded by the hub's lock
        hub.add(self)

    # -- sending ---------------------------------------------------------------------------

    def send_frame(self, kind: Kind, step: int, microbatch: int, array: np.ndarray, *,
                   timeout_s: float | None = None) -> None:
        if self._closed:
            raise ChannelClosed(f"{self.name}: channel is closed")
        if self._tx_broken is not None:
            raise ProtocolError(f"{self.name}: cannot send: {self._tx_broken}")
        if array.nbytes > self.max_frame_bytes:  # fail here rather than at the receiver
            raise ProtocolError(f"{self.name}: frame of {array.nbytes} bytes exceeds the "
                                f"maximum of {self.max_frame_bytes}")
        header = encode_header(kind, step, microbatch, array)
        payload = None
        if array.nbytes:
            payload = np.empty(array.nbytes, dtype=np.uint8)
            payload[:] = byte_view(array)  # ours now: the caller may reuse its array at once
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._send_lock:
            self.hub.post_send(self, header, payload, deadline, timeout_s,
                               describe(kind, step, microbatch))

    def send_raw(self, header: bytes, payload: bytes | None) -> None:
        """Send bytes as they are (a header that may be damaged on purpose): for tests that
        show the receiver's checks; everything else sends with :meth:`send_frame`."""
        data = None if payload is None else np.frombuffer(payload, dtype=np.uint8).copy()
        with self._send_lock:
            self.hub.post_send(self, bytes(header), data, None, None, "raw frame")

    # -- receiving -------------------------------------------------------------------------

    def _deliver(self, item: Frame | BaseException) -> None:
        """Called by the hub thread: queue a frame (or the error that ends the stream)."""
        with self._cond:
            if self._closed:
                return
            self._queue.append(item)
            if not self._signalled:
                self._signalled = True
                os.write(self._notify_w, b"\x01")
            self._cond.notify_all()

    def recv_frame(self, *, timeout_s: float | None = None,
                   out: np.ndarray | None = None) -> Frame:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._queue:
                if self._closed:
                    raise ChannelClosed(f"{self.name}: channel is closed")
                if self._rx_broken is not None:
                    raise ProtocolError(f"{self.name}: cannot receive: {self._rx_broken}; "
                                        "stream is out of sync")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ChannelTimeout(f"{self.name}: timed out after {timeout_s}s waiting to "
                                         f"receive a frame from rank {self.peer}")
                self._cond.wait(remaining)
            item = self._queue.popleft()
            if not self._queue:
                self._signalled = False
                with contextlib.suppress(BlockingIOError):
                    os.read(self._notify_r, 64)
        if isinstance(item, BaseException):
            self._rx_broken = f"an earlier receive failed ({item})"
            raise item
        if out is None:
            return item
        array = item.array
        if (out.dtype != array.dtype or out.shape != array.shape or not out.flags.c_contiguous
                or not out.flags.writeable):
            self._rx_broken = "a frame did not match the caller's out array"
            raise ProtocolError(
                f"{self.name}: {describe(item.kind, item.step, item.microbatch)} carries "
                f"{array.dtype} {array.shape} but out is {out.dtype} {out.shape} (must match "
                f"exactly, C-contiguous and writeable)")
        out[...] = array
        return Frame(item.kind, item.step, item.microbatch, out)

    # -- lifecycle -------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._closed:
            raise ValueError(f"{self.name}: channel is closed")
        return self._notify_r

    def close(self) -> None:
        """Stop receiving (the posted receive is cancelled; frames sent later stay unmatched in
        MPI). Sends already posted still complete in the hub's hands."""
        if self._closed:
            return
        self.hub.remove(self)
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        os.close(self._notify_r)
        os.close(self._notify_w)

    def __repr__(self) -> str:
        return f"MpiChannel({self.name!r}, peer={self.peer}, tag={self.tag})"
