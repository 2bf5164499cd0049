"""The dataset record every loader returns, and the error a bad dataset raises."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipetrain.status import UserError

DIGITS = "digits"
BUILT_IN = (DIGITS, "sort")  # dataset names that are not paths (sort: pipetrain.data.sequences)


class DataError(UserError, ValueError):
    """A dataset that cannot be used; the message names the file, line and problem."""


# What a dataset is evaluated by: accuracy per sample, accuracy of whole sequences, or (a
# language) only the held-out loss.
TASKS = ("classify", "sequence", "language")


@dataclass(frozen=True)
class Dataset:
    name: str
    x: np.ndarray  # (samples, ...) float64, or int64 tokens (samples, T)
    y: np.ndarray  # (samples,) or (samples, T), int64, >= 0
    task: str = "classify"
    vocab_size: int = 0  # token ids 0..vocab_size-1 (tokens only)
    vocabulary: str | None = None  # a text's characters, in token-id order
    contiguous_holdout: bool = False  # hold out the tail (a text), not a seeded choice

    @property
    def tokens(self) -> bool:
        return np.issubdtype(self.x.dtype, np.integer)

    @property
    def num_features(self) -> int:
        return self.x.shape[1]

    @property
    def num_classes(self) -> int:
        if self.vocab_size:
            return self.vocab_size
        return int(self.y.max()) + 1 if self.y.size else 0
