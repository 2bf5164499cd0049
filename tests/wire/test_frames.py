"""Frame codec: round trips, and every corruption or truncation is rejected with a reason."""

from __future__ import annotations

import tracemalloc

import crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipetrain.wire.frames import (
    CODE_DTYPES,
    DEFAULT_MAX_FRAME_BYTES,
    DTYPE_CODES,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    VERSION,
    Frame,
    Header,
    Kind,
    ProtocolError,
    check_payload,
    decode_header,
    encode_header,
)
from tests.wire.whole_frames import decode_frame, encode_frame

# No example database (keeps .hypothesis/ out of the tree); no deadline (first CRC call is slow).
# Passed per test: loading a profile here would change hypothesis settings for other modules.
QUICK = {"database": None, "deadline": None}

DTYPES = list(DTYPE_CODES)
steps = st.integers(-(2**63), 2**63 - 1)
microbatches = st.integers(-(2**31), 2**31 - 1)
kinds = st.sampled_from(list(Kind))


@st.composite
def arrays(draw: st.DrawFn, max_side: int = 4) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=max_side))
    return draw(hnp.arrays(dtype, shape))


def signed_header(*, magic=MAGIC, version=VERSION, kind=int(Kind.ACTIVATION), code=1, ndim=1,
                  step=3, microbatch=1, dims=(2, 0, 0, 0), nbytes=8, payload_crc=0) -> bytes:
    """A header with arbitrary fields and a *correct* header checksum, so that only the
    field-level validation can reject it."""
    body = HEADER_STRUCT.pack(magic, version, kind, code, ndim, step, microbatch, *dims, nbytes,
                              payload_crc, 0)[:-4]
    return body + crc32c.crc32c(body).to_bytes(4, "little")


def test_header_layout() -> None:
    assert HEADER_SIZE == HEADER_STRUCT.size == 68
    assert HEADER_STRUCT.format.startswith("<")
    assert encode_header(Kind.GRADIENT, 0, 0, np.zeros(3, np.float32))[:4] == MAGIC
    assert {dt: CODE_DTYPES[c] for dt, c in DTYPE_CODES.items()} == {dt: dt for dt in DTYPES}


@given(kinds, steps, microbatches, arrays())
@settings(**QUICK)
def test_round_trip(kind: Kind, step: int, microbatch: int, array: np.ndarray) -> None:
    data = encode_frame(kind, step, microbatch, array)
    assert len(data) == HEADER_SIZE + array.nbytes
    frame = decode_frame(data)
    assert (frame.kind, frame.step, frame.microbatch) == (kind, step, microbatch)
    assert isinstance(frame.kind, Kind)
    assert frame.array.dtype == array.dtype and frame.array.shape == array.shape
    assert frame.array.tobytes() == array.tobytes()  # bitwise, NaN payloads included
    header = decode_header(data[:HEADER_SIZE])
    assert header == Header(kind, array.dtype, array.shape, step, microbatch, array.nbytes,
                            crc32c.crc32c(array.tobytes()))


@given(st.data())
@settings(max_examples=20, **QUICK)
def test_every_single_byte_flip_is_rejected(data: st.DataObject) -> None:
    array = data.draw(hnp.arrays(np.float32, (2, 3)))
    frame = encode_frame(Kind.ACTIVATION, 3, 1, array)
    masks = data.draw(st.lists(st.integers(1, 255), min_size=len(frame), max_size=len(frame)))
    for position, mask in enumerate(masks):
        corrupted = bytearray(frame)
        corrupted[position] ^= mask
        with pytest.raises(ProtocolError):
            decode_frame(bytes(corrupted))


def test_byte_flip_messages() -> None:
    frame = bytearray(encode_frame(Kind.ACTIVATION, 3, 1, np.arange(6, dtype=np.float32)))
    frame[-1] ^= 0x40
    with pytest.raises(ProtocolError,
                       match="payload checksum mismatch in ACTIVATION frame step 3 micro-batch 1"):
        decode_frame(bytes(frame))
    frame = bytearray(encode_frame(Kind.ACTIVATION, 3, 1, np.arange(6, dtype=np.float32)))
    frame[0] ^= 0x01
    with pytest.raises(ProtocolError, match="header checksum mismatch.*out of sync"):
        decode_frame(bytes(frame))


@given(arrays(max_side=3))
@settings(max_examples=25, **QUICK)
def test_every_truncation_is_rejected(array: np.ndarray) -> None:
    frame = encode_frame(Kind.PARAMETER, 7, 0, array)
    for length in range(len(frame)):
        with pytest.raises(ProtocolError, match="truncated"):
            decode_frame(frame[:length])


