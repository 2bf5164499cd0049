"""How a worker reaches its neighbours and the coordinator's fds: pipes or MPI.

:class:`Transport` is the one part of a worker that differs between the transports; the pipe
one is here, the MPI one in ``pipetrain.runtime.mpi_launcher``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from typing import Any, Protocol

from pipetrain.runtime import messages
from pipetrain.runtime.courier import Courier
from pipetrain.status import ExitCode
from pipetrain.wire.channel import Channel
from pipetrain.wire.pipe import PipeChannel

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the coordinator dies (Linux only; EOF is the backstop)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(ExitCode.FAILED)


class Transport(Protocol):
    """How a worker reaches its neighbours: the one part that differs between pipes and MPI."""

    keeps_control_open: bool  # the control channel outlives serve() (an MPI rank's last word)

    def prepare(self, init: messages.Init) -> None:
        """Before anything is built (the worker's output goes to its log from here)."""

    def take(self, names: list[str]) -> dict[str, int]:
        """The fds a command announced (``fds``), received from the coordinator."""

    def send(self, fds: dict[str, int]) -> None:
        """Hand fds to the coordinator (announced in the reply that follows)."""

    def open_link(self, name: str, endpoint: dict[str, Any],
                  op_timeout_s: float) -> Channel: ...


def redirect_output(log_path: str) -> None:
    """From here on this process's output goes to ``log_path`` (appended)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class PipeTransport:
    keeps_control_open = False

    def __init__(self, courier: Courier) -> None:
        self.courier = courier
        self._batch: dict[str, int] = {}

    def prepare(self, init: messages.Init) -> None:
        """A spare started with the spare's log: from now on, the position's."""
        if init.log_path:
            with contextlib.suppress(OSError):  # a full disk: the old log will do
                redirect_output(init.log_path)

    def take(self, names: list[str]) -> dict[str, int]:
        self._batch = self.courier.receive(names)
        return self._batch

    def send(self, fds: dict[str, int]) -> None:
        if fds:
            self.courier.send(fds)

    def open_link(self, name: str, endpoint: dict[str, Any], op_timeout_s: float) -> Channel:
        return PipeChannel(self._batch.pop(endpoint["read"]), self._batch.pop(endpoint["write"]),
                           name=name)

    def close(self) -> None:
        self.courier.close()


