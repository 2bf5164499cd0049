"""Unit tests for pipetrain.config: keys, types, ranges, TOML files and the math digest."""

from __future__ import annotations

import pytest

from pipetrain.config import ConfigError, TrainConfig, build_config, load_toml


def refused(values: dict, *words: str) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(values, source="test.toml")
    message = str(info.value)
    assert "\n" not in message, "config errors are one line"
    assert message.startswith("test.toml: ")
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def test_defaults_are_valid():
    config = build_config({})
    assert config == TrainConfig()
    assert config.layers == (64, 128, 64, 10)
    assert config.num_layers == 3


def test_values_override_defaults():
    config = build_config({"stages": 2, "lr": 1, "optimizer": "adam", "augment": True,
                           "layers": [64, 32, 10], "run_dir": "/tmp/x"})
    assert config.stages == 2
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.optimizer == "adam"
    assert config.augment is True
    assert config.layers == (64, 32, 10)
    assert config.run_dir == "/tmp/x"


def test_unknown_key_named():
    message = refused({"epochs": 2, "learning_rate": 0.1}, "'learning_rate'", "unknown key")
    assert "epochs" in message  # the list of known keys helps fix the typo


@pytest.mark.parametrize("key,value,words", [
    ("stages", "3", ["stages", "integer"]),
    ("stages", True, ["stages", "integer"]),
    ("epochs", 2.0, ["epochs", "integer"]),
    ("batch_size", 64.5, ["batch_size", "integer"]),
    ("seed", None, ["seed", "integer"]),
    ("lr", "0.1", ["lr", "number"]),
    ("lr", True, ["lr", "number"]),
    ("augment", 1, ["augment", "true or false"]),
    ("optimizer", 3, ["optimizer", "string"]),
    ("layers", [64, "10"], ["layers", "integers"]),
    ("layers", [64, True], ["layers", "integers"]),
    ("layers", [64.0, 10], ["layers", "integers"]),
    ("layers", 64, ["layers"]),
    ("run_dir", 5, ["run_dir"]),
])
def test_wrong_types_refused(key, value, words):
    refused({key: value}, *words)


@pytest.mark.parametrize("values,key", [
    ({"stages": 0}, "stages"),
    ({"stages": -1}, "stages"),
    ({"stages": 4}, "stages"),  # 3 layers by default
    ({"layers": "64,10", "stages": 2}, "stages"),
    ({"microbatches": 0}, "microbatches"),
    ({"replicas": 0}, "replicas"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 8, "microbatches": 3, "replicas": 3}, "batch_size"),
    ({"batch_size": 3, "microbatches": 4}, "batch_size"),
    ({"lr": 0}, "lr"),
    ({"lr": -0.1}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": 1e6}, "lr"),
    ({"holdout": 1.0}, "holdout"),
    ({"holdout": -0.1}, "holdout"),
    ({"heartbeat_timeout": 0}, "heartbeat_timeout"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
    ({"loader_threads": -2}, "loader_threads"),
    ({"schedule": "pipedream"}, "schedule"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"dtype": "float16"}, "dtype"),
    ({"normalize": "zscore"}, "normalize"),
    ({"transport": "tcp"}, "transport"),
    ({"layers": [64]}, "layers"),
    ({"layers": [64, 0, 10], "stages": 1}, "layers"),
    ({"layers": [64, 2_000_000, 10], "stages": 1}, "layers"),
    ({"dataset": ""}, "dataset"),
])
def test_out_of_range_values_refused(values, key):
    refused(values, f"{key}:")


def test_loader_threads_are_a_count_or_chosen_per_stage():
    assert build_config({}).loader_threads == -1  # each stage chooses (data.loader.auto_threads)
    assert build_config({"loader_threads": 0}).loader_threads == 0
    refused({"loader_threads": -2}, "or -1 to let each stage choose")


def test_boundary_values_accepted():
    config = build_config({"batch_size": 12, "microbatches": 4, "replicas": 3, "stages": 3,
                           "holdout": 0.0, "checkpoint_every": 0, "lr": 1e-9})
    assert config.batch_size == config.microbatches * config.replicas
    assert build_config({"holdout": 0.999}).holdout == 0.999


def test_layers_parsing():
    assert build_config({"layers": "64,128,10", "stages": 2}).layers == (64, 128, 10)
    assert build_config({"layers": "64, 32 ,10", "stages": 2}).layers == (64, 32, 10)
    refused({"layers": "64,x"}, "layers", "64,x")
    refused({"layers": "64,,10"}, "layers")
    refused({"layers": ""}, "layers")


def test_load_toml_reads_a_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('layers = [64, 32, 10]\nstages = 2\nlr = 0.1\nschedule = "gpipe"\n')
    values = load_toml(path)
    assert values == {"layers": [64, 32, 10], "stages": 2, "lr": 0.1, "schedule": "gpipe"}
    config = build_config(values, source=str(path))
    assert config.layers == (64, 32, 10) and config.schedule == "gpipe"


@pytest.mark.parametrize("text", [
    "stages = \n", "this is not toml\n", "[train\n", "a = 1\na = 2\n",
])
def test_load_toml_invalid(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert str(path) in str(info.value)
    assert "TOML" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_toml_missing_and_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="no such config file") as info:
        load_toml(tmp_path / "absent.toml")
    assert str(tmp_path / "absent.toml") in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_toml(tmp_path)  # a directory
    assert str(tmp_path) in str(info.value)


def test_load_toml_non_utf8_refused(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes(b'dataset = "caf\xe9.csv"\n')
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert str(path) in str(info.value)


def test_math_digest():
    base = build_config({})
    assert base.math_digest() == build_config({}).math_digest()
    assert len(base.math_digest()) == 64
    assert base.math_digest() != build_config({"lr": 0.051}).math_digest()
    for changed in ({"seed": 1}, {"microbatches": 2}, {"optimizer": "adam"},
                    {"dtype": "float32"}, {"layers": "64,32,64,10"}, {"epochs": 3}):
        assert build_config(changed).math_digest() != base.math_digest(), changed
    for same in ({"stages": 1}, {"stages": 2}, {"schedule": "gpipe"}, {"schedule": "zb"},
                 {"run_dir": "/elsewhere"}, {"heartbeat_timeout": 60.0},
                 {"loader_threads": 4}, {"transport": "mpi"}):
        assert build_config(same).math_digest() == base.math_digest(), same


def test_to_json_round_trips():
    config = build_config({"layers": "64,32,10", "stages": 2, "run_dir": "r"})
    data = config.to_json()
    assert data["layers"] == [64, 32, 10]
    assert build_config(data) == config
