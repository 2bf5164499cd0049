"""Every layer type against finite differences (float64, relative error < 1e-6), through the
segment's full backward and through its split input/weight passes, on several shapes and a
batch of one; plus the properties the pipeline relies on (dropout masks, causality)."""

from __future__ import annotations

import numpy as np
import pytest

from pipetrain.nn import Context, InputSpec, LayerSpec, build_segment, resolve
from pipetrain.nn.basic import dropout_keep
from pipetrain.nn.init import init_parameters
from tests.nn.gradcheck import TOLERANCE, numeric_grad, rel_error


def spec(kind: str, **options) -> LayerSpec:
    return LayerSpec(kind, tuple(options.items()))


def float_input(shape, classes=2, labels=()) -> InputSpec:
    return InputSpec(shape=shape, tokens=False, vocab=0, classes=classes, label_shape=labels)


def token_input(length, vocab) -> InputSpec:
    return InputSpec(shape=(length,), tokens=True, vocab=vocab, classes=vocab,
                     label_shape=(length,))


def check(specs, data: InputSpec, batch: int, seed: int, *, split: bool):
    resolved = resolve(tuple(specs), data)
    rng = np.random.default_rng(seed)
    params = init_parameters(resolved, seed, np.dtype("float64"))
    for value in params.values():  # away from the initial zeros and ones: every term matters
        value += rng.normal(0, 0.3, value.shape)
    segment = build_segment(resolved, params, 0, len(resolved))
    segment.needs_input_grad = not data.tokens
    if data.tokens:
        x = rng.integers(0, data.vocab, (batch, *data.shape))
    else:
        x = rng.normal(0, 1, (batch, *data.shape))
    context = Context(seed=seed, step=3, positions=np.arange(batch) * 2 + 1)
    probe = rng.normal(0, 1, (batch, *resolved[-1].out_shape))

    def scalar() -> float:
        return float((segment.forward(-1, x, keep=False, context=context) * probe).sum())

    segment.forward(0, x, context=context)
    if split:
        grad_x = segment.backward_input(0, probe)
        segment.backward_weight(0)
    else:
        grad_x = segment.backward(0, probe)
    assert segment.saved == {}
    if not data.tokens:
        assert grad_x.shape == x.shape and grad_x.flags.c_contiguous
        error = rel_error(grad_x, numeric_grad(scalar, x))
        assert error < TOLERANCE, f"input: relative error {error}"
    grads = segment.grads()
    assert list(grads) == list(params)
    for name, value in params.items():
        error = rel_error(grads[name], numeric_grad(scalar, value))
        assert error < TOLERANCE, f"{name}: relative error {error}"


CASES = {
    "dense": [([spec("dense", units=4)], float_input((5,)), 3),
              ([spec("dense", units=2)], float_input((3,)), 1),
              ([spec("dense", units=3)], float_input((4, 6), labels=(4,)), 2)],
    "relu": [([spec("dense", units=6), spec("relu"), spec("dense", units=3)],
              float_input((4,)), 4),
             ([spec("relu"), spec("dense", units=2)], float_input((3,)), 1)],
    "gelu": [([spec("dense", units=6), spec("gelu"), spec("dense", units=3)],
              float_input((4,)), 3),
             ([spec("gelu"), spec("dense", units=2)], float_input((5, 3), labels=(5,)), 1)],
    "conv2d": [([spec("conv2d", channels=3, kernel=3), spec("flatten"), spec("dense")],
                float_input((2, 5, 5)), 2),
               ([spec("conv2d", channels=2, kernel=3, stride=2, padding=1), spec("flatten"),
                 spec("dense")], float_input((1, 6, 7)), 1),
               ([spec("conv2d", channels=4, kernel=1), spec("flatten"), spec("dense")],
                float_input((3, 2, 2)), 3)],
    "maxpool2d": [([spec("maxpool2d", size=2), spec("flatten"), spec("dense")],
                   float_input((2, 4, 4)), 2),
                  ([spec("maxpool2d", size=3, stride=1), spec("flatten"), spec("dense")],
                   float_input((1, 5, 4)), 1)],
    "avgpool2d": [([spec("avgpool2d", size=2), spec("flatten"), spec("dense")],
                   float_input((2, 4, 5)), 2),
                  ([spec("avgpool2d", size=3, stride=2), spec("flatten"), spec("dense")],
                   float_input((1, 7, 7)), 1)],
    "flatten": [([spec("flatten"), spec("dense")], float_input((2, 3, 2)), 2)],
    "layernorm": [([spec("layernorm"), spec("dense")], float_input((6,)), 3),
                  ([spec("layernorm"), spec("dense")], float_input((3, 4), labels=(3,)), 1)],
    "dropout": [([spec("dense", units=8), spec("dropout", p=0.5), spec("dense")],
                 float_input((4,)), 4),
                ([spec("dropout", p=0.25), spec("dense")], float_input((3, 5), labels=(3,)), 1)],
    "embedding": [([spec("embedding", dim=4, context=6), spec("dense")], token_input(5, 7), 3),
                  ([spec("embedding", dim=3, context=3), spec("dense")], token_input(3, 4), 1)],
    "block": [([spec("block", heads=2, hidden=12), spec("dense")],
               float_input((5, 4), labels=(5,)), 2),
              ([spec("block", heads=1, hidden=4), spec("dense")],
               float_input((3, 6), labels=(3,)), 1),
              ([spec("embedding", dim=6, context=4), spec("block", heads=3, hidden=8),
                spec("block", heads=2, hidden=5), spec("layernorm"), spec("dense")],
               token_input(4, 5), 2)],
}
PARAMS = [pytest.param(specs, data, batch, id=f"{kind}-{n}")
          for kind, cases in CASES.items() for n, (specs, data, batch) in enumerate(cases)]


