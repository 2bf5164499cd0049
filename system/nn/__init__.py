"""Pure numpy neural-network math: layers, loss, optimizers, initialisation, digests.

Nothing here knows about processes, pipes or signals. Every summation happens in a fixed
order, so that the same inputs give the same bits in one process or split across many.
"""

from pipetrain.nn.init import init_parameters
from pipetrain.nn.layers import Dense, Segment, parameter_names
from pipetrain.nn.loss import accuracy, softmax_cross_entropy
from pipetrain.nn.optim import OPTIMIZERS, Optimizer, make_optimizer

__all__ = [
    "OPTIMIZERS",
    "Dense",
    "Optimizer",
    "Segment",
    "accuracy",
    "init_parameters",
    "make_optimizer",
    "parameter_names",
    "softmax_cross_entropy",
]
