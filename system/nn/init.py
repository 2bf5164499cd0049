"""Seeded initialisation, one generator per layer.

Each layer draws from ``default_rng([seed, layer_index])``, so its initial values depend on the
seed and its global index only, never on how the network is cut into stages.
"""

from __future__ import annotations

import numpy as np


def init_parameters(
    sizes: list[int], seed: int, dtype: np.dtype, first: int = 0, stop: int | None = None
) -> dict[str, np.ndarray]:
    """Layers ``[first, stop)``: He-normal weights before a ReLU, Glorot-uniform at the output."""
    params: dict[str, np.ndarray] = {}
    num_layers = len(sizes) - 1
    for index in range(first, num_layers if stop is None else stop):
        fan_in, fan_out = sizes[index], sizes[index + 1]
        rng = np.random.default_rng([seed, index])
        if index < num_layers - 1:
            weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
        else:
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            weight = rng.uniform(-limit, limit, size=(fan_in, fan_out))
        params[f"layers.{index}.weight"] = np.ascontiguousarray(weight, dtype=dtype)
        params[f"layers.{index}.bias"] = np.zeros(fan_out, dtype=dtype)
    return params