@pytest.mark.parametrize("split", [False, True], ids=["full", "split"])
@pytest.mark.parametrize("specs,data,batch", PARAMS)
def test_gradients_match_finite_differences(specs, data, batch, split):
    check(specs, data, batch, seed=len(specs) * 7 + batch, split=split)


def test_every_layer_type_is_checked():
    from pipetrain.nn.model import LAYER_KEYS

    assert set(CASES) == set(LAYER_KEYS)


def test_attention_is_causal():
    """Changing a later position changes no earlier output."""
    resolved = resolve((spec("block", heads=2, hidden=8),),
                       float_input((6, 4), classes=4, labels=(6,)))
    params = init_parameters(resolved, 0, np.dtype("float64"))
    segment = build_segment(resolved, params, 0, 1)
    x = np.random.default_rng(1).normal(0, 1, (2, 6, 4))
    before = segment.forward(-1, x, keep=False)
    x[:, 4] += 1.0
    after = segment.forward(-1, x, keep=False)
    assert np.array_equal(before[:, :4], after[:, :4])
    assert not np.allclose(before[:, 4:], after[:, 4:])


def test_dropout_mask_depends_on_sample_position_not_on_grouping():
    whole = dropout_keep(5, 7, 2, np.arange(10), (3, 4), 0.5)
    parts = np.concatenate([dropout_keep(5, 7, 2, np.arange(0, 4), (3, 4), 0.5),
                            dropout_keep(5, 7, 2, np.arange(4, 10), (3, 4), 0.5)])
    assert np.array_equal(whole, parts)
    assert 0.4 < whole.mean() < 0.6
    for other in ((6, 7, 2), (5, 8, 2), (5, 7, 3)):  # seed, step and layer all matter
        assert not np.array_equal(whole, dropout_keep(*other, np.arange(10), (3, 4), 0.5))


def test_dropout_is_identity_at_evaluation_and_scales_in_training():
    resolved = resolve((spec("dropout", p=0.5), spec("dense", units=3)), float_input((200,)))
    params = init_parameters(resolved, 0, np.dtype("float64"))
    layer = build_segment(resolved, params, 0, 2).layers[0]
    x = np.ones((2, 200))
    assert np.array_equal(layer.forward(x, None)[0], x)
    y, _ = layer.forward(x, Context(seed=0, step=1, positions=np.arange(2)))
    assert set(np.unique(y)) == {0.0, 2.0}


def test_block_forward_is_the_contract_math():
    """An independent, loop-by-loop reading of the contract's block (pre-LN, causal heads)."""
    resolved = resolve((spec("block", heads=2, hidden=6),),
                       float_input((5, 4), classes=4, labels=(5,)))
    rng = np.random.default_rng(3)
    params = init_parameters(resolved, 0, np.dtype("float64"))
    for value in params.values():
        value += rng.normal(0, 0.5, value.shape)
    p = {name.split(".", 2)[2]: value for name, value in params.items()}
    x = rng.normal(0, 1, (1, 5, 4))

    def ln(v, w, b):
        return (v - v.mean()) / np.sqrt(v.var() + 1e-5) * w + b

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    rows = x[0]
    a = np.array([ln(r, p["ln1.weight"], p["ln1.bias"]) for r in rows])
    qkv = a @ p["attn.qkv.weight"] + p["attn.qkv.bias"]
    heads = []
    for j in range(2):
        q, k, v = (qkv[:, block * 4 + j * 2: block * 4 + (j + 1) * 2] for block in range(3))
        out = np.zeros((5, 2))
        for t in range(5):
            scores = np.array([q[t] @ k[s] / np.sqrt(2) for s in range(t + 1)])
            weights = np.exp(scores - scores.max())
            out[t] = (weights / weights.sum()) @ v[: t + 1]
        heads.append(out)
    h = rows + np.concatenate(heads, axis=1) @ p["attn.proj.weight"] + p["attn.proj.bias"]
    c = np.array([ln(r, p["ln2.weight"], p["ln2.bias"]) for r in h])
    expected = h + gelu(c @ p["mlp.fc.weight"] + p["mlp.fc.bias"]) @ p["mlp.proj.weight"] \
        + p["mlp.proj.bias"]
    got = build_segment(resolved, params, 0, 1).forward(-1, x, keep=False)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_conv2d_is_cross_correlation_with_zero_padding():
    resolved = resolve((spec("conv2d", channels=2, kernel=3, stride=2, padding=1),
                        spec("flatten"), spec("dense")), float_input((2, 5, 4)))
    rng = np.random.default_rng(4)
    params = init_parameters(resolved, 0, np.dtype("float64"))
    weight, bias = params["layers.0.weight"], params["layers.0.bias"]
    bias += rng.normal(0, 1, bias.shape)
    x = rng.normal(0, 1, (1, 2, 5, 4))
    padded = np.pad(x[0], ((0, 0), (1, 1), (1, 1)))
    expected = np.zeros((2, 3, 2))
    for f in range(2):
        for i in range(3):
            for j in range(2):
                patch = padded[:, 2 * i: 2 * i + 3, 2 * j: 2 * j + 3]
                expected[f, i, j] = (patch * weight[f]).sum() + bias[f]
    got = build_segment(resolved, params, 0, 1).forward(-1, x, keep=False)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
