"""PipeChannel over real os.pipe fds: round trips, EOF, truncation, timeouts, corruption."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pipetrain.wire.channel import Channel, ChannelClosed, ChannelTimeout
from pipetrain.wire.frames import HEADER_SIZE, Kind, ProtocolError
from pipetrain.wire.pipe import PIPE_SIZE, PipeChannel, open_pipe
from tests.wire.whole_frames import encode_frame


@pytest.fixture
def channels() -> Iterator[tuple[PipeChannel, PipeChannel]]:
    """(sender, receiver) joined by one pipe."""
    read_fd, write_fd = open_pipe()
    with PipeChannel(None, write_fd, name="tx") as tx, PipeChannel(read_fd, None, name="rx") as rx:
        yield tx, rx


class RawWriter:
    """The write end of a pipe, driven by hand (to send broken frames)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:  # small frames: the (blocking) pipe takes them whole
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.fixture
def raw_writer() -> Iterator[tuple[RawWriter, PipeChannel]]:
    """(hand-driven writer, receiving channel) joined by one pipe."""
    read_fd, write_fd = open_pipe()
    writer = RawWriter(write_fd)
    try:
        with PipeChannel(read_fd, None, name="rx") as rx:
            yield writer, rx
    finally:
        writer.close()


def in_thread(fn: Callable[[], None]) -> Callable[[], None]:
    """Run fn in a thread; returns a join() that re-raises whatever fn raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the joining thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(timeout=30)
        assert not thread.is_alive(), "writer thread hung"
        if errors:
            raise errors[0]

    return join


def test_is_a_channel(channels: tuple[PipeChannel, PipeChannel]) -> None:
    tx, rx = channels
    assert isinstance(tx, Channel) and isinstance(rx, Channel)
    with pytest.raises(ValueError, match="no readable fd"):
        tx.fileno()
    with pytest.raises(ValueError, match="no fd to receive"):
        tx.recv_frame()


@pytest.mark.parametrize(
    "array",
    [np.array(3.5), np.array(7, np.int64), np.zeros((0, 5), np.float32), np.zeros(0, np.uint8),
     np.arange(24, dtype=np.int32).reshape(2, 3, 4), np.linspace(0, 1, 16).reshape(1, 2, 2, 4)],
    ids=["0d-f64", "0d-i64", "empty-2d", "empty-1d", "small-3d", "small-4d"],
)
def test_round_trip_small(channels: tuple[PipeChannel, PipeChannel], array: np.ndarray) -> None:
    tx, rx = channels
    tx.send_frame(Kind.ACTIVATION, 5, 2, array, timeout_s=5)
    frame = rx.recv_frame(timeout_s=5)
    assert (frame.kind, frame.step, frame.microbatch) == (Kind.ACTIVATION, 5, 2)
    assert frame.array.dtype == array.dtype and frame.array.shape == array.shape
    assert np.array_equal(frame.array, array)


def test_several_frames_in_a_row(channels: tuple[PipeChannel, PipeChannel]) -> None:
    tx, rx = channels
    for micro in range(5):
        tx.send_frame(Kind.GRADIENT, 1, micro, np.full(10, micro, np.float64), timeout_s=5)
    for micro in range(5):
        frame = rx.recv_frame(timeout_s=5)
        assert frame.microbatch == micro and np.all(frame.array == micro)


def test_round_trip_8_mib_through_a_writer_thread(
        channels: tuple[PipeChannel, PipeChannel]) -> None:
    tx, rx = channels
    array = np.random.default_rng(0).standard_normal(1 << 20)  # 8 MiB of float64
    join = in_thread(lambda: tx.send_frame(Kind.PARAMETER, 9, 0, array, timeout_s=20))
    try:
        frame = rx.recv_frame(timeout_s=20)
    finally:
        join()
    assert frame.array.tobytes() == array.tobytes()


def test_recv_into_out_fills_it_in_place(channels: tuple[PipeChannel, PipeChannel]) -> None:
    tx, rx = channels
    array = np.arange(300_000, dtype=np.float32).reshape(600, 500)  # larger than one pipe read
    out = np.empty_like(array)
    join = in_thread(lambda: tx.send_frame(Kind.ACTIVATION, 1, 0, array, timeout_s=20))
    try:
        frame = rx.recv_frame(timeout_s=20, out=out)
    finally:
        join()
    assert frame.array is out
    assert np.array_equal(out, array)


@pytest.mark.parametrize(
    "out",
    [np.empty((2, 3), np.float64), np.empty((3, 2), np.float32), np.empty(6, np.float32),
     np.empty((2, 6), np.float32)[:, ::2]],
    ids=["dtype", "shape", "ndim", "non-contiguous"],
)
def test_mismatched_out_is_rejected(channels: tuple[PipeChannel, PipeChannel],
                                    out: np.ndarray) -> None:
    tx, rx = channels
    tx.send_frame(Kind.ACTIVATION, 1, 0, np.zeros((2, 3), np.float32), timeout_s=5)
    with pytest.raises(ProtocolError, match="must match exactly"):
        rx.recv_frame(timeout_s=5, out=out)
    with pytest.raises(ProtocolError, match="out of sync"):  # the payload is still unread
        rx.recv_frame(timeout_s=5)


def test_eof_at_frame_boundary_is_channel_closed(
        channels: tuple[PipeChannel, PipeChannel]) -> None:
    tx, rx = channels
    tx.send_frame(Kind.CONTROL, 0, 0, np.zeros(3, np.uint8), timeout_s=5)
    tx.close()
    tx.close()  # idempotent
    rx.recv_frame(timeout_s=5)
    with pytest.raises(ChannelClosed, match="rx: peer closed the pipe"):
        rx.recv_frame(timeout_s=5)


@pytest.mark.parametrize("cut", [HEADER_SIZE // 2, HEADER_SIZE, HEADER_SIZE + 20])
def test_eof_mid_frame_is_truncation(raw_writer: tuple[RawWriter, PipeChannel], cut: int) -> None:
    writer, rx = raw_writer
    data = encode_frame(Kind.ACTIVATION, 4, 0, np.arange(16, dtype=np.float32))
    writer.write(data[:cut])
    writer.close()
    with pytest.raises(ProtocolError, match=f"truncated frame: got {cut} of"):
        rx.recv_frame(timeout_s=5)


def test_corrupted_payload_byte_in_flight(raw_writer: tuple[RawWriter, PipeChannel]) -> None:
    writer, rx = raw_writer
    good = encode_frame(Kind.GRADIENT, 2, 3, np.arange(16, dtype=np.float32))
    bad = bytearray(good)
    bad[HEADER_SIZE + 5] ^= 0x10
    writer.write(bytes(bad) + good)
    with pytest.raises(ProtocolError,
                       match="payload checksum mismatch in GRADIENT frame step 2 micro-batch 3"):
        rx.recv_frame(timeout_s=5)
    # The whole bad frame was consumed, so the stream is still in sync.
    assert np.array_equal(rx.recv_frame(timeout_s=5).array, np.arange(16, dtype=np.float32))


def test_corrupted_header_byte_in_flight(raw_writer: tuple[RawWriter, PipeChannel]) -> None:
    writer, rx = raw_writer
    bad = bytearray(encode_frame(Kind.GRADIENT, 2, 3, np.arange(16, dtype=np.float32)))
    bad[53] ^= 0x80  # inside nbytes: must be caught before it is trusted
    writer.write(bytes(bad))
    with pytest.raises(ProtocolError, match="header checksum mismatch"):
        rx.recv_frame(timeout_s=5)


def test_recv_timeout_on_empty_pipe(channels: tuple[PipeChannel, PipeChannel]) -> None:
    tx, rx = channels
    with pytest.raises(ChannelTimeout, match="rx: timed out after 0.05s waiting to receive "
                                             "frame header"):
        rx.recv_frame(timeout_s=0.05)
    with pytest.raises(ChannelTimeout):
        rx.recv_frame(timeout_s=0)
    # Nothing was consumed, so the channel is still usable.
    tx.send_frame(Kind.CONTROL, 0, 0, np.zeros(1, np.uint8), timeout_s=5)
    assert rx.recv_frame(timeout_s=5).kind == Kind.CONTROL


def test_recv_timeout_mid_frame(raw_writer: tuple[RawWriter, PipeChannel]) -> None:
    writer, rx = raw_writer
    writer.write(encode_frame(Kind.ACTIVATION, 0, 0, np.zeros(8, np.float32))[:-4])
    with pytest.raises(ChannelTimeout, match="payload of ACTIVATION frame"):
        rx.recv_frame(timeout_s=0.05)
    with pytest.raises(ProtocolError, match="timed out mid-frame"):
        rx.recv_frame(timeout_s=0.05)


def test_send_to_closed_reader_is_channel_closed(
        channels: tuple[PipeChannel, PipeChannel]) -> None:
    tx, rx = channels
    rx.close()
    with pytest.raises(ChannelClosed, match="tx: peer closed the pipe"):
        tx.send_frame(Kind.ACTIVATION, 0, 0, np.zeros(4, np.float32), timeout_s=5)
    with pytest.raises(ChannelClosed, match="channel is closed"):
        rx.recv_frame()


def test_send_times_out_when_nobody_reads(channels: tuple[PipeChannel, PipeChannel]) -> None:
    tx, _rx = channels
    big = np.zeros(4 * PIPE_SIZE, np.uint8)  # more than the pipe can hold
    with pytest.raises(ChannelTimeout, match="tx: timed out after 0.05s waiting to send "
                                             "PARAMETER frame step 1 micro-batch 0"):
        tx.send_frame(Kind.PARAMETER, 1, 0, big, timeout_s=0.05)
    # Part of the frame is in the pipe; another send would interleave with it.
    with pytest.raises(ProtocolError, match="timed out mid-frame"):
        tx.send_frame(Kind.PARAMETER, 2, 0, np.zeros(1, np.uint8), timeout_s=0.05)


def test_send_rejects_oversized_frame_before_writing() -> None:
    read_fd, write_fd = open_pipe()
    with PipeChannel(read_fd, write_fd, name="loop", max_frame_bytes=100) as loop:
        with pytest.raises(ProtocolError, match="frame of 101 bytes exceeds the maximum of 100"):
            loop.send_frame(Kind.PARAMETER, 0, 0, np.zeros(101, np.uint8))
        with pytest.raises(ChannelTimeout):  # nothing was written
            loop.recv_frame(timeout_s=0)
        loop.send_frame(Kind.PARAMETER, 0, 0, np.zeros(100, np.uint8))
        assert loop.recv_frame(timeout_s=5).array.nbytes == 100


def _pipe_max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except OSError:
        return 0


@pytest.mark.skipif(_pipe_max_size() < PIPE_SIZE, reason="pipe-max-size below 1 MiB")
def test_pipe_buffer_is_grown_to_1_mib(channels: tuple[PipeChannel, PipeChannel]) -> None:
    tx, rx = channels
    assert fcntl.fcntl(rx.fileno(), fcntl.F_GETPIPE_SZ) == PIPE_SIZE
    assert not os.get_blocking(rx.fileno())


def test_open_pipe_is_cloexec() -> None:
    read_fd, write_fd = open_pipe()
    try:
        assert not os.get_inheritable(read_fd) and not os.get_inheritable(write_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_needs_at_least_one_fd() -> None:
    with pytest.raises(ValueError, match="need a read fd"):
        PipeChannel(None, None, name="nothing")
