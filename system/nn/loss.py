"""Softmax cross-entropy, numerically stable, scaled by the global batch, and the metrics."""

from __future__ import annotations

import numpy as np


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, global_batch_size: int
) -> tuple[float, np.ndarray]:
    """Loss contribution of one micro-batch and the gradient w.r.t. its logits.

    Logits (N, V) with labels (N,), or (N, T, V) with labels (N, T). Both results are divided by
    the *global* number of predictions (``global_batch_size``, times T for sequences), so
    summing the micro-batch losses (and accumulating their gradients) in micro-batch order gives
    the mean over the global batch: per sample, or per position of a sequence.
    """
    if logits.ndim not in (2, 3) or labels.shape != logits.shape[:-1]:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match")
    if global_batch_size < logits.shape[0]:
        raise ValueError("global batch size is smaller than the micro-batch")
    count = global_batch_size * (logits.shape[1] if logits.ndim == 3 else 1)
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    rows = np.arange(flat.shape[0])
    shifted = flat - flat.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    log_prob_true = shifted[rows, flat_labels] - np.log(sum_exp[:, 0])
    loss = float(-log_prob_true.sum() / count)
    grad = exp / sum_exp
    grad[rows, flat_labels] -= 1
    grad /= count
    return loss, grad.reshape(logits.shape)


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The plain mean loss (nats per sample, or per position) of a whole held-out set."""
    return softmax_cross_entropy(logits, labels, logits.shape[0])[0] if len(labels) else np.nan


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows whose largest logit is at the label (NaN for no rows)."""
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(axis=1) == labels).mean())


def sequence_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of sequences predicted right at every position (NaN for none)."""
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(axis=-1) == labels).all(axis=-1).mean())
