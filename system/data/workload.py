"""What a run trains on: the dataset prepared for the model, its split and its batches.

Every process that needs data (the reference, the first and last pipeline stages) builds the same
:class:`Workload` from a :class:`DataSpec`, deterministically, instead of receiving arrays from
elsewhere. A stage in the middle only needs the data's shape (:func:`input_spec`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipetrain.data.datasets import DataError, Dataset, load_dataset, normalize
from pipetrain.data.sampler import Batches, holdout_split
from pipetrain.nn.model import InputSpec


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
    context: int | None = None  # the embedding's context: a text's window, a sort's length
    images: bool = False  # the model starts with conv2d: the digits as (1, 8, 8)


@dataclass(frozen=True)
class Workload:
    dataset: Dataset  # as loaded (names the source, counts features and classes)
    x: np.ndarray  # all samples: normalised in the model's dtype, or int64 tokens
    y: np.ndarray  # int64 labels, (N,) or (N, T)
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


def _file_key(name: str) -> tuple[int, int] | None:
    try:
        info = os.stat(name)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


@lru_cache(maxsize=4)
def _cached_dataset(name: str, context: int | None, images: bool,
                    file_key: tuple[int, int] | None) -> Dataset:
    dataset = load_dataset(name, context=context, images=images)
    for array in (dataset.x, dataset.y):
        array.flags.writeable = False  # shared by every caller in this process
    return dataset


def dataset_of(spec: DataSpec) -> Dataset:
    """The dataset of ``spec``, loaded once per process (again if the file changed)."""
    return _cached_dataset(spec.dataset, spec.context, spec.images, _file_key(spec.dataset))


def input_spec(spec: DataSpec) -> InputSpec:
    """What the model sees of the data: one sample's shape, tokens or numbers, the classes."""
    dataset = dataset_of(spec)
    return InputSpec(shape=tuple(dataset.x.shape[1:]), tokens=dataset.tokens,
                     vocab=dataset.vocab_size, classes=dataset.num_classes,
                     label_shape=tuple(dataset.y.shape[1:]))


def split(dataset: Dataset, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) sample indices: a text's held-out part is the tail of its windows."""
    if not dataset.contiguous_holdout:
        return holdout_split(len(dataset.y), holdout, seed)
    count = len(dataset.y)
    held = int(count * holdout)
    return np.arange(count - held), np.arange(count - held, count)


def prepare(spec: DataSpec) -> Workload:
    """Load, split and normalise the data of ``spec``; a bad dataset is a :class:`DataError`."""
    dataset = dataset_of(spec)
    train, held = split(dataset, spec.holdout, spec.seed)
    if len(train) < spec.batch_size:
        raise DataError(f"{dataset.name}: batch_size {spec.batch_size} is larger than the "
                        f"{len(train)} training samples")
    if dataset.tokens:
        if spec.normalize != "none":
            raise DataError(f"{dataset.name}: tokens cannot be normalised; set normalize = "
                            "\"none\"")
        x = dataset.x
    else:
        x = normalize(dataset.x, train, spec.normalize).astype(spec.dtype)
    return Workload(
        dataset=dataset,
        x=np.ascontiguousarray(x),
        y=dataset.y,
        batches=Batches(train, spec.batch_size, spec.seed),
        eval_indices=held,
        epochs=spec.epochs,
    )
