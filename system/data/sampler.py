"""The held-out split, the per-epoch shuffle and the cutting of a global batch.

All of it is a pure function of (seed, epoch, step): the first and last pipeline stages, every
replica and the single-process reference derive the same sample indices independently, and a
resumed run derives the same ones again without storing them.

Cutting a global batch of ``B`` indices: ``np.array_split`` into ``R`` replica shares (contiguous,
the first ``B % R`` one larger), then each share into ``M`` micro-batches the same way. The last
incomplete batch of an epoch is dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

_SPLIT_STREAM, _SHUFFLE_STREAM = 1, 2


def holdout_split(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices), both sorted; ``fraction`` of the samples held out."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(num_samples)
    num_held = int(num_samples * fraction)
    return np.sort(order[num_held:]), np.sort(order[:num_held])


@dataclass(frozen=True)
class Batches:
    """The global batches of training: which sample indices step ``k`` of epoch ``e`` uses."""

    train_indices: np.ndarray
    batch_size: int
    seed: int
    # The orders of the last epochs asked for: a permutation of the whole training set costs
    # more than preparing a small micro-batch, and every micro-batch of an epoch asks for it.
    _orders: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False,
                                           compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)
    # The last global batch cut into its pieces: (epoch, step, replicas, micro-batches) -> it.
    _pieces: dict[tuple[int, int, int, int], list[list[np.ndarray]]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_indices) // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's shuffled sample indices (read-only: it is shared by every caller)."""
        with self._lock:  # the loader threads of a stage ask at once
            order = self._orders.get(epoch)
            if order is None:
                rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
                order = self.train_indices[rng.permutation(len(self.train_indices))]
                order.flags.writeable = False
                if len(self._orders) >= 2:  # loaders may straddle an epoch boundary
                    del self._orders[min(self._orders)]
                self._orders[epoch] = order
            return order

    def batch(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        if not 0 <= step_in_epoch < self.steps_per_epoch:
            raise IndexError(f"step {step_in_epoch} outside epoch of {self.steps_per_epoch}")
        start = step_in_epoch * self.batch_size
        return self.epoch_order(epoch)[start : start + self.batch_size]


    def microbatch(self, epoch: int, step_in_epoch: int, replicas: int, microbatches: int,
                   replica: int, microbatch: int) -> np.ndarray:
        """The indices of one micro-batch of one replica (:func:`split_batch` of the step's
        batch, cut once for all its micro-batches)."""
        key = (epoch, step_in_epoch, replicas, microbatches)
        with self._lock:
            pieces = self._pieces.get(key)
        if pieces is None:
            pieces = split_batch(self.batch(epoch, step_in_epoch), replicas, microbatches)
            with self._lock:
                if len(self._pieces) >= 4:  # prefetching loaders work on a few steps at once
                    del self._pieces[next(iter(self._pieces))]
                self._pieces[key] = pieces
        return pieces[replica][microbatch]


def split_batch(batch: np.ndarray, replicas: int, microbatches: int) -> list[list[np.ndarray]]:
    """``[replica][micro-batch] -> indices``, contiguous pieces in order."""
    return [list(np.array_split(share, microbatches)) for share in np.array_split(batch, replicas)]


def batch_positions(batch_size: int, replicas: int, microbatches: int, replica: int,
                    microbatch: int) -> np.ndarray:
    """Where the rows of one micro-batch sit in the global batch (the same cut as
    :func:`split_batch`): what a stage without the data needs to seed dropout per sample."""
    return split_batch(np.arange(batch_size), replicas, microbatches)[replica][microbatch]
