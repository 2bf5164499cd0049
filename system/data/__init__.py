"""Datasets (built-in digits, CSV, NPZ), the held-out split, normalisation and the sampler."""

from pipetrain.data.datasets import DataError, Dataset, load_dataset
from pipetrain.data.sampler import Batches, batch_positions, holdout_split, split_batch

__all__ = ["Batches", "DataError", "Dataset", "batch_positions", "holdout_split", "load_dataset",
           "split_batch"]
