"""Softmax cross-entropy, numerically stable, scaled by the global batch size."""

from __future__ import annotations

import numpy as np


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, global_batch_size: int
) -> tuple[float, np.ndarray]:
    """Loss contribution of one micro-batch and the gradient w.r.t. its logits.

    Both are divided by the *global* batch size, so summing the micro-batch losses (and
    accumulating their gradients) in micro-batch order gives the mean over the global batch.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match")
    if global_batch_size < logits.shape[0]:
        raise ValueError("global batch size is smaller than the micro-batch")
    rows = np.arange(logits.shape[0])
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    log_prob_true = shifted[rows, labels] - np.log(sum_exp[:, 0])
    loss = float(-log_prob_true.sum() / global_batch_size)
    grad = exp / sum_exp
    grad[rows, labels] -= 1
    grad /= global_batch_size
    return loss, grad


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows whose largest logit is at the label (NaN for no rows)."""
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(axis=1) == labels).mean())
