"""The independent oracle of the nn tests: central finite differences in float64."""

from __future__ import annotations

import numpy as np

EPS = 1e-6  # central-difference step (float64)
TOLERANCE = 1e-6  # relative error allowed between analytic and numeric gradients


def rel_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """||a - n|| / (||a|| + ||n||): scale-free, and 0 only when both agree."""
    num = np.linalg.norm(analytic - numeric)
    den = np.linalg.norm(analytic) + np.linalg.norm(numeric)
    return float(num / den) if den > 0 else 0.0


def numeric_grad(f, array: np.ndarray) -> np.ndarray:
    """Central differences of the scalar ``f()`` w.r.t. ``array``, perturbed in place."""
    grad = np.zeros_like(array)
    for idx in np.ndindex(array.shape):
        original = array[idx]
        array[idx] = original + EPS
        plus = f()
        array[idx] = original - EPS
        minus = f()
        array[idx] = original
        grad[idx] = (plus - minus) / (2 * EPS)
    return grad
