"""Unit tests for pipetrain.data: the built-in digits, CSV and NPZ validation, the held-out split,
the sampler and normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from pipetrain.data import Batches, DataError, holdout_split, load_dataset, split_batch
from pipetrain.data.datasets import normalize

# --------------------------------------------------------------------------------- digits


def test_digits_shape_range_and_labels():
    data = load_dataset("digits")
    assert data.x.shape == (1797, 64)
    assert data.y.shape == (1797,)
    assert data.x.dtype == np.float64
    assert data.y.dtype == np.int64
    assert data.x.min() == 0.0
    assert data.x.max() == 1.0
    assert set(np.unique(data.y).tolist()) == set(range(10))
    assert data.num_features == 64
    assert data.num_classes == 10
    # Loading is deterministic.
    again = load_dataset("digits")
    assert np.array_equal(data.x, again.x) and np.array_equal(data.y, again.y)


# ------------------------------------------------------------------------------------ CSV


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def test_csv_good_file_loads(tmp_path):
    path = write(tmp_path, "good.csv",
                 "f1,f2,f3,label\n0.5,1,-2,3\n 1e-3 ,0,7.25, 0 \n\n4,5,6,1\n")
    data = load_dataset(str(path))
    np.testing.assert_array_equal(data.x, [[0.5, 1, -2], [1e-3, 0, 7.25], [4, 5, 6]])
    np.testing.assert_array_equal(data.y, [3, 0, 1])
    assert data.x.dtype == np.float64 and data.y.dtype == np.int64
    assert data.num_classes == 4


GOOD_HEAD = "a,b,label\n1,2,0\n"

# (id, content, line the message must name, words the message must contain)
CSV_BAD = [
    ("no-label-column", "a,b,c\n1,2,3\n", 1, "label"),
    ("label-not-last", "label,a,b\n1,2,3\n", 1, "label"),
    ("non-numeric", GOOD_HEAD + "1,x7,1\n", 3, "not a number"),
    ("empty-cell", GOOD_HEAD + "1,,1\n", 3, "not a number"),
    ("nan", GOOD_HEAD + "nan,2,1\n", 3, "not finite"),
    ("inf", GOOD_HEAD + "1,inf,1\n", 3, "not finite"),
    ("minus-inf", GOOD_HEAD + "1,2,0\n-inf,2,1\n", 4, "not finite"),
    ("overflow-to-inf", GOOD_HEAD + "1e400,2,1\n", 3, "not finite"),
    ("too-few-cells", GOOD_HEAD + "1,0\n", 3, "cells"),
    ("too-many-cells", GOOD_HEAD + "1,2,3,0\n", 3, "cells"),
    ("label-float", GOOD_HEAD + "1,2,1.5\n", 3, "not an integer"),
    ("label-word", GOOD_HEAD + "1,2,cat\n", 3, "not an integer"),
    ("label-empty", GOOD_HEAD + "1,2,\n", 3, "not an integer"),
    ("label-negative", GOOD_HEAD + "1,2,-1\n", 3, "negative"),
    ("after-blank-line", GOOD_HEAD + "\n1,2,z\n", 4, "not an integer"),
]


@pytest.mark.parametrize("content,line,problem", [c[1:] for c in CSV_BAD],
                         ids=[c[0] for c in CSV_BAD])
def test_csv_bad_file_refused_naming_file_line_and_problem(tmp_path, content, line, problem):
    path = write(tmp_path, "bad.csv", content)
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    message = str(info.value)
    assert f"{path}:{line}:" in message
    assert problem in message
    assert "\n" not in message


def test_csv_non_utf8_refused_naming_the_line(tmp_path):
    path = write(tmp_path, "latin.csv", b"a,b,label\n1,2,0\n1,\xe9\xff,1\n")
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    message = str(info.value)
    assert str(path) in message and "UTF-8" in message
    assert f"{path}:3:" in message


def test_csv_non_utf8_refused(tmp_path):
    path = write(tmp_path, "latin.csv", b"a,b,label\n1,2,0\n1,\xe9\xff,1\n")
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    assert str(path) in str(info.value)
    assert "UTF-8" in str(info.value)


@pytest.mark.parametrize("content,problem", [
    ("", "empty"),
    ("\n\n", "empty"),
    ("a,b,label\n", "no data rows"),
    ("a,b,label\n\n\n", "no data rows"),
    ("label\n1\n", "no feature columns"),
], ids=["empty", "blank-lines", "header-only", "header-and-blank-lines", "label-only"])
def test_csv_without_samples_refused(tmp_path, content, problem):
    # File-level problems: the message names the file and the problem (there is no bad line).
    path = write(tmp_path, "thin.csv", content)
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    assert str(path) in str(info.value)
    assert problem in str(info.value)


# ------------------------------------------------------------------------------------ NPZ


def test_npz_good_file_loads(tmp_path):
    path = tmp_path / "good.npz"
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(path, x=x, y=np.array([0, 2, 1, 2], dtype=np.int32))
    data = load_dataset(str(path))
    assert data.x.dtype == np.float64 and data.y.dtype == np.int64
    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, [0, 2, 1, 2])
    # Integral float labels are accepted too.
    np.savez(path, x=x, y=np.array([0.0, 1.0, 3.0, 1.0]))
    np.testing.assert_array_equal(load_dataset(str(path)).y, [0, 1, 3, 1])


X4 = np.ones((4, 3))
NPZ_BAD = [
    ("missing-y", {"x": X4}, "'y'"),
    ("missing-x", {"y": np.zeros(4, int)}, "'x'"),
    ("x-1d", {"x": np.ones(4), "y": np.zeros(4, int)}, "2-D"),
    ("length-mismatch", {"x": X4, "y": np.zeros(5, int)}, "shape"),
    ("y-2d", {"x": X4, "y": np.zeros((4, 1), int)}, "shape"),
    ("nan-in-x", {"x": np.where(np.eye(4, 3) > 0, np.nan, 1.0), "y": np.zeros(4, int)}, "NaN"),
    ("inf-in-x", {"x": np.full((4, 3), np.inf), "y": np.zeros(4, int)}, "infinite"),
    ("fractional-labels", {"x": X4, "y": np.array([0, 1.5, 2, 0])}, "not an integer"),
    ("nan-label", {"x": X4, "y": np.array([0, np.nan, 2, 0])}, "not an integer"),
    ("negative-label", {"x": X4, "y": np.array([0, -3, 2, 0])}, "negative"),
    ("string-labels", {"x": X4, "y": np.array(["a", "b", "c", "d"])}, "integer"),
    ("string-x", {"x": np.full((4, 3), "1"), "y": np.zeros(4, int)}, "real numbers"),
    ("complex-x", {"x": X4 + 1j, "y": np.zeros(4, int)}, "real numbers"),
    ("no-samples", {"x": np.ones((0, 3)), "y": np.zeros(0, int)}, "no samples"),
]


@pytest.mark.parametrize("arrays,problem", [c[1:] for c in NPZ_BAD], ids=[c[0] for c in NPZ_BAD])
def test_npz_bad_file_refused(tmp_path, arrays, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_npz_object_arrays_refused(tmp_path):
    path = tmp_path / "objects.npz"
    x = np.empty((2, 2), dtype=object)
    x[...] = 1.0
    np.savez(path, x=x, y=np.array([0, 1]))  # object arrays are pickled inside the archive
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    assert str(path) in str(info.value)


def test_npz_not_a_zip_refused(tmp_path):
    path = write(tmp_path, "junk.npz", b"this is plain text, not a zip archive\n")
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    assert str(path) in str(info.value)


def test_npz_empty_file_refused(tmp_path):
    path = write(tmp_path, "empty.npz", b"")
    with pytest.raises(DataError):
        load_dataset(str(path))


def test_npz_that_is_really_npy_refused(tmp_path):
    path = tmp_path / "array.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.ones((3, 2)))
    with pytest.raises(DataError):
        load_dataset(str(path))


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("label", [np.inf, 1e30], ids=["inf", "huge"])
def test_npz_unrepresentable_float_labels_refused(tmp_path, label):
    path = tmp_path / "labels.npz"
    np.savez(path, x=np.ones((3, 2)), y=np.array([0.0, label, 1.0]))
    with pytest.raises(DataError):
        load_dataset(str(path))


# ------------------------------------------------------------------- files and extensions


def test_unsupported_extension_refused(tmp_path):
    path = write(tmp_path, "data.txt", "a,label\n1,0\n")
    with pytest.raises(DataError, match="unsupported") as info:
        load_dataset(str(path))
    assert str(path) in str(info.value)


def test_missing_file_refused(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(DataError, match="no such file") as info:
        load_dataset(str(path))
    assert str(path) in str(info.value)


def test_directory_refused(tmp_path):
    path = tmp_path / "folder.csv"
    path.mkdir()
    with pytest.raises(DataError, match="not a regular file"):
        load_dataset(str(path))


# -------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("n,fraction", [(1797, 0.2), (100, 0.5), (10, 0.25), (7, 0.99)])
def test_holdout_split_deterministic_disjoint_covering(n, fraction):
    train, held = holdout_split(n, fraction, seed=3)
    train2, held2 = holdout_split(n, fraction, seed=3)
    assert np.array_equal(train, train2) and np.array_equal(held, held2)
    assert len(np.intersect1d(train, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(n))
    assert len(held) == int(n * fraction)
    assert np.array_equal(train, np.sort(train)) and np.array_equal(held, np.sort(held))


def test_holdout_split_depends_on_seed_and_is_random():
    _, held_a = holdout_split(1000, 0.2, seed=1)
    _, held_b = holdout_split(1000, 0.2, seed=2)
    assert not np.array_equal(held_a, held_b)
    assert not np.array_equal(held_a, np.arange(200))  # not simply the first rows


def test_holdout_fraction_zero_and_invalid():
    train, held = holdout_split(50, 0.0, seed=0)
    assert len(held) == 0
    assert np.array_equal(train, np.arange(50))
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            holdout_split(50, bad, seed=0)


def test_batches_epoch_orders():
    train = np.arange(3, 103)
    batches = Batches(train, batch_size=16, seed=5)
    assert batches.steps_per_epoch == 6  # the incomplete last batch is dropped
    e0, e1 = batches.epoch_order(0), batches.epoch_order(1)
    assert not np.array_equal(e0, e1)
    assert np.array_equal(np.sort(e0), train) and np.array_equal(np.sort(e1), train)
    assert not np.array_equal(e0, train)
    same = Batches(train.copy(), batch_size=16, seed=5)
    assert np.array_equal(same.epoch_order(1), e1)
    other = Batches(train, batch_size=16, seed=6)
    assert not np.array_equal(other.epoch_order(0), e0)
    # Batches are consecutive slices of the epoch order; no sample twice in one epoch.
    steps = [batches.batch(1, k) for k in range(batches.steps_per_epoch)]
    assert np.array_equal(np.concatenate(steps), e1[: 6 * 16])
    assert all(len(b) == 16 for b in steps)
    with pytest.raises(IndexError):
        batches.batch(0, 6)
    with pytest.raises(IndexError):
        batches.batch(0, -1)


@pytest.mark.parametrize("size,replicas,microbatches", [(10, 1, 1), (10, 2, 3), (64, 1, 4),
                                                         (7, 3, 2), (5, 1, 5)])
def test_split_batch_covers_the_batch_in_order(size, replicas, microbatches):
    batch = np.random.default_rng(size).permutation(100)[:size]
    pieces = split_batch(batch, replicas, microbatches)
    assert len(pieces) == replicas
    assert all(len(share) == microbatches for share in pieces)
    flat = [piece for share in pieces for piece in share]
    assert np.array_equal(np.concatenate(flat), batch)
    sizes = [len(piece) for piece in flat]
    assert all(s >= 1 for s in sizes)
    share_sizes = [sum(len(p) for p in share) for share in pieces]
    assert max(share_sizes) - min(share_sizes) <= 1
    assert share_sizes == sorted(share_sizes, reverse=True)  # the first B % R are larger


# ---------------------------------------------------------------------------- normalize


def leaky_data():
    """Training rows and held-out rows with very different statistics."""
    rng = np.random.default_rng(0)
    x = np.empty((40, 3))
    x[:30] = rng.normal([1.0, -5.0, 2.0], [2.0, 0.5, 1.0], (30, 3))
    x[30:] = rng.normal([100.0, 50.0, -80.0], [30.0, 20.0, 10.0], (10, 3))
    x[:30, 2] = 7.0  # constant on the training rows, varying on the held-out rows
    train = np.arange(30)
    return x, train


def test_normalize_standard_uses_training_rows_only():
    x, train = leaky_data()
    out = normalize(x, train, "standard")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[train, :2].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(out[train, :2].std(axis=0), 1, rtol=1e-12)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    np.testing.assert_allclose(out[30:, :2], (x[30:, :2] - mean[:2]) / std[:2], rtol=1e-12)
    # The constant column: shifted to 0, scale 1, never divided by zero.
    np.testing.assert_array_equal(out[train, 2], 0.0)
    np.testing.assert_allclose(out[30:, 2], x[30:, 2] - 7.0, rtol=1e-12)
    # Statistics over all rows would give something else: prove the data can tell them apart.
    assert not np.allclose(out[:, 0].mean(), 0, atol=1e-3)


def test_normalize_minmax_uses_training_rows_only():
    x, train = leaky_data()
    out = normalize(x, train, "minmax")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[train, :2].min(axis=0), 0, atol=1e-15)
    np.testing.assert_allclose(out[train, :2].max(axis=0), 1, rtol=1e-15)
    assert out[30:, 0].min() > 1  # held-out rows are far above the training range
    np.testing.assert_array_equal(out[train, 2], 0.0)
    lo, hi = x[train].min(axis=0), x[train].max(axis=0)
    np.testing.assert_allclose(out[30:, :2], (x[30:, :2] - lo[:2]) / (hi - lo)[:2], rtol=1e-12)


def test_normalize_none_and_unknown():
    x, train = leaky_data()
    assert np.array_equal(normalize(x, train, "none"), x)
    with pytest.raises(ValueError, match="zscore"):
        normalize(x, train, "zscore")


def test_normalize_all_constant_columns_stay_finite():
    x = np.full((6, 2), 3.0)
    for method in ("standard", "minmax"):
        out = normalize(x, np.arange(4), method)
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out, 0.0)
