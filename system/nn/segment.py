"""Contiguous runs of layers: what one pipeline stage owns, or the whole network.

A :class:`Segment` holds the layers ``[first, stop)`` and runs forward and backward on them.
Because a segment of the whole model and the chain of its pieces perform the same numpy
operations on the same arrays, a pipeline of segments is bitwise equal to the single-process
network.

Several micro-batches are in flight at once inside a pipeline stage, so what backward needs
lives in ``Segment.saved``, keyed by micro-batch, not in the layers: each layer's forward cache,
and between the input-gradient pass (``I``) and the deferred weight-gradient pass (``W``) of the
zero-bubble schedule, each layer's weight cache. Weight gradients accumulate in the order the
backward calls arrive; callers (the schedules) guarantee that this is ascending micro-batch
order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipetrain.nn.layer import Context, Layer
from pipetrain.nn.model import ResolvedLayer, build_layer

LayerDone = Callable[[Layer], None]


@dataclass
class _Saved:
    caches: list[Any] = field(default_factory=list)
    weight_caches: list[Any] | None = None  # set by the input-gradient pass


class Segment:
    """Contiguous layers of the network, with per-micro-batch state for pipelining.

    ``needs_input_grad`` is False for the first segment: nobody consumes the gradient w.r.t. the
    network input, so it is not computed.
    """

    def __init__(self, layers: list[Layer], *, needs_input_grad: bool = True) -> None:
        if not layers:
            raise ValueError("a segment needs at least one layer")
        for before, after in zip(layers, layers[1:], strict=False):
            if after.index != before.index + 1:
                raise ValueError(f"layers {before.index} and {after.index} are not contiguous")
        self.layers = layers
        self.needs_input_grad = needs_input_grad
        self.saved: dict[int, _Saved] = {}

    @property
    def first(self) -> int:
        return self.layers[0].index

    @property
    def stop(self) -> int:
        return self.layers[-1].index + 1

    def forward(self, microbatch: int, x: np.ndarray, *, keep: bool = True,
                context: Context | None = None) -> np.ndarray:
        """Forward one micro-batch; with ``keep`` its state is saved for backward. Without a
        ``context`` this is evaluation (dropout off)."""
        saved = _Saved()
        for layer in self.layers:
            x, cache = layer.forward(x, context)
            x = np.ascontiguousarray(x)
            saved.caches.append(cache)
        if keep:
            if microbatch in self.saved:
                raise RuntimeError(f"micro-batch {microbatch} forwarded twice")
            self.saved[microbatch] = saved
        return x

    def backward(self, microbatch: int, grad_output: np.ndarray, *,
                 on_layer_done: LayerDone | None = None) -> np.ndarray | None:
        """Full backward: returns the input gradient and accumulates the weight gradients.

        Each layer's weight gradient is accumulated right after its input gradient, so it is
        final (see :meth:`backward_weight`) a whole layer earlier than in an input pass
        followed by a weight pass; the arithmetic is the same either way.
        """
        grad_input = self._input_pass(microbatch, grad_output, on_layer_done, weights_too=True)
        del self.saved[microbatch]
        return grad_input

    def backward_input(self, microbatch: int, grad_output: np.ndarray) -> np.ndarray | None:
        """Input-gradient pass: walks the layers backwards, keeping each weight cache."""
        return self._input_pass(microbatch, grad_output, None, weights_too=False)

    def _input_pass(self, microbatch: int, grad_output: np.ndarray,
                    on_layer_done: LayerDone | None, *, weights_too: bool) -> np.ndarray | None:
        saved = self._saved(microbatch)
        if saved.weight_caches is not None:
            raise RuntimeError(f"micro-batch {microbatch}: input gradient computed twice")
        grad: np.ndarray | None = grad_output
        weight_caches: list[Any] = [None] * len(self.layers)
        for position in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[position]
            need = position > 0 or self.needs_input_grad
            grad, weight_cache = layer.backward_input(saved.caches[position], grad, need)
            if grad is not None:
                grad = np.ascontiguousarray(grad)
            saved.caches[position] = None  # what the weight pass needs is in weight_cache
            if weights_too:
                if layer.has_params:
                    layer.backward_weight(weight_cache)
                    if on_layer_done is not None:
                        on_layer_done(layer)
            else:
                weight_caches[position] = weight_cache
        saved.weight_caches = weight_caches
        return grad if self.needs_input_grad else None

    def backward_weight(self, microbatch: int, *,
                        on_layer_done: LayerDone | None = None) -> None:
        """Weight-gradient pass; frees the micro-batch's saved state.

        Last layer first, and ``on_layer_done(layer)`` after each layer with parameters: on the
        step's last micro-batch that is the moment a layer's gradient is final, and a
        replicated stage starts reducing it while the layers below are still computed. The
        layers' gradients are independent of each other, so the order changes no bit.
        """
        saved = self._saved(microbatch)
        if saved.weight_caches is None:
            raise RuntimeError(f"micro-batch {microbatch}: weight gradient before input gradient")
        for position in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[position]
            if layer.has_params:
                layer.backward_weight(saved.weight_caches[position])
                if on_layer_done is not None:
                    on_layer_done(layer)
        del self.saved[microbatch]

    def _saved(self, microbatch: int) -> _Saved:
        try:
            return self.saved[microbatch]
        except KeyError:
            raise RuntimeError(f"micro-batch {microbatch} was not forwarded") from None

    def zero_grads(self) -> None:
        for layer in self.layers:
            layer.zero_grads()

    def swap_grad_buffers(self) -> None:
        for layer in self.layers:
            layer.swap_grad_buffers()

    def grads(self) -> dict[str, np.ndarray]:
        grads: dict[str, np.ndarray] = {}
        for layer in self.layers:
            grads.update(layer.grads())
        return grads


def build_segment(resolved: list[ResolvedLayer], params: dict[str, np.ndarray], first: int,
                  stop: int) -> Segment:
    """A segment of layers ``[first, stop)`` over the (shared, not copied) ``params`` arrays."""
    layers = [build_layer(layer, params) for layer in resolved[first:stop]]
    return Segment(layers, needs_input_grad=first > 0)
