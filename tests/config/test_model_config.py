"""[[model]] tables: parsing, `repeat`, refusals naming the table and key, and the shape checks
against the data that run before any process starts (one line naming the layer and the fix)."""

from __future__ import annotations

import pytest

from pipetrain.config import ConfigError, TrainConfig, build_config, check_data, load_toml
from pipetrain.data.datasets import DataError
from pipetrain.data.workload import prepare

CONV = [{"type": "conv2d", "channels": 4, "kernel": 3}, {"type": "relu"},
        {"type": "flatten"}, {"type": "dense"}]


def test_model_tables_from_toml_and_repeat(tmp_path):
    path = tmp_path / "gpt.toml"
    path.write_text('dataset = "sort"\nstages = 2\n'
                    '[[model]]\ntype = "embedding"\ndim = 8\ncontext = 6\n'
                    '[[model]]\ntype = "block"\nheads = 2\nhidden = 16\nrepeat = 3\n'
                    '[[model]]\ntype = "dense"\n')
    config = build_config(load_toml(path), source=str(path))
    assert [spec.type for spec in config.model] == ["embedding"] + ["block"] * 3 + ["dense"]
    assert config.num_layers == 5 and config.layers == ()
    assert config.data_spec().context == 6
    names = config.model_spec().parameter_names()
    assert names[:2] == ["layers.0.tokens", "layers.0.positions"]
    assert names[2:4] == ["layers.1.ln1.weight", "layers.1.ln1.bias"]
    assert "layers.3.mlp.proj.weight" in names and names[-1] == "layers.4.bias"
    # the resolved config round-trips through JSON (run.json, a worker's Init)
    assert build_config(config.to_json()) == config


def test_images_when_the_model_starts_with_conv2d():
    config = build_config({"model": CONV, "stages": 2})
    assert config.data_spec().images
    assert config.model_spec().data.shape == (1, 8, 8)
    assert build_config({}).model_spec().data.shape == (64,)


@pytest.mark.parametrize("tables,words", [
    ([{"type": "conv"}], ["model table 1", "'conv'", "conv2d"]),
    ([{"type": "dense", "unit": 3}], ["model table 1 (dense)", "'unit'", "units"]),
    ([{"type": "conv2d", "channels": 4}], ["model table 1 (conv2d)", "needs 'kernel'"]),
    ([{"type": "dense", "units": 0}], ["units", ">= 1"]),
    ([{"type": "dense", "units": 2.5}], ["units", "integer"]),
    ([{"type": "dropout", "p": 1.0}], ["p", "below 1"]),
    ([{"type": "dense", "repeat": 2}], ["'repeat'"]),
    ([{"type": "block", "heads": 2, "hidden": 4, "repeat": 0}], ["repeat", ">= 1"]),
    ([], ["model"]),
    (["dense"], ["model table 1", "a table"]),
])
def test_bad_model_tables_are_refused_naming_the_table(tables, words):
    with pytest.raises(ConfigError) as info:
        build_config({"model": tables, "stages": 1})
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_layers_and_model_together_refused():
    with pytest.raises(ConfigError, match="either layers"):
        build_config({"layers": [64, 10], "model": CONV})


def test_stages_counted_in_expanded_layers():
    with pytest.raises(ConfigError, match="5 stages for 4 layers"):
        build_config({"model": CONV, "stages": 5})


@pytest.mark.parametrize("model,words", [
    ([{"type": "dense", "units": 8}, {"type": "conv2d", "channels": 2, "kernel": 3},
      {"type": "dense"}], ["layer 1 (conv2d)", "(channels, height, width)"]),
    ([{"type": "conv2d", "channels": 2, "kernel": 3}, {"type": "dense"}],
     ["layer 1 (dense)", "flatten"]),
    ([{"type": "conv2d", "channels": 2, "kernel": 9}, {"type": "flatten"}, {"type": "dense"}],
     ["layer 0 (conv2d)", "9x9", "8x8"]),
    ([{"type": "dense", "units": 8}, {"type": "dense", "units": 4}],
     ["layer 1 (dense)", "at least 10"]),
    ([{"type": "dense", "units": 8}, {"type": "dense"}, {"type": "dense", "units": 10}], []),
    ([{"type": "embedding", "dim": 8, "context": 4}, {"type": "dense"}],
     ["layer 0 (embedding)", "tokens"]),
])
def test_model_that_does_not_fit_the_data_is_refused_naming_the_layer(model, words):
    config = build_config({"model": model, "stages": 1})
    if not words:  # an inner dense without units
        with pytest.raises(DataError, match="needs 'units'"):
            check_data(config, prepare(config.data_spec()))
        return
    with pytest.raises(DataError) as info:
        check_data(config, prepare(config.data_spec()))
    message = str(info.value)
    assert "\n" not in message and message.startswith("digits: model layer")
    for word in words:
        assert word in message, message


def test_transformer_shape_errors():
    base = [{"type": "embedding", "dim": 6, "context": 8}]
    for extra, words in [
        ([{"type": "block", "heads": 4, "hidden": 8}, {"type": "dense"}],
         ["layer 1 (block)", "not divisible by 4 heads"]),
        ([{"type": "flatten"}, {"type": "dense"}], ["layer 2 (dense)", "per sample"]),
    ]:
        config = build_config({"model": base + extra, "dataset": "sort", "stages": 1})
        with pytest.raises(DataError) as info:
            check_data(config, prepare(config.data_spec()))
        for word in words:
            assert word in str(info.value), str(info.value)
    short = build_config({"model": [{"type": "embedding", "dim": 6, "context": 7},
                                    {"type": "dense"}], "dataset": "sort", "stages": 1})
    with pytest.raises(DataError, match="even length"):
        prepare(short.data_spec())


def test_shorthand_still_names_features_and_labels():
    with pytest.raises(DataError, match=r"64 features but the first layer expects 32"):
        config = build_config({"layers": [32, 10], "stages": 1})
        check_data(config, prepare(config.data_spec()))
    image_config = TrainConfig(layers=(64, 10))
    assert image_config.model is None and image_config.num_layers == 1


def test_augmenting_tokens_is_refused():
    config = build_config({"dataset": "sort", "augment": True, "stages": 1,
                           "model": [{"type": "embedding", "dim": 4, "context": 4},
                                     {"type": "dense"}]})
    with pytest.raises(DataError, match="augment = false"):
        check_data(config, prepare(config.data_spec()))
