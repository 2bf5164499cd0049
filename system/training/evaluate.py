"""What both trainers share: the checked workload of a config, and held-out evaluation.

Each task is judged by its own metric (the ``evaluate`` event carries them): ``loss``, the
held-out mean cross-entropy (nats per sample, or per token for sequences), always; and
``accuracy`` where the task has one: per sample for classification, whole sequences right for a
sequence task such as ``sort``. A language (a text) has only the loss. Evaluation runs without a
training context, so dropout is off.
"""

from __future__ import annotations

import numpy as np

from pipetrain.config import TrainConfig, check_data
from pipetrain.data.workload import Workload, prepare
from pipetrain.nn import Segment, accuracy, build_segment, sequence_accuracy, softmax_cross_entropy

EVAL_CHUNK = 256  # held-out samples per forward pass: bounds the memory of attention scores


def load_workload(config: TrainConfig) -> Workload:
    """The run's data, refused (DataError, one line) if the model does not fit it."""
    workload = prepare(config.data_spec())
    check_data(config, workload)
    return workload


def held_out(segment: Segment, workload: Workload) -> dict[str, float]:
    """``{"loss": ..., "accuracy": ...}`` of the whole network ``segment`` on the held-out
    samples (NaN when nothing is held out; no ``accuracy`` for a language)."""
    indices = workload.eval_indices
    task = workload.dataset.task
    loss, hits = 0.0, 0.0
    for start in range(0, len(indices), EVAL_CHUNK):
        chunk = indices[start:start + EVAL_CHUNK]
        logits = segment.forward(-1, workload.x[chunk], keep=False)
        labels = workload.y[chunk]
        loss += softmax_cross_entropy(logits, labels, len(indices))[0]
        if task == "classify":
            hits += accuracy(logits, labels) * len(chunk)
        elif task == "sequence":
            hits += sequence_accuracy(logits, labels) * len(chunk)
    count = len(indices)
    metrics = {"loss": loss if count else float("nan")}
    if task != "language":
        metrics["accuracy"] = hits / count if count else float("nan")
    return metrics


def held_out_params(params: dict[str, np.ndarray], config: TrainConfig,
                    workload: Workload) -> dict[str, float]:
    resolved = config.model_spec().resolved
    return held_out(build_segment(resolved, params, 0, len(resolved)), workload)
