"""Training runs: the distributed loop around the coordinator, and the one-process reference.

The package is also the API's entry: ``pipetrain.train(config, ...)`` calls
:func:`pipetrain.train.api.train` (the package keeps its name, which is its layer's, and answers
the call the API promises; see ``pipetrain.train.api``).
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _TrainPackage(types.ModuleType):
    def __call__(self, config: Any = None, **options: Any) -> Any:
        """``pipetrain.train(config, **options) -> RunResult``: see ``pipetrain.train.api``."""
        from pipetrain.train.api import train

        return train(config, **options)


sys.modules[__name__].__class__ = _TrainPackage
