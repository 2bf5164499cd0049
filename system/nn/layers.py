"""Dense layers and contiguous segments of them.

A network is ``Dense -> ReLU -> Dense -> ReLU -> ... -> Dense`` (no ReLU after the last layer).
A :class:`Segment` holds the contiguous layers ``[first, stop)`` of that stack and runs forward
and backward on its own, which is exactly what one pipeline stage owns. Because a segment of the
whole stack and the chain of its pieces perform the same numpy operations on the same arrays, a
pipeline of segments is bitwise equal to the single-process network.

Several micro-batches are in flight at once inside a pipeline stage, so the values backward needs
(each layer's input and pre-activation) live in ``Segment.saved``, keyed by micro-batch, not in the
layers. Weight gradients accumulate into ``grad_weight`` / ``grad_bias`` in the order the backward
calls arrive; callers (the schedules) guarantee that this is ascending micro-batch order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def parameter_names(num_layers: int, first: int = 0) -> list[str]:
    """Names of the parameters of layers ``first .. num_layers - 1`` in canonical order.

    The canonical order (layer index ascending, weight before bias) is the order of checkpoints,
    gradient digests and parameter transfers.
    """
    names: list[str] = []
    for index in range(first, num_layers):
        names += [f"layers.{index}.weight", f"layers.{index}.bias"]
    return names


class Dense:
    """``y = x @ weight + bias`` with ``weight`` of shape ``(fan_in, fan_out)``."""

    def __init__(self, index: int, weight: np.ndarray, bias: np.ndarray) -> None:
        if weight.ndim != 2 or bias.shape != (weight.shape[1],):
            raise ValueError(
                f"layer {index}: weight {weight.shape} and bias {bias.shape} do not match"
            )
        if weight.dtype != bias.dtype:
            raise ValueError(f"layer {index}: weight is {weight.dtype} but bias is {bias.dtype}")
        self.index = index
        self.weight = weight
        self.bias = bias
        self.grad_weight = np.zeros_like(weight)
        self.grad_bias = np.zeros_like(bias)
        self._spare_grads: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def fan_in(self) -> int:
        return self.weight.shape[0]

    @property
    def fan_out(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight
        y += self.bias
        return y

    def backward_input(self, grad_y: np.ndarray) -> np.ndarray:
        return grad_y @ self.weight.T

    def accumulate_weight_grad(self, x: np.ndarray, grad_y: np.ndarray) -> None:
        self.grad_weight += x.T @ grad_y
        self.grad_bias += grad_y.sum(axis=0)

    def swap_grad_buffers(self) -> None:
        """Accumulate into a second set of gradient arrays from now on (allocated on first use),
        so that the previous step's gradients stay intact while a helper thread hashes them."""
        if self._spare_grads is None:
            self._spare_grads = (np.zeros_like(self.weight), np.zeros_like(self.bias))
        spare = self._spare_grads
        self._spare_grads = (self.grad_weight, self.grad_bias)
        self.grad_weight, self.grad_bias = spare

    def grads(self) -> dict[str, np.ndarray]:
        return {
            f"layers.{self.index}.weight": self.grad_weight,
            f"layers.{self.index}.bias": self.grad_bias,
        }


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def relu_backward(pre_activation: np.ndarray, grad_y: np.ndarray) -> np.ndarray:
    # A zero of grad_y's own dtype: a Python 0 sends numpy down a slower casting path that
    # gives the same bits.
    return np.where(pre_activation > 0, grad_y, grad_y.dtype.type(0))


@dataclass
class _Saved:
    """What backward needs for one micro-batch: each layer's input and pre-activation."""

    inputs: list[np.ndarray] = field(default_factory=list)
    pre_activations: list[np.ndarray] = field(default_factory=list)
    # Gradients w.r.t. each layer's output, kept between the input-gradient pass (I) and the
    # deferred weight-gradient pass (W) of the zero-bubble schedule.
    output_grads: list[np.ndarray | None] = field(default_factory=list)


