"""Element-wise and last-axis layers: dense, relu, gelu, flatten, dropout, layernorm.

The math of each is a pair of pure functions (forward, backward) that the transformer block
reuses; the layer classes only wire them to the :class:`~pipetrain.nn.layer.Layer` surface.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipetrain.nn.layer import Context, Layer, linear, linear_input_grad, linear_weight_grad

LAYERNORM_EPS = 1e-5
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def relu_backward(pre_activation: np.ndarray, grad_y: np.ndarray) -> np.ndarray:
    # A zero of grad_y's own dtype: a Python 0 sends numpy down a slower casting path that
    # gives the same bits.
    return np.where(pre_activation > 0, grad_y, grad_y.dtype.type(0))


# GELU runs on the widest activations of a transformer (the MLP's hidden layer), and written
# as one expression numpy makes a temporary array per operation: in place it is about twice as
# fast (profiled: it was a quarter of a transformer step).
def gelu_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torch's ``gelu(approximate="tanh")``: (output, the tanh its backward reuses)."""
    t = x * x
    t *= _GELU_K
    t += 1
    t *= x
    t *= _GELU_C  # c (x + k x^3)
    np.tanh(t, out=t)
    y = t + 1
    y *= x
    y *= 0.5
    return y, t


def gelu_backward(x: np.ndarray, t: np.ndarray, grad_y: np.ndarray) -> np.ndarray:
    """``grad_y * (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 k x^2))``."""
    inner_grad = x * x
    inner_grad *= 3 * _GELU_K
    inner_grad += 1
    inner_grad *= _GELU_C
    out = t * t
    np.subtract(1, out, out=out)
    out *= inner_grad
    out *= x
    out += t
    out += 1
    out *= 0.5
    out *= grad_y
    return out


