"""Text windows, the sort task, NPZ images and tokens, digits as images, and the loader on them."""

from __future__ import annotations

import numpy as np
import pytest

from pipetrain.data.datasets import DataError, load_dataset
from pipetrain.data.loader import prepare_microbatch
from pipetrain.data.sequences import SORT_READING, SORT_SEPARATOR, encode
from pipetrain.data.workload import DataSpec, input_spec, prepare


def spec(dataset: str, **changes) -> DataSpec:
    values = {"dataset": dataset, "holdout": 0.25, "seed": 0, "normalize": "none",
              "dtype": "float64", "batch_size": 2, "epochs": 1, **changes}
    return DataSpec(**values)


def test_text_is_windows_of_characters_with_the_next_character_as_labels(tmp_path):
    path = tmp_path / "poem.txt"
    text = "the cat sat on the mat; the end.\n" * 3  # 99 characters
    path.write_text(text, encoding="utf-8")
    data = load_dataset(str(path), context=8)
    assert data.vocabulary == "".join(sorted(set(text)))
    assert data.task == "language" and data.tokens and data.vocab_size == len(data.vocabulary)
    assert data.x.shape == data.y.shape == ((len(text) - 1) // 8, 8)
    decode = np.array(list(data.vocabulary))
    for i in (0, 5, len(data.x) - 1):
        assert "".join(decode[data.x[i]]) == text[i * 8:(i + 1) * 8]
        assert "".join(decode[data.y[i]]) == text[i * 8 + 1:(i + 1) * 8 + 1]
    workload = prepare(spec(str(path), context=8))
    held = workload.eval_indices
    assert list(held) == list(range(len(data.x) - len(held), len(data.x)))  # the tail
    assert len(held) == int(len(data.x) * 0.25)
    assert np.array_equal(encode("the", data.vocabulary), data.x[0, :3])
    with pytest.raises(DataError, match="never saw"):
        encode("THE", data.vocabulary)


@pytest.mark.parametrize("content,context,problem", [
    (b"caf\xe9\n", 2, "not UTF-8"),
    (b"abc", 2, "fewer than two windows"),
    (b"abcdefgh" * 4, None, "embedding"),
])
def test_bad_text_refused(tmp_path, content, context, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_dataset(str(path), context=context)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_sort_task_reads_digits_then_answers_them_sorted():
    data = load_dataset("sort", context=8)
    assert data.x.shape == data.y.shape == (20_000, 8) and data.task == "sequence"
    assert data.vocab_size == 12 == input_spec(spec("sort", context=8)).vocab
    for x, y in zip(data.x[:50], data.y[:50], strict=True):
        digits, answer = x[:4], y[4:]
        assert x[4] == SORT_SEPARATOR and (y[:4] == SORT_READING).all()
        assert list(answer) == sorted(digits)
        assert list(x[5:]) == list(answer[:-1])  # teacher forcing: the answer so far
    again = load_dataset("sort", context=8)
    assert np.array_equal(again.x, data.x)  # a fixed task, whatever the run's seed
    with pytest.raises(DataError, match="even length"):
        load_dataset("sort", context=7)


def test_npz_images_and_tokens(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images.npz"
    np.savez(images, x=rng.random((6, 3, 4, 5)), y=np.arange(6) % 2)
    data = load_dataset(str(images))
    assert data.x.shape == (6, 3, 4, 5) and data.task == "classify" and not data.tokens
    assert input_spec(spec(str(images))).shape == (3, 4, 5)
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, x=rng.integers(0, 7, (5, 4)), y=rng.integers(0, 9, (5, 4)))
    data = load_dataset(str(tokens))
    assert data.tokens and data.task == "sequence" and data.vocab_size >= 7
    bad = tmp_path / "negative.npz"
    np.savez(bad, x=-np.ones((3, 4), dtype=np.int64), y=np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(DataError, match="outside"):
        load_dataset(str(bad))
    with pytest.raises(DataError, match="cannot be normalised"):
        prepare(spec(str(tokens), normalize="standard"))


def test_digits_as_images_hold_the_same_pixels():
    flat, images = load_dataset("digits"), load_dataset("digits", images=True)
    assert images.x.shape == (1797, 1, 8, 8)
    assert np.array_equal(images.x.reshape(1797, 64), flat.x)


def test_loader_keeps_tokens_integer_and_augments_images_like_flat_digits():
    tokens = prepare(spec("sort", context=6, batch_size=8))
    item = prepare_microbatch(tokens, 1, 0, replica=0, replicas=1, microbatches=2,
                              need_x=True, need_y=True, augment=None, seed=0,
                              dtype=np.dtype("float32"))
    assert item.x.dtype == np.int64 and item.y.shape == (4, 6)
    common = {"replica": 0, "replicas": 1, "microbatches": 2, "need_x": True, "need_y": True,
              "augment": "digits", "seed": 3, "dtype": np.dtype("float64")}
    flat = prepare_microbatch(prepare(spec("digits", batch_size=8)), 2, 1, **common)
    image = prepare_microbatch(prepare(spec("digits", batch_size=8, images=True)), 2, 1,
                               **common)
    assert image.x.shape == (4, 1, 8, 8)
    assert np.array_equal(image.x.reshape(4, 64), flat.x)
