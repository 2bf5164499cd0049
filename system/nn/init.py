"""Seeded initialisation, one generator per layer.

Each layer draws from ``default_rng([seed, layer_index])``, so its initial values depend on the
seed and its global index only, never on how the network is cut into stages.
"""

from __future__ import annotations

import numpy as np


def init_parameters(sizes: list[int], seed: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """He-normal weights for layers followed by ReLU, Glorot-uniform for the output layer."""
    params: dict[str, np.ndarray] = {}
    num_layers = len(sizes) - 1
    for index in range(num_layers):
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
