"""Pure numpy neural-network math: dense layers, ReLU, loss, optimizers, initialisation.

Nothing here knows about processes, pipes or signals. Every summation happens in a fixed
order, so that the same inputs give the same bits in one process or split across many.
"""

from system.nn.init import init_parameters
from system.nn.layers import Dense, Segment, parameter_names
from system.nn.loss import softmax_cross_entropy
from system.nn.optim import OPTIMIZERS, Optimizer, make_optimizer

__all__ = [
    "OPTIMIZERS",
    "Dense",
    "Optimizer",
    "Segment",
    "init_parameters",
    "make_optimizer",
    "parameter_names",
    "softmax_cross_entropy",
]
