"""Seeded initialisation, one generator per layer.

Each layer draws from ``default_rng([seed, layer_index])``, its parameters in canonical order,
so its initial values depend on the seed and its global index only, never on how the network
is cut into stages.

* dense and conv2d: He-normal (std sqrt(2 / fan_in)) when a ReLU or GELU follows, otherwise
  Glorot-uniform; biases zero. (The ``layers = [...]`` shorthand is the same rule: ReLU after
  every layer but the last.)
* layernorm: weight one, bias zero.
* embedding and the block's projections: normal with std 0.02 (GPT-2's choice), biases zero,
  its layernorms as above.
"""

from __future__ import annotations

import math

import numpy as np

from pipetrain.nn.model import ResolvedLayer

TRANSFORMER_STD = 0.02
_ACTIVATIONS = ("relu", "gelu")


def _fans(layer: ResolvedLayer) -> tuple[int, int]:
    shape = layer.param_shapes["weight"]
    if len(shape) == 4:  # conv (F, C, k, k)
        receptive = shape[2] * shape[3]
        return shape[1] * receptive, shape[0] * receptive
    return shape[0], shape[1]


def _init_layer(layer: ResolvedLayer, activated: bool, rng: np.random.Generator,
                dtype: np.dtype) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, shape in layer.param_shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            value = np.zeros(shape)
        elif layer.spec.type == "layernorm" or name.startswith("ln"):
            value = np.ones(shape)
        elif layer.spec.type in ("embedding", "block"):
            value = rng.normal(0.0, TRANSFORMER_STD, size=shape)
        else:
            fan_in, fan_out = _fans(layer)
            if activated:
                value = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
            else:
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                value = rng.uniform(-limit, limit, size=shape)
        out[f"layers.{layer.index}.{name}"] = np.ascontiguousarray(value, dtype=dtype)
    return out


def init_parameters(resolved: list[ResolvedLayer], seed: int, dtype: np.dtype,
                    first: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
    """The parameters of layers ``[first, stop)``, under their global names."""
    params: dict[str, np.ndarray] = {}
    for position in range(first, len(resolved) if stop is None else stop):
        layer = resolved[position]
        following = resolved[position + 1].spec.type if position + 1 < len(resolved) else None
        activated = layer.spec.relu or following in _ACTIVATIONS
        rng = np.random.default_rng([seed, layer.index])
        params.update(_init_layer(layer, activated, rng, np.dtype(dtype)))
    return params
