"""The one surface every layer has, and the context a training forward pass runs in.

A layer is a small object holding its parameters (local names such as ``weight`` or
``attn.qkv.weight``, in the contract's canonical order) and their gradient accumulators. Its
three calls keep no per-micro-batch state of their own: several micro-batches are in flight
inside a pipeline stage at once, so what backward needs is *returned* (a cache) and handed back
by the caller (:class:`pipetrain.nn.segment.Segment`):

* ``forward(x, context) -> (y, cache)``;
* ``backward_input(cache, grad_y, need_input_grad) -> (grad_x, weight_cache)``: the input-gradient
  pass (``I`` of the zero-bubble schedule), which also returns what the weight pass needs;
* ``backward_weight(weight_cache)``: the weight-gradient pass (``W``), accumulating into
  ``grad``. Callers run it in ascending micro-batch order, so the sums have one fixed order.

Every array a layer returns is C-contiguous: the output of one layer is the input of the next
either directly (one process) or as the raw bytes of a frame (two stages), and the two must be
the same array for the kernels to add in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Context:
    """A training forward pass: the optimizer step and each row's position in the global batch
    (what dropout's masks are a function of). Evaluation passes no context."""

    seed: int
    step: int
    positions: np.ndarray  # int64, one per row of the micro-batch


class Layer:
    """Base class: parameters, gradient accumulators (double-buffered) and the three passes."""

    type: ClassVar[str] = "layer"

    def __init__(self, index: int, params: dict[str, np.ndarray] | None = None) -> None:
        self.index = index
        self.params = dict(params or {})
        dtypes = {value.dtype for value in self.params.values()}
        if len(dtypes) > 1:
            raise ValueError(f"layer {index}: parameters of mixed dtypes "
                             f"{sorted(map(str, dtypes))}")
        self.grad = {name: np.zeros_like(value) for name, value in self.params.items()}
        self._spare_grad: dict[str, np.ndarray] | None = None

    @property
    def has_params(self) -> bool:
        return bool(self.params)

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        raise NotImplementedError

    def backward_weight(self, weight_cache: Any) -> None:
        """Parameter-free layers have nothing to accumulate."""

    def zero_grads(self) -> None:
        for grad in self.grad.values():
            grad[...] = 0

    def swap_grad_buffers(self) -> None:
        """Accumulate into a second set of gradient arrays from now on (allocated on first use),
        so that the previous step's gradients stay intact while a helper thread hashes them."""
        if self._spare_grad is None:
            self._spare_grad = {name: np.zeros_like(g) for name, g in self.grad.items()}
        self.grad, self._spare_grad = self._spare_grad, self.grad

    def grads(self) -> dict[str, np.ndarray]:
        """Gradients under their global names (``layers.{index}.{name}``), canonical order."""
        return {f"layers.{self.index}.{name}": grad for name, grad in self.grad.items()}


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x @ weight + bias`` on the last axis: (output, the 2-D input the weight pass needs)."""
    if x.ndim == 2:  # the common case, without the reshapes (a small MLP feels them)
        y = x @ weight
        y += bias
        return y, x
    rows = x.reshape(-1, weight.shape[0])
    y = rows @ weight
    y += bias
    return y.reshape(*x.shape[:-1], weight.shape[1]), rows


def linear_input_grad(grad_y: np.ndarray, weight: np.ndarray,
                      shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(gradient w.r.t. the input of :func:`linear`, the 2-D output gradient)."""
    if grad_y.ndim == 2:
        return grad_y @ weight.T, grad_y
    grad_rows = grad_y.reshape(-1, weight.shape[1])
    return (grad_rows @ weight.T).reshape(shape), grad_rows


def linear_weight_grad(rows: np.ndarray, grad_rows: np.ndarray, grad_weight: np.ndarray,
                       grad_bias: np.ndarray) -> None:
    grad_weight += rows.T @ grad_rows
    grad_bias += grad_rows.sum(axis=0)