def layernorm_forward(x: np.ndarray, weight: np.ndarray,
                      bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over the last axis, biased variance: (output, x_hat, 1 / std)."""
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    inv_std = 1 / np.sqrt(variance + LAYERNORM_EPS)
    x_hat = centred * inv_std
    return x_hat * weight + bias, x_hat, inv_std


def layernorm_input_grad(grad_y: np.ndarray, x_hat: np.ndarray, inv_std: np.ndarray,
                         weight: np.ndarray) -> np.ndarray:
    g = grad_y * weight
    return inv_std * (g - g.mean(axis=-1, keepdims=True)
                      - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))


def layernorm_weight_grad(x_hat: np.ndarray, grad_y: np.ndarray, grad_weight: np.ndarray,
                          grad_bias: np.ndarray) -> None:
    width = x_hat.shape[-1]
    grad_weight += (grad_y * x_hat).reshape(-1, width).sum(axis=0)
    grad_bias += grad_y.reshape(-1, width).sum(axis=0)


class Dense(Layer):
    """``x @ weight + bias`` on the last axis, ``weight`` of shape (in, units).

    ``relu=True`` is the ``layers = [...]`` shorthand's dense layer with the ReLU that follows
    it fused in (so that its parameters keep the shorthand's layer numbering).
    """

    type = "dense"

    def __init__(self, index: int, weight: np.ndarray, bias: np.ndarray, *,
                 relu: bool = False) -> None:
        if weight.ndim != 2 or bias.shape != (weight.shape[1],):
            raise ValueError(
                f"layer {index}: weight {weight.shape} and bias {bias.shape} do not match")
        if weight.dtype != bias.dtype:
            raise ValueError(f"layer {index}: weight is {weight.dtype} but bias is {bias.dtype}")
        super().__init__(index, {"weight": weight, "bias": bias})
        self.relu = relu

    @property
    def fan_in(self) -> int:
        return self.params["weight"].shape[0]

    @property
    def fan_out(self) -> int:
        return self.params["weight"].shape[1]

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        y, rows = linear(x, self.params["weight"], self.params["bias"])
        if not self.relu:
            return y, (x.shape, rows, None)
        return np.maximum(y, 0), (x.shape, rows, y)

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        shape, rows, pre_activation = cache
        if pre_activation is not None:
            grad_y = relu_backward(pre_activation, grad_y)
        if not need_input_grad:
            return None, (rows, grad_y.reshape(-1, self.fan_out))
        grad_x, grad_rows = linear_input_grad(grad_y, self.params["weight"], shape)
        return grad_x, (rows, grad_rows)

    def backward_weight(self, weight_cache: Any) -> None:
        rows, grad_rows = weight_cache
        linear_weight_grad(rows, grad_rows, self.grad["weight"], self.grad["bias"])


class ReLU(Layer):
    type = "relu"

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        return np.maximum(x, 0), x

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        return relu_backward(cache, grad_y), None


class GELU(Layer):
    type = "gelu"

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        y, t = gelu_forward(x)
        return y, (x, t)

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        return gelu_backward(*cache, grad_y), None


class Flatten(Layer):
    type = "flatten"

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        return np.ascontiguousarray(x).reshape(len(x), -1), x.shape

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        return grad_y.reshape(cache), None


class LayerNorm(Layer):
    type = "layernorm"

    def __init__(self, index: int, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__(index, {"weight": weight, "bias": bias})

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        y, x_hat, inv_std = layernorm_forward(x, self.params["weight"], self.params["bias"])
        return y, (x_hat, inv_std)

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        x_hat, inv_std = cache
        grad_x = None
        if need_input_grad:
            grad_x = layernorm_input_grad(grad_y, x_hat, inv_std, self.params["weight"])
        return grad_x, (x_hat, grad_y)

    def backward_weight(self, weight_cache: Any) -> None:
        layernorm_weight_grad(*weight_cache, self.grad["weight"], self.grad["bias"])


# splitmix64's finaliser: a bijective mix of 64-bit words, vectorised over numpy arrays (uint64
# arithmetic wraps, as the algorithm wants).
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def dropout_keep(seed: int, step: int, layer: int, positions: np.ndarray,
                 sample_shape: tuple[int, ...], p: float) -> np.ndarray:
    """Which elements survive: a pure function of (seed, step, layer, sample position).

    Element ``j`` of the sample at position ``g`` of the global batch is kept iff the top 53
    bits of ``mix(key ^ mix(g * size + j))`` reach ``p * 2**53``, with ``key`` mixed from
    (seed, step, layer). No generator state: any split of the batch into replicas and
    micro-batches draws the same mask for the same sample, at the cost of a few integer
    operations per element (cheaper than a seeded generator per sample).
    """
    key = np.array([seed], dtype=np.uint64)
    for word in (step, layer):
        key = _mix(key ^ np.uint64(word))
    size = math.prod(sample_shape)
    counters = (positions.astype(np.uint64)[:, None] * np.uint64(size)
                + np.arange(size, dtype=np.uint64)[None, :])
    bits = _mix(_mix(counters) ^ key) >> np.uint64(11)
    threshold = np.uint64(min(int(p * 2**53), 2**53))
    return (bits >= threshold).reshape(len(positions), *sample_shape)


class Dropout(Layer):
    """Inverted dropout while training (kept elements scaled by 1 / (1 - p)); identity at
    evaluation (no context)."""

    type = "dropout"

    def __init__(self, index: int, p: float) -> None:
        if not 0 <= p < 1:
            raise ValueError(f"layer {index}: dropout p must be in [0, 1), got {p}")
        super().__init__(index)
        self.p = p

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        if context is None or self.p == 0:
            return x, None
        if len(context.positions) != len(x):
            raise ValueError(f"layer {self.index}: {len(x)} rows but {len(context.positions)} "
                             "batch positions")
        keep = dropout_keep(context.seed, context.step, self.index, context.positions,
                            x.shape[1:], self.p)
        mask = keep.astype(x.dtype) * x.dtype.type(1 / (1 - self.p))
        return x * mask, mask

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        return (grad_y if cache is None else grad_y * cache), None
