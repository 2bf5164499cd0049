"""Run under ``mpirun -n 2``: MpiChannel between two real ranks, the pipe channel's checks.

Rank 0 sends, rank 1 receives and checks; every case uses its own tag, so a case that breaks
its stream (as a corrupt frame must) cannot disturb the next one. Prints one ``ok NAME`` line a
case on rank 1 and exits 0 when every case held (non-zero, with the reason, otherwise).
"""

from __future__ import annotations

import struct
import sys

import numpy as np

from pipetrain.runtime.mpi_launcher import drain
from pipetrain.wire.channel import ChannelClosed, ChannelTimeout
from pipetrain.wire.frames import (
    HEADER_SIZE,
    Kind,
    ProtocolError,
    encode_header,
)
from pipetrain.wire.mpi_channel import MpiChannel
from pipetrain.wire.mpi_hub import MpiHub, import_mpi

MPI = import_mpi()
comm = MPI.COMM_WORLD.Dup()
rank = comm.Get_rank()
hub = MpiHub(comm, MPI)
TIMEOUT = 30.0

ARRAYS = [
    np.arange(12, dtype="<f8").reshape(3, 4),
    np.linspace(-1, 1, 7, dtype="<f4"),
    np.arange(5, dtype="<i4"),
    np.arange(6, dtype="<i8").reshape(1, 2, 3),
    np.frombuffer(b"hello", dtype=np.uint8).copy(),
    np.empty((0, 4), dtype="<f8"),  # zero bytes: the header alone
    np.float64(2.5).reshape(()),     # a 0-d array
    np.random.default_rng(0).standard_normal((300, 500)),  # 1.2 MB: past any eager limit
]


def corrupt(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0x10
    return bytes(damaged)


def sender() -> None:
    def channel(tag: int) -> MpiChannel:
        return MpiChannel(hub, 1, tag, name=f"case {tag}")

    ch = channel(10)  # frames of every dtype and shape, in order
    for i, array in enumerate(ARRAYS):
        ch.send_frame(Kind.ACTIVATION, 7, i, array, timeout_s=TIMEOUT)
    ch = channel(11)  # the caller may reuse its array at once: the channel copied it
    array = np.ones(1000)
    ch.send_frame(Kind.GRADIENT, 1, 0, array, timeout_s=TIMEOUT)
    array[:] = -1
    header = encode_header(Kind.ACTIVATION, 1, 0, np.zeros(4))
    channel(12).send_raw(corrupt(header, 10), np.zeros(4).tobytes())  # header CRC
    big = bytearray(encode_header(Kind.ACTIVATION, 1, 0, np.zeros(4)))
    # A header that claims 2**40 bytes, with a valid checksum: refused before any allocation.
    struct.pack_into("<4Q", big, 20, 2**37, 0, 0, 0)  # shape (2**37,) of float64
    struct.pack_into("<Q", big, 52, 2**40)
    import crc32c

    struct.pack_into("<I", big, 64, crc32c.crc32c(bytes(big[:64])))
    channel(13).send_raw(bytes(big), None)
    payload = np.arange(4.0)
    frame = encode_header(Kind.ACTIVATION, 1, 0, payload) + payload.tobytes()
    channel(14).send_raw(frame[:HEADER_SIZE], corrupt(frame[HEADER_SIZE:], 3))  # payload CRC
    channel(15).send_raw(frame[:HEADER_SIZE], frame[HEADER_SIZE:-8])  # payload 8 bytes short
    channel(16).send_raw(frame[:HEADER_SIZE] + b"xx", None)  # not a 68-byte header
    ch = channel(17)  # a receiver's out= array must match exactly
    ch.send_frame(Kind.ACTIVATION, 1, 0, np.arange(6.0), timeout_s=TIMEOUT)
    ch.send_frame(Kind.ACTIVATION, 1, 1, np.arange(6.0), timeout_s=TIMEOUT)
    comm.Barrier()  # the receiver has checked everything


def receiver() -> None:
    failures: list[str] = []

    def case(name: str, ok: bool, detail: object = "") -> None:
        print(f"{'ok' if ok else 'FAILED'} {name} {detail if not ok else ''}".rstrip(),
              flush=True)
        if not ok:
            failures.append(name)

    def refused(tag: int, name: str, expected: str) -> None:
        ch = MpiChannel(hub, 0, tag, name=f"case {tag}")
        try:
            frame = ch.recv_frame(timeout_s=TIMEOUT)
        except ProtocolError as exc:
            case(name, expected in str(exc), exc)
            try:
                ch.recv_frame(timeout_s=0.1)
            except ProtocolError as again:
                case(f"{name}: stream out of sync afterwards", "out of sync" in str(again),
                     again)
            else:
                case(f"{name}: stream out of sync afterwards", False, "received a frame")
        else:
            case(name, False, f"received {frame}")
        ch.close()

    ch = MpiChannel(hub, 0, 10, name="case 10")
    for i, array in enumerate(ARRAYS):
        frame = ch.recv_frame(timeout_s=TIMEOUT)
        same = (frame.kind == Kind.ACTIVATION and frame.step == 7 and frame.microbatch == i
                and frame.array.dtype == array.dtype and frame.array.shape == array.shape
                and np.array_equal(frame.array, array))
        case(f"round trip {array.dtype} {array.shape}", same)
    try:
        ch.recv_frame(timeout_s=0.2)
    except ChannelTimeout:
        case("timeout when nothing comes", True)
    ch.close()
    try:
        ch.recv_frame(timeout_s=0.1)
    except ChannelClosed:
        case("closed channel refuses to receive", True)
    ch = MpiChannel(hub, 0, 11, name="case 11")
    case("payload copied at send", bool(np.all(ch.recv_frame(timeout_s=TIMEOUT).array == 1)))
    ch.close()
    refused(12, "corrupt header", "header checksum mismatch")
    refused(13, "oversized frame", "exceeds the maximum")
    refused(14, "corrupt payload", "payload checksum mismatch")
    refused(15, "truncated payload", "truncated frame")
    refused(16, "message too long for a header", "MPI receive from rank 0 failed")
    ch = MpiChannel(hub, 0, 17, name="case 17")
    out = np.empty(6)
    frame = ch.recv_frame(timeout_s=TIMEOUT, out=out)
    case("out= receives into the given array", frame.array is out and out[5] == 5.0)
    try:
        ch.recv_frame(timeout_s=TIMEOUT, out=np.empty(5))
    except ProtocolError as exc:
        case("out= of the wrong shape is refused", "must match exactly" in str(exc), exc)
    ch.close()
    comm.Barrier()
    if failures:
        sys.exit(f"failed: {failures}")


try:
    sender() if rank == 0 else receiver()
finally:
    left = drain(comm, MPI, hub.close(), 10.0)
    comm.Free()
    if left:
        sys.exit(f"rank {rank}: {left} sends never completed")
