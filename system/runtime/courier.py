"""Handing file descriptors between the coordinator and a running worker.

In-place recovery gives processes that are already running new pipes (a survivor's links to a
replacement) and hands in-memory snapshots (``pipetrain.runtime.snapshot``, a memfd each) from
the process that holds one to the one that needs it. A pipe cannot carry an fd; a Unix socket
can (``SCM_RIGHTS``). So every pipe worker has, beside its control pipe, one end of a
``socketpair`` to the coordinator: the *courier*. It carries nothing but batches of fds, each
with the names of the fds in it; which batch to expect is always said first on the control
channel, so the courier is only ever read by the one thread that just read that command.

Why not send the fds over a socket that is also the control channel: the control channel is
read ahead by a receiver thread, and bytes that carry fds read with a plain ``read`` lose them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket

MAX_FDS = 250  # SCM_MAX_FD is 253 on Linux
BATCH_BYTES = 1 << 16


class CourierError(RuntimeError):
    """A batch of fds did not arrive, or not the one announced."""


class Courier:
    """One end of the courier socket; owns it (``close`` closes it)."""

    def __init__(self, sock: socket.socket, *, name: str) -> None:
        self.sock = sock
        self.name = name

    @classmethod
    def from_fd(cls, fd: int, *, name: str) -> Courier:
        return cls(socket.socket(fileno=fd), name=name)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, fds: dict[str, int]) -> None:
        """Send ``fds`` (name -> fd) as one batch; the caller keeps (and may close) its own."""
        if len(fds) > MAX_FDS:
            raise CourierError(f"{self.name}: {len(fds)} fds in one batch (at most {MAX_FDS})")
        names = json.dumps(list(fds)).encode()
        socket.send_fds(self.sock, [len(names).to_bytes(4, "little"), names], list(fds.values()))

    def receive(self, expected: list[str], *, timeout_s: float = 10.0) -> dict[str, int]:
        """The next batch, which must hold exactly the fds ``expected`` names (an empty list
        means no batch was sent). The fds are new in this process and the caller's to close."""
        if not expected:
            return {}
        if not select.select([self.sock], [], [], timeout_s)[0]:
            raise CourierError(f"{self.name}: no fds within {timeout_s}s (expected "
                               f"{', '.join(expected)})")
        data, fds, _flags, _ = socket.recv_fds(self.sock, BATCH_BYTES, MAX_FDS)
        try:
            if len(data) < 4:
                raise CourierError(f"{self.name}: the courier closed (peer gone?)")
            size = int.from_bytes(data[:4], "little")
            names = json.loads(data[4:4 + size].decode())
            if names != list(expected) or len(fds) != len(names):
                raise CourierError(f"{self.name}: expected fds {expected}, got {names} "
                                   f"({len(fds)} fds)")
        except (CourierError, ValueError):
            for fd in fds:
                os.close(fd)
            raise
        return dict(zip(names, fds, strict=True))

    def close(self) -> None:
        self.sock.close()


def courier_pair(name: str) -> tuple[Courier, int]:
    """(the coordinator's end, the fd of the worker's end: inheritable, to pass at spawn)."""
    # SEQPACKET: one batch is one message, never glued to the next.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = theirs.detach()
    return Courier(ours, name=name), fd


def close_all(fds: dict[str, int] | list[int]) -> None:
    for fd in (fds.values() if isinstance(fds, dict) else fds):
        with contextlib.suppress(OSError):
            os.close(fd)
