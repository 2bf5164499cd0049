"""Binary frame codec for pipetrain's inter-process messages (pure; no I/O, no pickle).

A frame is a fixed-size little-endian header followed by the raw bytes of one C-contiguous
numpy array (little-endian dtypes only, so the bytes mean the same thing on every host).

Header layout (``HEADER_STRUCT``, format ``'<4sBBBBqi4QQII'``, 68 bytes, no padding):

    =======  ====  ==============  =====================================================
    offset   size  field           meaning
    =======  ====  ==============  =====================================================
    0        4     magic           ``b"PTRN"``
    4        1     version         u8, currently 1
    5        1     kind            u8, a :class:`Kind`
    6        1     dtype code      u8, see ``DTYPE_CODES``
    7        1     ndim            u8, 0..4
    8        8     step            i64, training step the payload belongs to
    16       4     microbatch      i32, micro-batch index within the step
    20       32    shape           4 x u64, unused trailing dims are 0
    52       8     nbytes          u64, payload size; must equal prod(shape) * itemsize
    60       4     payload crc     u32, CRC32C of the payload bytes
    64       4     header crc      u32, CRC32C of header bytes 0..63
    =======  ====  ==============  =====================================================

The header CRC is checked before any other field, so a corrupted size can never make a
receiver allocate or wait for a bogus amount of data.  CRC32C (Castagnoli) detects every
error burst of up to 32 bits, hence every single corrupted byte, in both header and payload.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct

import crc32c
import numpy as np

MAGIC = b"PTRN"
VERSION = 1
MAX_NDIM = 4
DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024

HEADER_STRUCT = struct.Struct("<4sBBBBqi4QQII")
HEADER_SIZE = HEADER_STRUCT.size
_SIGNED_SIZE = HEADER_SIZE - 4  # bytes covered by the header checksum


class Kind(enum.IntEnum):
    ACTIVATION = 1
    GRADIENT = 2
    CONTROL = 3  # payload: uint8 array holding UTF-8 JSON (pipetrain.runtime.messages)
    PARAMETER = 4
    # 5 and 6 are retired; a frame of either kind is refused as unknown.
    REDUCE = 7  # all-reduce chunks


# Explicitly little-endian: a big-endian array is rejected rather than silently misread.
DTYPE_CODES: dict[np.dtype, int] = {
    np.dtype("<f4"): 1,
    np.dtype("<f8"): 2,
    np.dtype("<i4"): 3,
    np.dtype("<i8"): 4,
    np.dtype("u1"): 5,
}
CODE_DTYPES: dict[int, np.dtype] = {code: dt for dt, code in DTYPE_CODES.items()}


class ProtocolError(Exception):
    """A frame is malformed, corrupted, truncated, or cannot be represented."""


@dataclasses.dataclass(frozen=True)
class Header:
    kind: Kind
    dtype: np.dtype
    shape: tuple[int, ...]
    step: int
    microbatch: int
    nbytes: int
    payload_checksum: int

    def describe(self) -> str:
        return describe(self.kind, self.step, self.microbatch)


# eq=False: comparing numpy arrays with == is elementwise, which would break dataclass eq.
@dataclasses.dataclass(frozen=True, eq=False)
class Frame:
    kind: Kind
    step: int
    microbatch: int
    array: np.ndarray


def describe(kind: int, step: int, microbatch: int) -> str:
    try:
        name = Kind(kind).name
    except ValueError:
        name = f"kind-{kind}"
    return f"{name} frame step {step} micro-batch {microbatch}"


def byte_view(array: np.ndarray) -> memoryview:
    """Flat byte view of a C-contiguous array's own memory (no copy).

    ``memoryview(a).cast('B')`` refuses arrays with a zero-size dimension, so go through numpy.
    """
    if not array.flags.c_contiguous:
        raise ValueError("array must be C-contiguous (use np.ascontiguousarray explicitly)")
    return memoryview(array.reshape(-1).view(np.uint8))


def encode_header(kind: Kind, step: int, microbatch: int, array: np.ndarray) -> bytes:
    """Header for ``array``; the payload checksum is computed in place, without copying."""
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {kind}") from None
    code = DTYPE_CODES.get(array.dtype)
    if code is None:
        raise ProtocolError(f"unsupported dtype {array.dtype.str!r} for {kind.name} frame")
    if array.ndim > MAX_NDIM:
        raise ProtocolError(f"array of ndim {array.ndim} exceeds the maximum of {MAX_NDIM}")
    shape = tuple(array.shape) + (0,) * (MAX_NDIM - array.ndim)
    payload_crc = crc32c.crc32c(byte_view(array))
    try:
        buf = bytearray(HEADER_STRUCT.pack(MAGIC, VERSION, kind, code, array.ndim, step,
                                           microbatch, *shape, array.nbytes, payload_crc, 0))
    except struct.error as exc:  # step/microbatch out of i64/i32 range
        raise ProtocolError(f"cannot encode {describe(kind, step, microbatch)}: {exc}") from None
    buf[_SIGNED_SIZE:] = crc32c.crc32c(memoryview(buf)[:_SIGNED_SIZE]).to_bytes(4, "little")
    return bytes(buf)


def decode_header(buf: bytes | bytearray | memoryview,
                  max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Header:
    """Validate and decode a header; never allocates anything proportional to the payload."""
    view = memoryview(buf)
    if view.nbytes < HEADER_SIZE:
        raise ProtocolError(f"truncated header: got {view.nbytes} of {HEADER_SIZE} bytes")
    view = view[:HEADER_SIZE]
    (magic, version, kind, code, ndim, step, microbatch, *dims, nbytes, payload_crc,
     header_crc) = HEADER_STRUCT.unpack(view)
    computed = crc32c.crc32c(view[:_SIGNED_SIZE])
    if computed != header_crc:
        hint = "" if magic == MAGIC else f"; magic is {magic!r}, the stream is out of sync"
        raise ProtocolError(f"header checksum mismatch (stored 0x{header_crc:08x}, "
                            f"computed 0x{computed:08x}){hint}")
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (expected {VERSION})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {kind}") from None
    dtype = CODE_DTYPES.get(code)
    if dtype is None:
        raise ProtocolError(f"unknown dtype code {code} in {describe(kind, step, microbatch)}")
    if ndim > MAX_NDIM:
        raise ProtocolError(f"ndim {ndim} exceeds the maximum of {MAX_NDIM} "
                            f"in {describe(kind, step, microbatch)}")
    if any(dims[ndim:]):
        raise ProtocolError(f"unused shape dims {dims[ndim:]} are not zero "
                            f"in {describe(kind, step, microbatch)}")
    shape = tuple(dims[:ndim])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if expected != nbytes:
        raise ProtocolError(f"shape {shape} of {dtype} needs {expected} bytes but header says "
                            f"{nbytes} in {describe(kind, step, microbatch)}")
    if nbytes > max_frame_bytes:
        raise ProtocolError(f"frame of {nbytes} bytes exceeds the maximum of {max_frame_bytes}")
    return Header(kind, dtype, shape, step, microbatch, nbytes, payload_crc)


def check_payload(header: Header, payload: bytes | bytearray | memoryview) -> None:
    check_payload_crc(header, crc32c.crc32c(payload))


def check_payload_crc(header: Header, crc: int) -> None:
    """Compare a payload CRC computed elsewhere (e.g. chunk by chunk while reading)."""
    if crc != header.payload_checksum:
        raise ProtocolError(f"payload checksum mismatch in {header.describe()}")
