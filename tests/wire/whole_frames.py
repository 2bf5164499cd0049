"""A whole frame as one bytes object, and back: an oracle for the tests of the streaming
channels (which never build one), written from the header codec alone."""

from __future__ import annotations

import numpy as np

from pipetrain.wire.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_SIZE,
    Frame,
    Kind,
    ProtocolError,
    byte_view,
    check_payload,
    decode_header,
    encode_header,
)


def encode_frame(kind: Kind, step: int, microbatch: int, array: np.ndarray) -> bytes:
    return encode_header(kind, step, microbatch, array) + byte_view(array).tobytes()


def decode_frame(data: bytes | bytearray | memoryview,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Exactly one frame; trailing or missing bytes are errors. Returns a fresh array."""
    view = memoryview(data)
    header = decode_header(view, max_frame_bytes)
    total = HEADER_SIZE + header.nbytes
    if view.nbytes != total:
        what = "truncated frame" if view.nbytes < total else "trailing bytes after frame"
        raise ProtocolError(f"{what}: got {view.nbytes} of {total} bytes "
                            f"for {header.describe()}")
    payload = view[HEADER_SIZE:]
    check_payload(header, payload)
    array = np.empty(header.shape, dtype=header.dtype)
    byte_view(array)[:] = payload
    return Frame(header.kind, header.step, header.microbatch, array)
