"""What a run trains on: the dataset prepared for the model, its split and its batches.

Every process that needs data (the reference, the first and last pipeline stages) builds the same
:class:`Workload` from the config, deterministically, instead of receiving arrays from elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from system.config import ConfigError, TrainConfig
from system.data.datasets import DataError, load_dataset, normalize
from system.data.sampler import Batches, holdout_split


@dataclass(frozen=True)
class Workload:
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


def prepare(config: TrainConfig) -> Workload:
    dataset = load_dataset(config.dataset)
    if dataset.num_features != config.layers[0]:
        raise DataError(
            f"{dataset.name}: {dataset.num_features} features but the first layer expects "
            f"{config.layers[0]} (set --layers {dataset.num_features},...)"
        )
    if dataset.num_classes > config.layers[-1]:
        raise DataError(
            f"{dataset.name}: labels go up to {dataset.num_classes - 1} but the last layer has "
            f"{config.layers[-1]} outputs"
        )
    train, held = holdout_split(len(dataset.y), config.holdout, config.seed)
    if len(train) < config.batch_size:
        raise ConfigError(
            f"batch_size: {config.batch_size} is larger than the {len(train)} training samples"
        )
    x = normalize(dataset.x, train, config.normalize).astype(config.dtype)
    return Workload(
        x=np.ascontiguousarray(x),
        y=dataset.y,
        batches=Batches(train, config.batch_size, config.seed),
        eval_indices=held,
        epochs=config.epochs,
    )


def augmentation(config: TrainConfig) -> str | None:
    """The augmentation ``--augment`` means for this dataset (see ``system.data.augment``)."""
    if not config.augment:
        return None
    return "digits" if config.dataset == "digits" else "noise"


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(axis=1) == labels).mean())
