"""Fixtures of the model tests: the tiny configs on disk, and their reference runs."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli
from tests.training.model_runs import DTYPE, MODELS


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, text in MODELS.items():
        paths[name] = root / f"{name}.toml"
        paths[name].write_text(text)
    return paths


@pytest.fixture(scope="module")
def references(tmp_path_factory, configs):
    cache = {}

    def get(model: str, replicas: int):
        if (model, replicas) not in cache:
            run_dir = tmp_path_factory.mktemp("ref")
            run_cli("reference", str(configs[model]), "--run-dir", str(run_dir), "--replicas",
                    str(replicas), "--dtype", DTYPE[replicas], "--quiet", check=True)
            cache[model, replicas] = run_dir
        return cache[model, replicas]

    return get
