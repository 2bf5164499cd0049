"""pipetrain.nn and pipetrain.pipeline.partition: gradients against finite differences,
bitwise equality of segment chains, optimizer steps, initialisation and the stage partition."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest

from pipetrain.nn import (
    OPTIMIZERS,
    Dense,
    InputSpec,
    Segment,
    make_optimizer,
    resolve,
    shorthand,
    softmax_cross_entropy,
)
from pipetrain.nn import build_segment as build_model_segment
from pipetrain.nn import init_parameters as init_model
from pipetrain.nn.optim import ADAM_BETA1, ADAM_BETA2, ADAM_EPS, MOMENTUM
from pipetrain.pipeline.partition import layer_costs, partition
from tests.nn.gradcheck import TOLERANCE, numeric_grad, rel_error

KINK_MARGIN = 1e-3  # pre-activations closer to 0 than this could flip a ReLU under EPS


def stack(sizes: list[int]):
    """The resolved ``layers = sizes`` shorthand: dense layers, ReLU between them."""
    return resolve(shorthand(tuple(sizes)), InputSpec((sizes[0],), False, 0, sizes[-1]))


def init_parameters(sizes, seed, dtype, first=0, stop=None):
    return init_model(stack(sizes), seed, dtype, first, stop)


def build_segment(params, first, stop, sizes):
    return build_model_segment(stack(sizes), params, first, stop)


def parameter_names(num_layers: int, first: int = 0) -> list[str]:
    return [f"layers.{i}.{name}" for i in range(first, num_layers) for name in ("weight", "bias")]


def random_params(rng: np.random.Generator, sizes: list[int]) -> dict[str, np.ndarray]:
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        params[f"layers.{i}.weight"] = rng.normal(0, 1 / np.sqrt(fan_in), (fan_in, fan_out))
        params[f"layers.{i}.bias"] = rng.normal(0, 0.5, fan_out)
    return params


def relu_inputs(params, x: np.ndarray, num_layers: int, relu_after_last: bool) -> list:
    """Every ReLU input of the stack, computed independently of pipetrain.nn."""
    out = []
    for i in range(num_layers):
        x = x @ params[f"layers.{i}.weight"] + params[f"layers.{i}.bias"]
        if i < num_layers - 1 or relu_after_last:
            out.append(x)
            x = np.maximum(x, 0)
    return out


def kink_free_case(seed: int, sizes: list[int], batch: int, relu_after_last: bool):
    """(params, x) whose ReLU inputs all stay at least KINK_MARGIN away from 0, both signs."""
    num_layers = len(sizes) - 1
    for attempt in range(1000):
        rng = np.random.default_rng([seed, attempt])
        params = random_params(rng, sizes)
        x = rng.normal(0, 1, (batch, sizes[0]))
        pres = relu_inputs(params, x, num_layers, relu_after_last)
        flat = np.concatenate([p.ravel() for p in pres]) if pres else np.zeros(0)
        # Both signs present, so the ReLU really passes some gradients and blocks others.
        mixed = not pres or (flat.min() < 0 < flat.max())
        if mixed and all(np.abs(p).min() > KINK_MARGIN for p in pres):
            return params, x
    raise AssertionError("no kink-free case found")


def make_segment(params, num_layers: int, relu_after_last: bool) -> Segment:
    layers = [
        Dense(i, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"],
              relu=i < num_layers - 1 or relu_after_last)
        for i in range(num_layers)
    ]
    return Segment(layers, needs_input_grad=True)


def check_segment_gradients(sizes, batch, relu_after_last, seed, split_passes=False):
    num_layers = len(sizes) - 1
    params, x = kink_free_case(seed, sizes, batch, relu_after_last)
    segment = make_segment(params, num_layers, relu_after_last)
    probe = np.random.default_rng([seed, 99]).normal(0, 1, (batch, sizes[-1]))

    def scalar() -> float:
        return float((segment.forward(-1, x, keep=False) * probe).sum())

    segment.forward(0, x)
    if split_passes:
        grad_x = segment.backward_input(0, probe)
        segment.backward_weight(0)
    else:
        grad_x = segment.backward(0, probe)
    assert segment.saved == {}, "backward must free the micro-batch state"
    assert grad_x.shape == x.shape
    assert rel_error(grad_x, numeric_grad(scalar, x)) < TOLERANCE
    grads = segment.grads()
    for name in parameter_names(num_layers):
        error = rel_error(grads[name], numeric_grad(scalar, params[name]))
        assert error < TOLERANCE, f"{name}: relative error {error}"


DENSE_SHAPES = [(1, 4, 3), (3, 1, 5), (5, 7, 1), (8, 6, 4)]  # (batch, fan_in, fan_out)


@pytest.mark.parametrize("split_passes", [False, True], ids=["backward", "input+weight"])
@pytest.mark.parametrize("batch,fan_in,fan_out", DENSE_SHAPES)
def test_dense_gradients_match_finite_differences(batch, fan_in, fan_out, split_passes):
    check_segment_gradients([fan_in, fan_out], batch, relu_after_last=False, seed=batch * 100 +
                            fan_in * 10 + fan_out, split_passes=split_passes)


@pytest.mark.parametrize("batch,fan_in,fan_out", DENSE_SHAPES)
def test_relu_inside_segment_gradients_match_finite_differences(batch, fan_in, fan_out):
    check_segment_gradients([fan_in, fan_out], batch, relu_after_last=True, seed=7 + batch)


@pytest.mark.parametrize("sizes", [[5, 7, 6, 3], [4, 8, 8, 8, 2], [3, 2, 4]])
@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("relu_after_last", [False, True])
def test_multilayer_segment_gradients_match_finite_differences(sizes, batch, relu_after_last):
    check_segment_gradients(sizes, batch, relu_after_last, seed=len(sizes) * 10 + batch)


def test_dense_gradients_accumulate_over_microbatches():
    rng = np.random.default_rng(3)
    params = random_params(rng, [4, 3])
    segment = make_segment(params, 1, relu_after_last=False)
    xs = [rng.normal(size=(2, 4)), rng.normal(size=(3, 4))]
    gs = [rng.normal(size=(2, 3)), rng.normal(size=(3, 3))]
    for m, x in enumerate(xs):
        segment.forward(m, x)
    for m, g in enumerate(gs):
        segment.backward(m, g)
    grads = segment.grads()
    np.testing.assert_allclose(grads["layers.0.weight"], xs[0].T @ gs[0] + xs[1].T @ gs[1],
                               rtol=1e-14)
    np.testing.assert_allclose(grads["layers.0.bias"], gs[0].sum(0) + gs[1].sum(0), rtol=1e-14)
    segment.zero_grads()
    assert not segment.grads()["layers.0.weight"].any()


def test_segment_refuses_misuse():
    params = random_params(np.random.default_rng(0), [3, 4, 2])
    segment = make_segment(params, 2, relu_after_last=False)
    x = np.ones((2, 3))
    segment.forward(0, x)
    with pytest.raises(RuntimeError, match="forwarded twice"):
        segment.forward(0, x)
    with pytest.raises(RuntimeError, match="not forwarded"):
        segment.backward(5, np.ones((2, 2)))
    with pytest.raises(RuntimeError, match="before input gradient"):
        segment.backward_weight(0)
    with pytest.raises(ValueError, match="not contiguous"):
        Segment([segment.layers[1], segment.layers[0]])
    with pytest.raises(ValueError):
        Dense(0, np.ones((3, 4)), np.ones(3))


def test_first_segment_computes_no_input_gradient():
    params = init_parameters([5, 4, 3], 0, np.dtype("float64"))
    segment = build_segment(params, 0, 2, [5, 4, 3])
    segment.forward(0, np.ones((2, 5)))
    assert segment.backward(0, np.ones((2, 3))) is None
    assert segment.grads()["layers.0.weight"].any()


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("batch,classes,global_batch", [(1, 3, 1), (4, 5, 4), (8, 10, 20)])
def test_loss_gradient_matches_finite_differences(batch, classes, global_batch):
    rng = np.random.default_rng(batch * classes)
    logits = rng.normal(0, 2, (batch, classes))
    labels = rng.integers(0, classes, batch)
    loss, grad = softmax_cross_entropy(logits, labels, global_batch)

    def scalar() -> float:
        return softmax_cross_entropy(logits, labels, global_batch)[0]

    assert rel_error(grad, numeric_grad(scalar, logits)) < TOLERANCE
    # The value itself: -sum log softmax(true class) / global batch, written out by hand.
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(batch), labels].sum() / global_batch
    assert loss == pytest.approx(expected, rel=1e-12)


def test_loss_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, -1e4], [-1e4, -1e4, -1e4]])
    labels = np.array([0, 1, 2])
    loss, grad = softmax_cross_entropy(logits, labels, 3)
    assert np.isfinite(loss)
    assert np.isfinite(grad).all()
    # row 0: certain and right (0); row 1: a two-way tie (log 2); row 2: a 3-way tie (log 3).
    assert loss == pytest.approx((0 + np.log(2) + np.log(3)) / 3, rel=1e-12)
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-15)
    np.testing.assert_allclose(grad[1], [0.5 / 3, -0.5 / 3, 0], atol=1e-15)
    # Certain and wrong: the loss is the logit gap, not inf.
    loss, grad = softmax_cross_entropy(np.array([[1e4, -1e4]]), np.array([1]), 1)
    assert loss == pytest.approx(2e4, rel=1e-12)
    np.testing.assert_allclose(grad, [[1.0, -1.0]], atol=1e-15)


def test_loss_shift_invariant_and_refuses_bad_shapes():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6))
    labels = np.array([0, 5, 2, 2])
    base = softmax_cross_entropy(logits, labels, 4)
    shifted = softmax_cross_entropy(logits + 1e4, labels, 4)
    assert shifted[0] == pytest.approx(base[0], rel=1e-9)
    np.testing.assert_allclose(shifted[1], base[1], atol=1e-9)
    with pytest.raises(ValueError):
        softmax_cross_entropy(logits, labels[:3], 4)
    with pytest.raises(ValueError):
        softmax_cross_entropy(logits, labels, 3)


# ---------------------------------------------------------------- segment chains, bitwise


@pytest.mark.parametrize("cuts", [[0, 2, 4], [0, 1, 4], [0, 1, 2, 3, 4]])
def test_segment_chain_is_bitwise_equal_to_one_segment(cuts):
    sizes = [9, 16, 12, 7, 5]
    num_layers = 4
    params = init_parameters(sizes, 11, np.dtype("float64"))
    whole = build_segment(params, 0, num_layers, sizes)
    chain = [build_segment(params, a, b, sizes) for a, b in itertools.pairwise(cuts)]
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=(n, sizes[0])) for n in (3, 1, 4)]
    labels = [rng.integers(0, sizes[-1], len(x)) for x in xs]
    global_batch = sum(len(x) for x in xs)

    for m, (x, y) in enumerate(zip(xs, labels, strict=True)):
        out_whole = whole.forward(m, x)
        out_chain = x
        for segment in chain:
            out_chain = segment.forward(m, out_chain)
        assert np.array_equal(out_whole, out_chain)
        loss_whole, grad_whole = softmax_cross_entropy(out_whole, y, global_batch)
        loss_chain, grad_chain = softmax_cross_entropy(out_chain, y, global_batch)
        assert loss_whole == loss_chain
        assert whole.backward(m, grad_whole) is None
        grad = grad_chain
        for segment in reversed(chain):
            grad = segment.backward(m, grad)
        assert grad is None  # the first segment never computes the network-input gradient

    chain_grads: dict[str, np.ndarray] = {}
    for segment in chain:
        chain_grads.update(segment.grads())
    whole_grads = whole.grads()
    assert list(chain_grads) == parameter_names(num_layers) == list(whole_grads)
    for name in whole_grads:
        assert whole_grads[name].any()
        assert np.array_equal(whole_grads[name], chain_grads[name]), name


# ----------------------------------------------------------------------------- optimizers


def _params_and_grads(seed: int):
    rng = np.random.default_rng(seed)
    params = {"layers.0.weight": rng.normal(size=(3, 2)), "layers.0.bias": rng.normal(size=2)}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(3)]
    return params, grads


def _expected(name: str, p0, gs, lr):
    """The textbook updates, written independently of pipetrain.nn.optim."""
    p = p0.copy()
    v = np.zeros_like(p)
    m = np.zeros_like(p)
    s = np.zeros_like(p)
    for t, g in enumerate(gs, start=1):
        if name == "sgd":
            p = p - lr * g
        elif name == "momentum":
            v = 0.9 * v + g
            p = p - lr * v
        else:
            m = 0.9 * m + 0.1 * g
            s = 0.999 * s + 0.001 * g**2
            m_hat = m / (1 - 0.9**t)
            s_hat = s / (1 - 0.999**t)
            p = p - lr * m_hat / (np.sqrt(s_hat) + 1e-8)
    return p


def test_optimizer_constants_are_the_contract():
    assert (MOMENTUM, ADAM_BETA1, ADAM_BETA2, ADAM_EPS) == (0.9, 0.9, 0.999, 1e-8)
    assert set(OPTIMIZERS) == {"sgd", "momentum", "adam"}


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_optimizer_steps_match_hand_formula(name, steps):
    params, grads = _params_and_grads(42)
    start = {k: v.copy() for k, v in params.items()}
    optimizer = make_optimizer(name, params, 0.1)
    arrays = {k: id(v) for k, v in params.items()}
    for g in grads[:steps]:
        optimizer.step(g)
    assert optimizer.step_count == steps
    for key in params:
        assert id(params[key]) == arrays[key], "updates happen in place"
        expected = _expected(name, start[key], [g[key] for g in grads[:steps]], 0.1)
        np.testing.assert_allclose(params[key], expected, rtol=1e-13, atol=1e-15)
        assert not np.array_equal(params[key], start[key])


def test_adam_first_step_is_lr_times_sign():
    # Bias-corrected first step: m_hat / sqrt(v_hat) = g / |g|, so each parameter moves by ~lr.
    params = {"w": np.array([1.0, 1.0, 1.0])}
    optimizer = make_optimizer("adam", params, 0.01)
    optimizer.step({"w": np.array([3.0, -0.5, 1e-3])})
    np.testing.assert_allclose(params["w"], [0.99, 1.01, 0.99], rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_optimizer_state_dict_round_trip(name):
    params_a, grads = _params_and_grads(7)
    params_b = {k: v.copy() for k, v in params_a.items()}
    a = make_optimizer(name, params_a, 0.05)
    a.step(grads[0])
    a.step(grads[1])
    buffer = io.BytesIO()  # the way a checkpoint stores it: npz, no pickle
    np.savez(buffer, **a.state_dict())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as archive:
        state = {key: archive[key] for key in archive.files}
    assert "step_count" in state
    b = make_optimizer(name, params_b, 0.05)
    for key, value in params_a.items():
        params_b[key][...] = value
    b.load_state_dict(state)
    assert b.step_count == 2
    a.step(grads[2])
    b.step(grads[2])
    for key in params_a:
        assert np.array_equal(params_a[key], params_b[key]), key


def test_optimizer_load_state_dict_refuses_missing_or_misshapen_state():
    params, _ = _params_and_grads(1)
    optimizer = make_optimizer("adam", params, 0.1)
    state = {k: v.copy() for k, v in optimizer.state_dict().items()}
    del state["layers.0.weight.m"]
    with pytest.raises(ValueError, match="layers.0.weight.m"):
        optimizer.load_state_dict(state)
    state = {k: v.copy() for k, v in optimizer.state_dict().items()}
    state["layers.0.bias.v"] = np.zeros(5)
    with pytest.raises(ValueError, match="layers.0.bias.v"):
        optimizer.load_state_dict(state)


def test_unknown_optimizer_and_bad_lr_are_refused():
    params, _ = _params_and_grads(0)
    with pytest.raises(ValueError, match="rmsprop"):
        make_optimizer("rmsprop", params, 0.1)
    for lr in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            make_optimizer("sgd", params, lr)


# ------------------------------------------------------------------------ initialisation


SIZES = [64, 128, 64, 32, 10]


def test_init_is_deterministic_and_seed_dependent():
    a = init_parameters(SIZES, 3, np.dtype("float64"))
    b = init_parameters(SIZES, 3, np.dtype("float64"))
    c = init_parameters(SIZES, 4, np.dtype("float64"))
    assert list(a) == parameter_names(4)
    for name in a:
        assert np.array_equal(a[name], b[name])
        assert a[name].flags.c_contiguous
    assert not np.array_equal(a["layers.0.weight"], c["layers.0.weight"])
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(SIZES)):
        assert a[f"layers.{i}.weight"].shape == (fan_in, fan_out)
        assert a[f"layers.{i}.bias"].shape == (fan_out,)
        assert not a[f"layers.{i}.bias"].any()
    # The last layer is Glorot-uniform: bounded by sqrt(6 / (fan_in + fan_out)).
    assert np.abs(a["layers.3.weight"]).max() <= np.sqrt(6 / (32 + 10))


@pytest.mark.parametrize("first,stop", [(2, 4), (0, 1), (1, 3), (3, 4)])
def test_init_depends_on_layer_index_not_segment(first, stop):
    full = init_parameters(SIZES, 9, np.dtype("float64"))
    part = init_parameters(SIZES, 9, np.dtype("float64"), first, stop)
    assert list(part) == parameter_names(stop, first)
    for name, value in part.items():
        assert np.array_equal(value, full[name]), name


def test_init_float32():
    params = init_parameters(SIZES, 0, np.dtype("float32"))
    assert {value.dtype for value in params.values()} == {np.dtype("float32")}
    full64 = init_parameters(SIZES, 0, np.dtype("float64"))
    np.testing.assert_array_equal(params["layers.1.weight"],
                                  full64["layers.1.weight"].astype(np.float32))


# ----------------------------------------------------------------------------- partition


def brute_force_best(costs: list[float], stages: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("stages", [1, 2, 3, 5])
def test_partition_is_contiguous_covering_and_optimal(seed, stages):
    rng = np.random.default_rng(seed)
    costs = [int(c) for c in rng.integers(1, 100, 7)]
    parts = partition(costs, stages)
    assert len(parts) == stages
    assert parts[0][0] == 0 and parts[-1][1] == len(costs)
    for (a, b), (c, _) in itertools.pairwise(parts):
        assert a < b == c
    assert all(a < b for a, b in parts)
    worst = max(sum(costs[a:b]) for a, b in parts)
    assert worst == brute_force_best(costs, stages)
    assert partition(costs, stages) == parts  # a pure function of the costs


def test_partition_balances_equal_costs_and_real_layers():
    assert partition([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert partition([1, 1, 1, 1], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert partition([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert layer_costs([64, 128, 10]) == [64 * 128 + 128, 128 * 10 + 10]


@pytest.mark.parametrize("stages", [0, 5, -1])
def test_partition_refuses_impossible_stage_counts(stages):
    with pytest.raises(ValueError, match="stages"):
        partition([1, 2, 3, 4], stages)


def test_full_backward_equals_input_then_weight_pass_and_reports_final_layers():
    """The full backward interleaves each layer's weight gradient with its input gradient and
    reports the layer as done, last first; the bits are those of the split I/W passes."""
    sizes = [9, 16, 12, 7, 5]
    params = init_parameters(sizes, 3, np.dtype("float32"))
    whole = build_segment(params, 0, 4, sizes)
    split = build_segment({k: v.copy() for k, v in params.items()}, 0, 4, sizes)
    rng = np.random.default_rng(8)
    reported: list[tuple[int, dict[str, np.ndarray]]] = []
    for m in range(3):
        x = rng.normal(size=(5, sizes[0])).astype(np.float32)
        g = rng.normal(size=(5, sizes[-1])).astype(np.float32)
        whole.forward(m, x)
        split.forward(m, x)
        hook = (lambda layer: reported.append(
            (layer.index, {k: v.copy() for k, v in layer.grads().items()}))) if m == 2 else None
        assert whole.backward(m, g, on_layer_done=hook) is None
        assert split.backward_input(m, g) is None
        split.backward_weight(m)
    assert [index for index, _ in reported] == [3, 2, 1, 0]
    whole_grads, split_grads = whole.grads(), split.grads()
    for name in whole_grads:
        assert np.array_equal(whole_grads[name], split_grads[name]), name
    for _, grads in reported:  # what a layer held when reported is its final gradient
        for name, value in grads.items():
            assert np.array_equal(value, whole_grads[name]), name
    assert not whole.saved and not split.saved
