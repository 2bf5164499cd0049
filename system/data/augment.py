"""Data augmentation: pure functions of (samples, their indices, seed, epoch).

The randomness of sample ``i`` in epoch ``e`` comes only from its own generator,
``np.random.default_rng([seed, 3, e, i])`` (stream 3; the sampler uses streams 1 and 2). So an
augmented sample does not depend on which loader thread prepared it, on how samples were grouped
into micro-batches or replicas, or on whether the single-process reference prepared it: runs stay
bitwise reproducible with augmentation on. The price is one small generator per sample (tens of
microseconds), cheap next to a training step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

AUGMENT_STREAM = 3
DIGIT_SIDE = 8  # the built-in digits are 8x8 images, flattened row by row
MAX_SHIFT_PX = 1
DIGIT_NOISE_STD = 0.05  # pixels are in [0, 1]
FEATURE_NOISE_STD = 0.01  # generic features: assumed roughly unit scale (normalised)


def _sample_rng(seed: int, epoch: int, sample_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, AUGMENT_STREAM, epoch, int(sample_index)])


def _check(x: np.ndarray, sample_indices: np.ndarray, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name}: expected (samples, features), got shape {x.shape}")
    if len(sample_indices) != len(x):
        raise ValueError(f"{name}: {len(x)} samples but {len(sample_indices)} sample indices")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected floating-point samples, got {x.dtype}")


def augment_digits(
    x: np.ndarray, sample_indices: np.ndarray, seed: int, epoch: int
) -> np.ndarray:
    """Shift each 8x8 image by -1..1 pixels per axis (zero fill), add noise, clip to [0, 1]."""
    _check(x, sample_indices, "augment_digits")
    if x.shape[1] != DIGIT_SIDE * DIGIT_SIDE:
        raise ValueError(
            f"augment_digits: expected 8x8 images (64 features), got {x.shape[1]} features "
            "(use the 'noise' augmentation for other data)"
        )
    n, side, pad = len(x), DIGIT_SIDE, MAX_SHIFT_PX
    moves = np.empty((n, 2), dtype=np.int64)
    noise = np.empty((n, side, side), dtype=np.float64)
    for row, sample_index in enumerate(sample_indices):
        rng = _sample_rng(seed, epoch, sample_index)
        # Draw order is part of the contract: one draw for the (dy, dx) shift, then the noise.
        moves[row] = divmod(int(rng.integers(0, (2 * pad + 1) ** 2)), 2 * pad + 1)
        noise[row] = rng.normal(0.0, DIGIT_NOISE_STD, size=(side, side))
    moves -= pad
    # Shift all images in one gather: output pixel (r, c) is input pixel (r - dy, c - dx),
    # read from a zero-padded copy so pixels moved in from outside are zero.
    padded = np.zeros((n, side + 2 * pad, side + 2 * pad), dtype=np.float64)
    padded[:, pad : pad + side, pad : pad + side] = x.reshape(n, side, side)
    pixels = np.arange(side)
    rows = pixels[None, :, None] + pad - moves[:, 0, None, None]
    cols = pixels[None, None, :] + pad - moves[:, 1, None, None]
    out = padded[np.arange(n)[:, None, None], rows, cols] + noise
    np.clip(out, 0.0, 1.0, out=out)
    return out.reshape(x.shape).astype(x.dtype, copy=False)


def augment_noise(
    x: np.ndarray, sample_indices: np.ndarray, seed: int, epoch: int
) -> np.ndarray:
    """Add gaussian noise (std 0.01) to every feature; for data that is not an image."""
    _check(x, sample_indices, "augment_noise")
    out = x.astype(np.float64)
    for row, sample_index in enumerate(sample_indices):
        out[row] += _sample_rng(seed, epoch, sample_index).normal(
            0.0, FEATURE_NOISE_STD, size=x.shape[1]
        )
    return out.astype(x.dtype, copy=False)


Augmentation = Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]
AUGMENTATIONS: dict[str, Augmentation] = {"digits": augment_digits, "noise": augment_noise}
