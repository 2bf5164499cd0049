"""What both trainers share: the checked workload of a config, and held-out evaluation."""

from __future__ import annotations

import numpy as np

from pipetrain.config import TrainConfig, check_data
from pipetrain.data.workload import Workload, prepare
from pipetrain.nn import accuracy, softmax_cross_entropy
from pipetrain.nn.layers import Segment, build_segment


def load_workload(config: TrainConfig) -> Workload:
    """The run's data, refused (DataError, one line) if the model does not fit it."""
    workload = prepare(config.data_spec())
    check_data(config, workload)
    return workload


def evaluate(segment: Segment, workload: Workload) -> float:
    """Held-out accuracy of the whole network ``segment`` (NaN when nothing is held out)."""
    indices = workload.eval_indices
    if len(indices) == 0:
        return float("nan")
    return accuracy(segment.forward(-1, workload.x[indices], keep=False), workload.y[indices])


def evaluate_params(params: dict[str, np.ndarray], config: TrainConfig,
                    workload: Workload) -> float:
    return evaluate(build_segment(params, 0, config.num_layers, config.num_layers), workload)


def held_out(segment: Segment, workload: Workload) -> dict[str, float]:
    """The ``evaluate`` event's fields: held-out mean loss (nats per sample) and accuracy
    (NaN both when nothing is held out)."""
    indices = workload.eval_indices
    if len(indices) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    logits = segment.forward(-1, workload.x[indices], keep=False)
    labels = workload.y[indices]
    loss, _ = softmax_cross_entropy(logits, labels, len(indices))
    return {"loss": loss, "accuracy": accuracy(logits, labels)}


def held_out_params(params: dict[str, np.ndarray], config: TrainConfig,
                    workload: Workload) -> dict[str, float]:
    return held_out(build_segment(params, 0, config.num_layers, config.num_layers), workload)
