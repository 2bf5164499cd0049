"""Loading and validating datasets.

Sources: the built-in ``digits`` (8x8 handwritten digits, shipped in this folder, see
DIGITS-README.md for the attribution; (N, 64), or (N, 1, 8, 8) images for a model that starts
with a convolution), a ``.csv`` file with a header row whose last column is ``label``, an
``.npz`` file with arrays ``x`` and ``y`` (features (N, F) or images (N, C, H, W) with integer
labels (N,), or integer tokens (N, T) with labels (N, T)), and the sequence tasks of
``pipetrain.data.sequences`` (a ``.txt`` file, the built-in ``sort``). A bad file is refused
with a :class:`DataError` that names the file, the line and the problem.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np

from pipetrain.data.base import BUILT_IN, DIGITS, TASKS, DataError, Dataset
from pipetrain.data.sequences import SORT, load_text, make_sort

__all__ = ["BUILT_IN", "DIGITS", "NORMALIZATIONS", "TASKS", "DataError", "Dataset",
           "load_dataset", "normalize"]

NORMALIZATIONS = ("none", "standard", "minmax")

def load_dataset(spec: str, *, context: int | None = None, images: bool = False) -> Dataset:
    """``digits``, ``sort`` or a path to a ``.csv`` / ``.npz`` / ``.txt`` file.

    ``context`` is the sequence length of a model that starts with an embedding (the window of
    a text, the length of a sort task); ``images`` asks for the digits as 1x8x8 images.
    """
    if spec == DIGITS:
        return _load_digits(images)
    if spec == SORT:
        return make_sort(context)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec}: no such file (use 'digits', 'sort' or a .csv / .npz / .txt "
                        "path)")
    if not path.is_file():
        raise DataError(f"{spec}: not a regular file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _load_csv(path)
    if suffix == ".npz":
        return _load_npz(path)
    if suffix == ".txt":
        return load_text(path, context)
    raise DataError(f"{spec}: unsupported file type {suffix!r} (expected .csv, .npz or .txt)")


def _load_digits(images: bool = False) -> Dataset:
    raw = resources.files("pipetrain.data").joinpath("digits.csv.gz").read_bytes()
    table = np.loadtxt(io.StringIO(gzip.decompress(raw).decode("ascii")), delimiter=",")
    # Pixels are counts 0..16: scaled to [0, 1] as the contract says.
    x = table[:, :-1] / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return Dataset(DIGITS, x, table[:, -1].astype(np.int64))


def _load_csv(path: Path) -> Dataset:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or not any(cell.strip() for cell in header):
        raise DataError(f"{path}: empty file (expected a header row ending in 'label')")
    header = [cell.strip() for cell in header]
    if header[-1] != "label":
        raise DataError(
            f"{path}:1: the last column must be 'label', found {header[-1][:40]!r}"
        )
    if len(header) < 2:
        raise DataError(f"{path}:1: no feature columns before 'label'")
    width = len(header)
    features: list[list[float]] = []
    labels: list[int] = []
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines (a trailing newline, say) carry no sample
        if len(row) != width:
            raise DataError(f"{path}:{line}: {len(row)} cells, the header has {width}")
        values = []
        for column, cell in zip(header[:-1], row[:-1], strict=True):
            values.append(_parse_feature(path, line, column, cell))
        features.append(values)
        labels.append(_parse_label(path, line, row[-1]))
    if not labels:
        raise DataError(f"{path}: no data rows after the header")
    return Dataset(str(path), np.array(features, dtype=np.float64), np.array(labels, np.int64))


def _parse_feature(path: Path, line: int, column: str, cell: str) -> float:
    try:
        if not cell.isascii():  # float() takes full-width and other Unicode digits: refuse
            raise ValueError(cell)
        value = float(cell)
    except ValueError:
        raise DataError(
            f"{path}:{line}: column {column!r}: {cell.strip()[:40]!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise DataError(f"{path}:{line}: column {column!r}: {cell.strip()!r} is not finite")
    return value


def _parse_label(path: Path, line: int, cell: str) -> int:
    text = cell.strip()
    try:
        if not text.isascii():
            raise ValueError(text)
        label = int(text)
    except ValueError:
        raise DataError(
            f"{path}:{line}: label {text[:40]!r} is not an integer class index"
        ) from None
    if label < 0:
        raise DataError(f"{path}:{line}: label {label} is negative")
    return label


def _load_npz(path: Path) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc or 'empty file'})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array, not an .npz archive with 'x' and 'y'")
    with archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise DataError(f"{path}: missing array(s) {', '.join(missing)} (needs 'x' and 'y')")
        try:
            x, y = archive["x"], archive["y"]
        except ValueError as exc:  # object arrays need pickle, which we refuse
            raise DataError(f"{path}: {exc}") from None
    if x.ndim == 2 and np.issubdtype(x.dtype, np.integer) and y.shape == x.shape:
        return _npz_tokens(path, x, y)
    if x.ndim not in (2, 4):
        raise DataError(f"{path}: 'x' must be 2-D (samples, features) or 4-D images (samples, "
                        f"channels, height, width), got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise DataError(f"{path}: 'y' has shape {y.shape}, expected ({x.shape[0]},) (or integer "
                        "tokens x (N, T) with y of the same shape)")
    if x.shape[0] == 0:
        raise DataError(f"{path}: no samples")
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise DataError(f"{path}: 'x' must be real numbers, got {x.dtype}")
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if bad.size:
        raise DataError(f"{path}: 'x' row {bad[0]} has a NaN or infinite value")
    if np.issubdtype(y.dtype, np.floating):
        huge = np.flatnonzero(~np.isfinite(y) | (np.abs(y) >= 2**31))
        if huge.size:
            raise DataError(
                f"{path}: label y[{huge[0]}] = {y[huge[0]]} is not an integer class index"
            )
        frac = np.flatnonzero(y != np.round(y))
        if frac.size:
            raise DataError(f"{path}: label y[{frac[0]}] = {y[frac[0]]} is not an integer")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must hold integer labels, got {y.dtype}")
    elif y.size and np.abs(y.astype(np.float64)).max() >= 2**31:
        raise DataError(f"{path}: a label in 'y' is too large to be a class index")
    if (y < 0).any():
        raise DataError(f"{path}: label y[{np.flatnonzero(y < 0)[0]}] is negative")
    return Dataset(str(path), x.astype(np.float64), y.astype(np.int64))


def normalize(x: np.ndarray, train_rows: np.ndarray, method: str) -> np.ndarray:
    """Scale features with statistics of the training rows only (no peeking at held-out data)."""
    if method == "none":
        return x
    train = x[train_rows]
    if method == "standard":
        shift, scale = train.mean(axis=0), train.std(axis=0)
    elif method == "minmax":
        shift, scale = train.min(axis=0), train.max(axis=0) - train.min(axis=0)
    else:
        raise ValueError(f"unknown normalisation {method!r} (choose from {NORMALIZATIONS})")
    scale = np.where(scale > 0, scale, 1.0)  # constant columns stay finite
    return (x - shift) / scale


def _npz_tokens(path: Path, x: np.ndarray, y: np.ndarray) -> Dataset:
    """Integer tokens x (N, T) with next-token labels y (N, T): a sequence task."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{path}: no samples")
    for name, array in (("x", x), ("y", y)):
        if array.min() < 0 or array.max() >= 2**31:
            raise DataError(f"{path}: '{name}' holds a token outside 0..2**31-1")
    vocab = int(max(x.max(), y.max())) + 1
    return Dataset(str(path), x.astype(np.int64), y.astype(np.int64), task="sequence",
                   vocab_size=vocab)
