"""Pure numpy neural-network math: layers, models, loss, optimizers, initialisation, digests.

Nothing here knows about processes, pipes or signals. Every summation happens in a fixed
order, so that the same inputs give the same bits in one process or split across many.
"""

from pipetrain.nn.basic import Dense
from pipetrain.nn.init import init_parameters
from pipetrain.nn.layer import Context, Layer
from pipetrain.nn.loss import accuracy, sequence_accuracy, softmax_cross_entropy
from pipetrain.nn.model import (
    InputSpec,
    LayerSpec,
    ModelError,
    ResolvedLayer,
    parameter_names,
    resolve,
    shorthand,
)
from pipetrain.nn.optim import OPTIMIZERS, Optimizer, make_optimizer
from pipetrain.nn.segment import Segment, build_segment

__all__ = [
    "OPTIMIZERS",
    "Context",
    "Dense",
    "InputSpec",
    "Layer",
    "LayerSpec",
    "ModelError",
    "Optimizer",
    "ResolvedLayer",
    "Segment",
    "accuracy",
    "build_segment",
    "init_parameters",
    "make_optimizer",
    "parameter_names",
    "resolve",
    "sequence_accuracy",
    "shorthand",
    "softmax_cross_entropy",
]
