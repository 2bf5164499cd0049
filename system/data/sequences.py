"""The sequence tasks: character-level text windows and the built-in sorting task.

**Text** (a ``.txt`` file, UTF-8): the vocabulary is the sorted set of the file's characters
(token id = position in it) and sample ``i`` is ``x = text[i*T:(i+1)*T]``,
``y = text[i*T+1:(i+1)*T+1]`` with T the embedding's context: windows that do not overlap, so
the held-out part, the contiguous tail of the windows, shares no character with training.

**Sort** (``sort``): ``n = T / 2`` digits (0..9) to be sorted. The model reads the digits, a
separator, and the sorted digits so far, and answers each position::

    x:  3 1 4 1 | 1 1 3      (| is token 10)
    y:  _ _ _ _ 1 1 3 4      (_ is token 11: "still reading")

so every position has a single right answer and the loss can reach zero; a sequence counts as
right when all its positions are. Under teacher forcing that is the same as greedy decoding
getting the whole sorted sequence right: each step's argmax is the truth given a true prefix.
The sequences are a fixed function of n (their own generator), whatever the run's seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipetrain.data.base import BUILT_IN, DataError, Dataset

SORT = BUILT_IN[1]
SORT_VALUES = 10
SORT_SEPARATOR, SORT_READING = SORT_VALUES, SORT_VALUES + 1
SORT_SAMPLES = 20_000
_SORT_STREAM = 0x534F5254  # "SORT"


def make_sort(context: int | None) -> Dataset:
    if context is None or context < 2 or context % 2:
        raise DataError(f"{SORT}: needs a model starting with an embedding whose context is an "
                        f"even length >= 2 (twice the digits to sort), got {context}")
    n = context // 2
    rng = np.random.default_rng([_SORT_STREAM, n])
    digits = rng.integers(0, SORT_VALUES, size=(SORT_SAMPLES, n))
    ordered = np.sort(digits, axis=1)
    separator = np.full((SORT_SAMPLES, 1), SORT_SEPARATOR)
    x = np.concatenate([digits, separator, ordered[:, :-1]], axis=1)
    y = np.concatenate([np.full((SORT_SAMPLES, n), SORT_READING), ordered], axis=1)
    return Dataset(SORT, x.astype(np.int64), y.astype(np.int64), task="sequence",
                   vocab_size=SORT_VALUES + 2)


def load_text(path: Path, context: int | None) -> Dataset:
    if context is None:
        raise DataError(f"{path}: a text is read as characters by a model that starts with an "
                        "embedding (its context is the window length); add one")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {exc.start})") from None
    windows = (len(text) - 1) // context
    if windows < 2:
        raise DataError(f"{path}: {len(text)} characters make fewer than two windows of "
                        f"{context} (+1); use a longer text or a smaller context")
    vocabulary = "".join(sorted(set(text)))
    lookup = {char: index for index, char in enumerate(vocabulary)}
    ids = np.fromiter((lookup[char] for char in text), dtype=np.int64, count=len(text))
    used = windows * context
    return Dataset(str(path), ids[:used].reshape(windows, context),
                   ids[1:used + 1].reshape(windows, context), task="language",
                   vocab_size=len(vocabulary), vocabulary=vocabulary, contiguous_holdout=True)


def encode(text: str, vocabulary: str) -> np.ndarray:
    """Token ids of ``text``; a character outside the vocabulary is a :class:`DataError`."""
    lookup = {char: index for index, char in enumerate(vocabulary)}
    missing = sorted(set(text) - set(lookup))
    if missing:
        raise DataError(f"the prompt has characters the model never saw: {''.join(missing)!r}")
    return np.array([lookup[char] for char in text], dtype=np.int64)
