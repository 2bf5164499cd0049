"""Frames over ``os.pipe``: :class:`PipeChannel`, the pipe transport's channel.

A channel is a pair of pipe file descriptors (one to read from, one to write to; either may be
absent). Payloads move between the pipe and the array's own memory with writev/readv, never
copied or pickled. All fds are non-blocking and every wait goes through poll(), so every
operation honours a deadline.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import select
import time
from collections.abc import Callable

import crc32c
import numpy as np

from pipetrain.wire.channel import Channel, ChannelClosed, ChannelTimeout, ClosedMidFrame
from pipetrain.wire.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_SIZE,
    Frame,
    Kind,
    ProtocolError,
    byte_view,
    check_payload_crc,
    decode_header,
    describe,
    encode_header,
)

PIPE_SIZE = 1 << 20
# Payloads are read in slices of this size and checksummed slice by slice while the slice is
# still in cache. Smaller reads also free pipe space sooner, so the writer refills the pipe
# while this side checksums; reading a whole payload and checksumming it afterwards leaves the
# pipe idle meanwhile (bench/transport.py measures both against a raw copy).
READ_CHUNK = 128 * 1024
_PIPE_MAX_SIZE_FILE = "/proc/sys/fs/pipe-max-size"


def open_pipe() -> tuple[int, int]:
    """(read_fd, write_fd), close-on-exec so only fds passed via pass_fds reach children."""
    return os.pipe2(os.O_CLOEXEC)


def _grow_pipe(fd: int) -> None:
    # A bigger buffer lets a whole activation sit in the pipe while the peer is busy. The
    # kernel caps unprivileged requests at pipe-max-size, so ask for no more than that.
    size = PIPE_SIZE
    try:
        with open(_PIPE_MAX_SIZE_FILE) as f:
            size = min(size, int(f.read()))
    except (OSError, ValueError):
        pass
    try:
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < size:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, AttributeError):  # not a pipe, over the per-user limit, or not Linux
        pass


class PipeChannel(Channel):
    """Frames over pipes. Takes ownership of the fds once constructed (close() closes them).

    One thread may send while another receives; two concurrent senders (or receivers) are
    not supported. If an operation fails in the middle of a frame (timeout, corrupt header,
    mismatched ``out``) that direction is out of sync and every later call on it raises.
    """

    def __init__(self, read_fd: int | None, write_fd: int | None, *, name: str,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if read_fd is None and write_fd is None:
            raise ValueError(f"{name}: need a read fd, a write fd, or both")
        self.name = name
        self.max_frame_bytes = max_frame_bytes
        for fd in (read_fd, write_fd):
            if fd is not None:
                _grow_pipe(fd)
                # Note: O_NONBLOCK lives on the open file description, which is shared with
                # any process that still holds a copy of this end; parents close theirs.
                os.set_blocking(fd, False)
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._header_buf = bytearray(HEADER_SIZE)
        # One poll object per direction, built once: a wait is on the hot path of every frame
        # bigger than the pipe. The sender and the receiver may be different threads.
        self._rx_poll = self._poller(read_fd, select.POLLIN)
        self._tx_poll = self._poller(write_fd, select.POLLOUT)
        self._rx_broken: str | None = None
        self._tx_broken: str | None = None

    # -- sending ---------------------------------------------------------------------------

    def send_frame(self, kind: Kind, step: int, microbatch: int, array: np.ndarray, *,
                   timeout_s: float | None = None) -> None:
        self._usable(self._write_fd, self._tx_broken, "send")
        deadline = _deadline(timeout_s)
        if array.nbytes > self.max_frame_bytes:  # fail here rather than at the receiver
            raise ProtocolError(f"{self.name}: frame of {array.nbytes} bytes exceeds the "
                                f"maximum of {self.max_frame_bytes}")
        header = encode_header(kind, step, microbatch, array)
        self.write_buffers([memoryview(header), byte_view(array)], deadline, timeout_s,
                           lambda: describe(kind, step, microbatch))

    def write_buffers(self, buffers: list[memoryview], deadline: float | None,
                      timeout_s: float | None, what: str | Callable[[], str]) -> None:
        """Write ``buffers`` completely (one frame's bytes), or fail with a clear error
        naming ``what`` (a callable: formatted only then).

        Public for a channel wrapped at the ``wrap_channel`` hook (the harness's link faults
        send frames whose bytes were damaged on purpose); everything else sends with
        :meth:`send_frame`.
        """
        fd = self._usable(self._write_fd, self._tx_broken, "send")
        pending = [b for b in buffers if b.nbytes]
        total, sent = sum(b.nbytes for b in pending), 0
        while pending:
            try:
                n = os.writev(fd, pending)
            except BlockingIOError:  # pipe full: wait for the reader to drain it
                if callable(what):
                    what = what()
                try:
                    self._wait(self._tx_poll, deadline, timeout_s,
                               f"send {what} (sent {sent} of {total} bytes)")
                except ChannelTimeout:
                    if sent:  # the peer now holds a partial frame we can never complete
                        self._tx_broken = "an earlier send timed out mid-frame"
                    raise
                continue
            except BrokenPipeError:
                raise ChannelClosed(f"{self.name}: peer closed the pipe") from None
            sent += n
            while n:  # drop what was written from the front of the buffer list
                k = min(n, pending[0].nbytes)
                pending[0], n = pending[0][k:], n - k
                if not pending[0].nbytes:
                    pending.pop(0)

    # -- receiving -------------------------------------------------------------------------

    def recv_frame(self, *, timeout_s: float | None = None,
                   out: np.ndarray | None = None) -> Frame:
        fd = self._usable(self._read_fd, self._rx_broken, "receive")
        deadline = _deadline(timeout_s)
        try:
            self._read_exact(fd, memoryview(self._header_buf), 0, HEADER_SIZE, deadline,
                             timeout_s, "frame header")
            header = decode_header(self._header_buf, self.max_frame_bytes)
            if out is None:
                array = np.empty(header.shape, dtype=header.dtype)
            elif (out.dtype != header.dtype or out.shape != header.shape
                  or not out.flags.c_contiguous or not out.flags.writeable):
                raise ProtocolError(
                    f"{self.name}: {header.describe()} carries {header.dtype} {header.shape} "
                    f"but out is {out.dtype} {out.shape} (must match exactly, C-contiguous "
                    f"and writeable)")
            else:
                array = out
            crc = self._read_exact(fd, byte_view(array), HEADER_SIZE,
                                   HEADER_SIZE + header.nbytes, deadline, timeout_s,
                                   lambda: f"payload of {header.describe()}",
                                   chunk=READ_CHUNK)
        except ProtocolError as exc:  # header consumed, payload not (fully) consumed
            self._rx_broken = f"an earlier receive failed mid-frame ({exc})"
            raise
        check_payload_crc(header, crc)  # the whole frame was consumed: still in sync
        return Frame(header.kind, header.step, header.microbatch, array)

    def _read_exact(self, fd: int, buf: memoryview, offset: int, total: int,
                    deadline: float | None, timeout_s: float | None,
                    what: str | Callable[[], str], *, chunk: int | None = None) -> int:
        """Fill ``buf``, which holds frame bytes offset..total, from the pipe, reading at most
        ``chunk`` bytes at a time; returns the CRC32C of ``buf``, folded in as bytes arrive.
        ``what`` names the bytes in an error; a callable is only formatted then (every frame
        of every step passes here)."""
        got, crc = 0, 0
        while got < buf.nbytes:
            end = buf.nbytes if chunk is None else min(buf.nbytes, got + chunk)
            try:
                n = os.readv(fd, [buf[got:end]])
            except BlockingIOError:
                if callable(what):
                    what = what()
                try:
                    self._wait(self._rx_poll, deadline, timeout_s,
                               f"receive {what} (got {offset + got} of {total} bytes)")
                except ChannelTimeout:
                    if offset + got:  # part of a frame is consumed and would be lost
                        self._rx_broken = "an earlier receive timed out mid-frame"
                    raise
                continue
            if n == 0:
                if offset + got == 0:
                    raise ChannelClosed(f"{self.name}: peer closed the pipe")
                if callable(what):
                    what = what()
                raise TruncatedFrame(f"{self.name}: truncated frame: got {offset + got} of "
                                     f"{total} bytes of {what} before end-of-file")
            if chunk is not None:
                crc = crc32c.crc32c(buf[got:got + n], crc)
            got += n
        return crc

    @staticmethod
    def _poller(fd: int | None, event: int) -> select.poll | None:
        if fd is None:
            return None
        poller = select.poll()
        poller.register(fd, event)
        return poller

    def _wait(self, poller: select.poll, deadline: float | None, timeout_s: float | None,
              what: str) -> None:
        if deadline is None:
            timeout_ms = None
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChannelTimeout(f"{self.name}: timed out after {timeout_s}s waiting to "
                                     f"{what}")
            timeout_ms = math.ceil(remaining * 1000)  # round up: no busy loop near the end
        poller.poll(timeout_ms)  # readiness, HUP or ERR: the next read/write tells which

    def _usable(self, fd: int | None, broken: str | None, op: str) -> int:
        if fd is None:
            if self._read_fd is None and self._write_fd is None:
                raise ChannelClosed(f"{self.name}: channel is closed")
            raise ValueError(f"{self.name}: channel has no fd to {op} on")
        if broken is not None:
            raise ProtocolError(f"{self.name}: cannot {op}: {broken}; stream is out of sync")
        return fd

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def readable_fileno(self) -> int | None:
        """The read fd (for callers' select/poll), or None if write-only or closed."""
        return self._read_fd

    def fileno(self) -> int:
        if self._read_fd is None:
            raise ValueError(f"{self.name}: no readable fd (write-only or closed)")
        return self._read_fd

    def read_capacity(self) -> int | None:
        """The inbound pipe's buffer size (F_GETPIPE_SZ)."""
        if self._read_fd is None:
            return None
        try:
            return fcntl.fcntl(self._read_fd, fcntl.F_GETPIPE_SZ)
        except (OSError, AttributeError):  # not Linux
            return None

    def close_write(self) -> None:
        """Close only the sending side (the peer reads end-of-file)."""
        if self._write_fd is not None:
            fd, self._write_fd = self._write_fd, None
            os.close(fd)

    def close(self) -> None:
        fds, self._read_fd, self._write_fd = (self._read_fd, self._write_fd), None, None
        for fd in fds:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise

    def __repr__(self) -> str:
        return f"PipeChannel({self.name!r}, read_fd={self._read_fd}, write_fd={self._write_fd})"


class TruncatedFrame(ProtocolError, ClosedMidFrame):
    """End-of-file inside a frame: a protocol error for the stream, and for whoever waits on
    it the peer closing (most likely its death; the coordinator names the cause)."""


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s
