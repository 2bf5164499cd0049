"""The channel interface: a stream of frames to one peer, whatever carries it.

Implementations: :class:`pipetrain.wire.pipe.PipeChannel` (``os.pipe``) and
:class:`pipetrain.wire.mpi_channel.MpiChannel` (MPI point-to-point). Both make the same checks
on what they receive (``pipetrain.wire.frames``) and raise the same errors, and ``fileno()`` is
readable when a frame can be received, so ``poll`` loops work on either.
"""

from __future__ import annotations

import abc
from typing import Self

import numpy as np

from pipetrain.wire.frames import Frame, Kind


class ChannelClosed(EOFError):
    """The peer closed its end (cleanly, at a frame boundary), or this channel is closed."""


class ClosedMidFrame(ChannelClosed):
    """The peer's end closed in the middle of a frame: it died while sending (a
    :class:`~pipetrain.wire.frames.ProtocolError` too, the stream being cut)."""


class ChannelTimeout(TimeoutError):
    """The deadline passed before the operation completed."""


class Channel(abc.ABC):
    """A bidirectional (or one-way) stream of frames to one peer."""

    name: str

    @abc.abstractmethod
    def send_frame(self, kind: Kind, step: int, microbatch: int, array: np.ndarray, *,
                   timeout_s: float | None = None) -> None: ...

    @abc.abstractmethod
    def recv_frame(self, *, timeout_s: float | None = None,
                   out: np.ndarray | None = None) -> Frame: ...

    @abc.abstractmethod
    def fileno(self) -> int:
        """An fd that is readable while a frame (or the end of the stream) can be received."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def read_capacity(self) -> int | None:
        """How many bytes the peer can send before this side reads (its sends then never
        block), or None when unknown."""
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
