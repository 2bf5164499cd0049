"""The tiny conv net and transformer that the model tests train (and the MPI tests reuse).

Tiny models on few steps (a large held-out share keeps the training set small), with dropout in
both so that its masks must not depend on how the batch is cut, and both dtypes.
"""

from __future__ import annotations

import itertools

from tests.helpers import (
    assert_bitwise_equal,
    assert_no_survivors,
    assert_same_steps,
    events,
    load_params,
    run_cli,
    run_state,
)

CONV = """
dataset = "digits"
holdout = 0.9
batch_size = 30
microbatches = 3
optimizer = "momentum"
lr = 0.05
epochs = 1
[[model]]
type = "conv2d"
channels = 4
kernel = 3
padding = 1
[[model]]
type = "relu"
[[model]]
type = "maxpool2d"
size = 2
[[model]]
type = "flatten"
[[model]]
type = "dropout"
p = 0.3
[[model]]
type = "dense"
"""

GPT = """
dataset = "sort"
holdout = 0.99
batch_size = 30
microbatches = 3
optimizer = "adam"
lr = 0.01
epochs = 1
[[model]]
type = "embedding"
dim = 8
context = 6
[[model]]
type = "dropout"
p = 0.1
[[model]]
type = "block"
heads = 2
hidden = 16
repeat = 2
[[model]]
type = "layernorm"
[[model]]
type = "dense"
"""
MODELS = {"conv": CONV, "gpt": GPT}
DTYPE = {1: "float64", 2: "float32"}  # by replica count: both dtypes, half the runs
GRID = list(itertools.product([1, 2, 3, 4], [1, 2], ["gpipe", "1f1b", "zb"]))  # S, R, schedule


def assert_matches_reference(model: str, run_dir, configs, references, stages: int,
                             replicas: int, schedule: str) -> None:
    """Train ``model`` on that grid point and compare it with the reference, step by step and to
    the last bit; the run ends done, evaluated, with nothing left running."""
    run_cli("train", str(configs[model]), "--run-dir", str(run_dir), "--stages", str(stages),
            "--replicas", str(replicas), "--schedule", schedule, "--dtype", DTYPE[replicas],
            "--quiet", check=True)
    reference = references(model, replicas)
    assert_same_steps(run_dir, reference)
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert run_state(run_dir)["state"] == "done"
    assert len(run_state(run_dir)["segments"]) == stages
    evaluated = [e for e in events(run_dir) if e["event"] == "evaluate"]
    assert evaluated and {"loss", "accuracy"} <= set(evaluated[-1])
    assert_no_survivors(run_dir)
