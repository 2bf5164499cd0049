"""pipetrain: train a neural network across OS processes, bitwise equal to one process.

The packages are layers; a module imports only from its own package and the ones below it
(``tests/test_layout.py`` holds this, and that no import goes round in a cycle)::

    cli                      the command line
    training                 the training loop around the coordinator; the reference; the API
    runtime                  processes: messages, topology, signals, worker, coordinator, launchers
    config                   the resolved, validated run configuration
    run                      the run directory: state, events, checkpoints, progress
    pipeline                 schedules as data, partitioning, one stage's compute
    wire                     frames and channels (pipes, MPI), the chain all-reduce
    data                     datasets, the sampler, augmentation, the threaded loader
    nn                       pure numpy math: layers, loss, optimizers, digests
    hooks, status, threads   the fault seam, exit codes and states, helper threads

The Python API, documented in ``pipetrain.training.api``::

    import pipetrain
    result = pipetrain.train({"epochs": 5}, stages=2)     # -> pipetrain.RunResult
    check = pipetrain.reference({"epochs": 5})            # the same run in one process

They are looked up on first use (PEP 562), so ``import pipetrain`` stays as light as the
modules below it need: a worker importing ``pipetrain.hooks`` loads nothing of the API.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"
__all__ = ["train", "reference", "RunResult", "TrainConfig", "UserError", "__version__"]


def __getattr__(name: str) -> Any:
    # The one import from the top of the package upward (tests/test_layout.py allows it): the
    # API facade, resolved at attribute access, never at import.
    if name in ("train", "reference", "RunResult"):
        from pipetrain.training import api

        return getattr(api, name)
    if name == "TrainConfig":
        from pipetrain.config import TrainConfig

        return TrainConfig
    if name == "UserError":  # what a bad config or dataset raises (ConfigError, DataError)
        from pipetrain.status import UserError

        return UserError
    raise AttributeError(f"module 'pipetrain' has no attribute {name!r}")