class Segment:
    """Contiguous layers of the network, with per-micro-batch state for pipelining.

    ``relu_after_last`` is True for every segment except the one holding the network's last layer.
    ``needs_input_grad`` is False for the first segment: nobody consumes the gradient w.r.t. the
    network input, so it is not computed.
    """

    def __init__(
        self, layers: list[Dense], *, relu_after_last: bool, needs_input_grad: bool = True
    ) -> None:
        if not layers:
            raise ValueError("a segment needs at least one layer")
        for before, after in zip(layers, layers[1:], strict=False):
            if after.index != before.index + 1 or after.fan_in != before.fan_out:
                raise ValueError(
                    f"layers {before.index} and {after.index} are not contiguous and compatible"
                )
        self.layers = layers
        self.relu_after_last = relu_after_last
        self.needs_input_grad = needs_input_grad
        self.saved: dict[int, _Saved] = {}

    @property
    def first(self) -> int:
        return self.layers[0].index

    @property
    def stop(self) -> int:
        return self.layers[-1].index + 1

    def _has_relu(self, position: int) -> bool:
        return position < len(self.layers) - 1 or self.relu_after_last

    def forward(self, microbatch: int, x: np.ndarray, *, keep: bool = True) -> np.ndarray:
        """Forward one micro-batch; with ``keep`` its state is saved for backward."""
        saved = _Saved()
        for position, layer in enumerate(self.layers):
            saved.inputs.append(x)
            x = layer.forward(x)
            if self._has_relu(position):
                saved.pre_activations.append(x)
                x = relu(x)
        if keep:
            if microbatch in self.saved:
                raise RuntimeError(f"micro-batch {microbatch} forwarded twice")
            self.saved[microbatch] = saved
        return x

    def backward(self, microbatch: int, grad_output: np.ndarray, *,
                 on_layer_done: Callable[[Dense], None] | None = None) -> np.ndarray | None:
        """Full backward: returns the input gradient and accumulates the weight gradients.

        Each layer's weight gradient is accumulated right after its input gradient, so it is
        final (see :meth:`backward_weight`) a whole layer earlier than in an input pass
        followed by a weight pass; the arithmetic is the same either way.
        """
        grad_input = self._input_pass(microbatch, grad_output, on_layer_done=on_layer_done,
                                      weights_too=True)
        del self.saved[microbatch]
        return grad_input

    def backward_input(self, microbatch: int, grad_output: np.ndarray) -> np.ndarray | None:
        """Input-gradient pass: walks the layers backwards, keeping each output gradient."""
        return self._input_pass(microbatch, grad_output, on_layer_done=None, weights_too=False)

    def _input_pass(self, microbatch: int, grad_output: np.ndarray, *,
                    on_layer_done: Callable[[Dense], None] | None,
                    weights_too: bool) -> np.ndarray | None:
        saved = self._saved(microbatch)
        grad = grad_output
        output_grads: list[np.ndarray | None] = [None] * len(self.layers)
        relu_slot = len(saved.pre_activations)
        for position in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[position]
            if self._has_relu(position):
                relu_slot -= 1
                grad = relu_backward(saved.pre_activations[relu_slot], grad)
            output_grads[position] = output_grad = grad
            if position > 0 or self.needs_input_grad:
                grad = layer.backward_input(grad)
            else:
                grad = None
            if weights_too:
                layer.accumulate_weight_grad(saved.inputs[position], output_grad)
                if on_layer_done is not None:
                    on_layer_done(layer)
        saved.output_grads = output_grads
        return grad

    def backward_weight(self, microbatch: int, *,
                        on_layer_done: Callable[[Dense], None] | None = None) -> None:
        """Weight-gradient pass; frees the micro-batch's saved state.

        Last layer first, and ``on_layer_done(layer)`` after each: on the step's last
        micro-batch that is the moment a layer's gradient is final, and a replicated stage
        starts reducing it while the layers below are still computed. The layers' gradients
        are independent of each other, so the order changes no bit.
        """
        saved = self._saved(microbatch)
        if not saved.output_grads:
            raise RuntimeError(f"micro-batch {microbatch}: weight gradient before input gradient")
        for position in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[position]
            layer.accumulate_weight_grad(saved.inputs[position], saved.output_grads[position])
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
            layer.grad_weight[...] = 0
            layer.grad_bias[...] = 0

    def swap_grad_buffers(self) -> None:
        for layer in self.layers:
            layer.swap_grad_buffers()

    def grads(self) -> dict[str, np.ndarray]:
        grads: dict[str, np.ndarray] = {}
        for layer in self.layers:
            grads.update(layer.grads())
        return grads


def build_segment(
    params: dict[str, np.ndarray], first: int, stop: int, num_layers: int
) -> Segment:
    """A segment of layers ``[first, stop)`` over the (shared, not copied) ``params`` arrays."""
    layers = [
        Dense(i, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"])
        for i in range(first, stop)
    ]
    return Segment(layers, relu_after_last=stop < num_layers, needs_input_grad=first > 0)
