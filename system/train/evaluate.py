"""What both trainers share: the checked workload of a config, and held-out evaluation."""

from __future__ import annotations

import numpy as np

from pipetrain.config import TrainConfig, check_data
from pipetrain.data.workload import Workload, prepare
from pipetrain.nn import accuracy
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
