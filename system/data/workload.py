"""What a run trains on: the dataset prepared for the model, its split and its batches.

Every process that needs data (the reference, the first and last pipeline stages) builds the same
:class:`Workload` from a :class:`DataSpec`, deterministically, instead of receiving arrays from
elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipetrain.data.datasets import DataError, Dataset, load_dataset, normalize
from pipetrain.data.sampler import Batches, holdout_split


@dataclass(frozen=True)
class DataSpec:
    """The settings that decide which samples a run sees, in which order and form."""

    dataset: str
    holdout: float
    seed: int
    normalize: str
    dtype: str
    batch_size: int
    epochs: int


@dataclass(frozen=True)
class Workload:
    dataset: Dataset  # as loaded (names the source, counts features and classes)
    x: np.ndarray  # all samples, normalised, in the model's dtype
    y: np.ndarray  # int64 labels
    batches: Batches
    eval_indices: np.ndarray
    epochs: int

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within epoch) of global step ``step`` (counted from 1)."""
        return divmod(step - 1, self.steps_per_epoch)


def prepare(spec: DataSpec) -> Workload:
    """Load, split and normalise the data of ``spec``; a bad dataset is a :class:`DataError`."""
    dataset = load_dataset(spec.dataset)
    train, held = holdout_split(len(dataset.y), spec.holdout, spec.seed)
    if len(train) < spec.batch_size:
        raise DataError(f"{dataset.name}: batch_size {spec.batch_size} is larger than the "
                        f"{len(train)} training samples")
    x = normalize(dataset.x, train, spec.normalize).astype(spec.dtype)
    return Workload(
        dataset=dataset,
        x=np.ascontiguousarray(x),
        y=dataset.y,
        batches=Batches(train, spec.batch_size, spec.seed),
        eval_indices=held,
        epochs=spec.epochs,
    )
