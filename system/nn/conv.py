"""Convolution and pooling on (N, C, H, W) inputs, as ``torch.nn.functional`` computes them.

All three work on *windows*: ``sliding_window_view`` gives every k x k patch as a view
(N, C, Ho, Wo, k, k) without copying. Convolution is then one matrix product of the gathered
patches (im2col) with the kernels; the backward passes scatter gradients back with one
vectorised addition per kernel offset (k*k of them), never a Python loop over pixels. The
offsets are added in a fixed order, so overlapping windows sum the same way every time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipetrain.nn.layer import Context, Layer


def output_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """torch's floor rule: positions of a kernel on a padded axis."""
    return (size + 2 * padding - kernel) // stride + 1


def windows(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """(N, C, Ho, Wo, k, k) view of every kernel position."""
    return sliding_window_view(x, (kernel, kernel), axis=(2, 3))[:, :, ::stride, ::stride]


def scatter_windows(grad_windows: np.ndarray, shape: tuple[int, ...],
                    stride: int) -> np.ndarray:
    """The adjoint of :func:`windows`: sum (N, C, Ho, Wo, k, k) window gradients into ``shape``."""
    out = np.zeros(shape, dtype=grad_windows.dtype)
    _, _, out_h, out_w, kernel, _ = grad_windows.shape
    for i in range(kernel):
        for j in range(kernel):
            out[:, :, i:i + stride * (out_h - 1) + 1:stride,
                j:j + stride * (out_w - 1) + 1:stride] += grad_windows[..., i, j]
    return out


class Conv2d(Layer):
    """Cross-correlation with zero padding: ``weight`` (F, C, k, k), ``bias`` (F,)."""

    type = "conv2d"

    def __init__(self, index: int, weight: np.ndarray, bias: np.ndarray, *, stride: int = 1,
                 padding: int = 0) -> None:
        if weight.ndim != 4 or weight.shape[2] != weight.shape[3] or bias.shape != weight.shape[:1]:
            raise ValueError(f"layer {index}: conv weight {weight.shape} / bias {bias.shape}")
        super().__init__(index, {"weight": weight, "bias": bias})
        self.stride, self.padding = stride, padding

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        weight = self.params["weight"]
        filters, channels, kernel, _ = weight.shape
        pad = self.padding
        padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
        patches = windows(padded, kernel, self.stride)
        n, _, out_h, out_w = patches.shape[:4]
        # (N, Ho, Wo, C, k, k) rows: one patch per output pixel, in the kernel's own order.
        cols = patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * out_h * out_w, -1)
        y = cols @ weight.reshape(filters, -1).T
        y += self.params["bias"]
        y = np.ascontiguousarray(y.reshape(n, out_h, out_w, filters).transpose(0, 3, 1, 2))
        return y, (padded.shape, cols)

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        padded_shape, cols = cache
        weight = self.params["weight"]
        filters, channels, kernel, _ = weight.shape
        n, _, out_h, out_w = grad_y.shape
        grad_rows = np.ascontiguousarray(grad_y.transpose(0, 2, 3, 1)).reshape(-1, filters)
        if not need_input_grad:
            return None, (cols, grad_rows)
        grad_cols = (grad_rows @ weight.reshape(filters, -1)).reshape(
            n, out_h, out_w, channels, kernel, kernel)
        grad_padded = scatter_windows(grad_cols.transpose(0, 3, 1, 2, 4, 5), padded_shape,
                                      self.stride)
        pad = self.padding
        if pad:
            grad_padded = np.ascontiguousarray(grad_padded[:, :, pad:-pad, pad:-pad])
        return grad_padded, (cols, grad_rows)

    def backward_weight(self, weight_cache: Any) -> None:
        cols, grad_rows = weight_cache
        self.grad["weight"] += (grad_rows.T @ cols).reshape(self.grad["weight"].shape)
        self.grad["bias"] += grad_rows.sum(axis=0)


class _Pool(Layer):
    """A parameter-free window of ``size`` moved by ``stride`` (default: the size)."""

    def __init__(self, index: int, size: int, stride: int | None = None) -> None:
        super().__init__(index)
        self.size, self.stride = size, stride or size


class MaxPool2d(_Pool):
    """Max over each window; the gradient goes to the first maximum (as torch picks it)."""

    type = "maxpool2d"

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        patches = windows(x, self.size, self.stride)
        flat = patches.reshape(*patches.shape[:4], -1)
        winner = flat.argmax(axis=-1)
        y = np.take_along_axis(flat, winner[..., None], axis=-1)[..., 0]
        return np.ascontiguousarray(y), (x.shape, winner)

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        shape, winner = cache
        k = self.size
        offsets = np.arange(k * k).reshape(k, k)
        grad_windows = np.where(winner[..., None, None] == offsets, grad_y[..., None, None],
                                grad_y.dtype.type(0))
        return scatter_windows(grad_windows, shape, self.stride), None


class AvgPool2d(_Pool):
    type = "avgpool2d"

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        patches = windows(x, self.size, self.stride)
        return np.ascontiguousarray(patches.mean(axis=(-2, -1))), x.shape

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        k = self.size
        share = grad_y * grad_y.dtype.type(1 / (k * k))
        grad_windows = np.broadcast_to(share[..., None, None], (*share.shape, k, k))
        return scatter_windows(grad_windows, cache, self.stride), None
