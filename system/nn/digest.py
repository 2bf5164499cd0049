"""Gradient digests that a pipeline can compute piecewise.

``grad_digest`` of a step = sha256 over the concatenated sha256 digests of every parameter's
gradient (raw bytes, C order), parameters in canonical order (layer index ascending, weight before
bias). Hashing per parameter lets each stage hash its own gradients where they are, sending 32
bytes per parameter instead of the gradients themselves; the reference computes the same thing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def array_digest(array: np.ndarray) -> bytes:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).digest()


def combine(parameter_digests: Iterable[bytes]) -> str:
    outer = hashlib.sha256()
    for digest in parameter_digests:
        outer.update(digest)
    return outer.hexdigest()


def grad_digest(grads: dict[str, np.ndarray], names: list[str]) -> str:
    return combine(array_digest(grads[name]) for name in names)