def test_trailing_bytes_are_rejected() -> None:
    frame = encode_frame(Kind.PARAMETER, 1, 2, np.arange(4, dtype=np.int64))
    with pytest.raises(ProtocolError, match="trailing bytes"):
        decode_frame(frame + b"\0")


def test_huge_size_claim_is_rejected_without_allocating() -> None:
    claim = 200 * 10**9  # 200 GB of float32
    header = signed_header(code=DTYPE_CODES[np.dtype(np.float32)], ndim=2,
                           dims=(50_000, claim // 4 // 50_000, 0, 0), nbytes=claim)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=f"frame of {claim} bytes exceeds the maximum "
                                                f"of {DEFAULT_MAX_FRAME_BYTES}"):
            decode_header(header)
        with pytest.raises(ProtocolError, match="exceeds the maximum"):
            decode_frame(header + b"\0" * 64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_max_frame_bytes_message() -> None:
    header = signed_header(code=DTYPE_CODES[np.dtype(np.uint8)], dims=(2**31, 0, 0, 0),
                           nbytes=2**31)
    with pytest.raises(ProtocolError,
                       match="frame of 2147483648 bytes exceeds the maximum of 268435456"):
        decode_header(header, 256 * 2**20)
    small = encode_header(Kind.PARAMETER, 0, 0, np.zeros(100, np.uint8))
    assert decode_header(small, 100).nbytes == 100
    with pytest.raises(ProtocolError, match="frame of 100 bytes exceeds the maximum of 99"):
        decode_header(small, 99)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"magic": b"XXXX"}, r"bad magic b'XXXX' \(expected b'PTRN'\)"),
        ({"version": 2}, "unsupported protocol version 2"),
        ({"kind": 0}, "unknown frame kind 0"),
        ({"kind": 99}, "unknown frame kind 99"),
        ({"code": 0}, "unknown dtype code 0"),
        ({"code": 200}, "unknown dtype code 200"),
        ({"ndim": 5, "dims": (2, 1, 1, 1)}, "ndim 5 exceeds the maximum of 4"),
        ({"dims": (2, 0, 0, 7)}, "unused shape dims"),
        ({"nbytes": 12}, r"shape \(2,\) of float32 needs 8 bytes but header says 12"),
    ],
)
def test_bad_header_fields_are_named(fields: dict, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_header(signed_header(**fields))


def test_baseline_signed_header_is_valid() -> None:
    header = decode_header(signed_header())
    assert (header.kind, header.shape, header.nbytes) == (Kind.ACTIVATION, (2,), 8)
    with pytest.raises(ProtocolError, match="payload checksum mismatch"):
        check_payload(header, memoryview(b"\1" * 8))


def test_header_checksum_checked_first() -> None:
    header = bytearray(signed_header(kind=99))
    header[HEADER_SIZE - 1] ^= 0xFF
    with pytest.raises(ProtocolError, match="header checksum mismatch"):
        decode_header(bytes(header))


def test_zero_d_and_empty_arrays() -> None:
    for array in (np.array(2.5), np.zeros((3, 0, 2), np.int32), np.zeros(0, np.uint8)):
        frame = decode_frame(encode_frame(Kind.REDUCE, 0, 0, array))
        assert frame.array.shape == array.shape and frame.array.dtype == array.dtype
        assert np.array_equal(frame.array, array)
        assert frame.array.flags.writeable


def test_encode_rejects_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ProtocolError, match="unsupported dtype '<c16'"):
        encode_header(Kind.ACTIVATION, 0, 0, np.zeros(2, np.complex128))
    with pytest.raises(ProtocolError, match="unsupported dtype '>f4'"):
        encode_header(Kind.ACTIVATION, 0, 0, np.zeros(2, ">f4"))
    with pytest.raises(ProtocolError, match="ndim 5 exceeds"):
        encode_header(Kind.ACTIVATION, 0, 0, np.zeros((1,) * 5, np.float32))
    with pytest.raises(ProtocolError, match="unknown frame kind 42"):
        encode_header(42, 0, 0, np.zeros(2, np.float32))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode_header(Kind.ACTIVATION, 2**63, 0, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        encode_header(Kind.ACTIVATION, 0, 0, np.zeros((4, 4), np.float32)[:, ::2])


def test_frame_is_immutable() -> None:
    frame = Frame(Kind.CONTROL, 0, 0, np.zeros(2, np.uint8))
    with pytest.raises(AttributeError):
        frame.step = 1  # type: ignore[misc]
