"""A model as data: its layers' specs, checked against the data's shape, and built.

:func:`resolve` walks the layer specs with the per-sample input shape of the data and returns,
for every layer, its input and output shapes and its parameters' shapes (canonical order),
or raises :class:`ModelError` naming the layer and what to change. Everything else (names,
initialisation, costs for the partition, building the layer objects) reads the resolved list,
so a pipeline stage and the single-process reference build the same layers from the same spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipetrain.nn.basic import GELU, Dense, Dropout, Flatten, LayerNorm, ReLU
from pipetrain.nn.conv import AvgPool2d, Conv2d, MaxPool2d, output_size
from pipetrain.nn.layer import Layer
from pipetrain.nn.transformer import BLOCK_PARAMETERS, Block, Embedding

# type -> (required keys, optional keys with defaults); `repeat` (blocks) is expanded earlier.
LAYER_KEYS: dict[str, tuple[tuple[str, ...], dict[str, object]]] = {
    "dense": ((), {"units": None}),
    "relu": ((), {}),
    "gelu": ((), {}),
    "conv2d": (("channels", "kernel"), {"stride": 1, "padding": 0}),
    "maxpool2d": (("size",), {"stride": None}),
    "avgpool2d": (("size",), {"stride": None}),
    "flatten": ((), {}),
    "layernorm": ((), {}),
    "dropout": (("p",), {}),
    "embedding": (("dim", "context"), {}),
    "block": (("heads", "hidden"), {}),
}


class ModelError(ValueError):
    """A model that does not fit its data or itself; the message names the layer and the fix."""


@dataclass(frozen=True)
class LayerSpec:
    type: str
    options: tuple[tuple[str, object], ...] = ()
    relu: bool = False  # the `layers = [...]` shorthand: a dense layer with its ReLU fused in

    def get(self, key: str) -> object:
        defaults = LAYER_KEYS[self.type][1]
        return dict(self.options).get(key, defaults.get(key))

    def to_json(self) -> dict[str, object]:
        return {"type": self.type, **dict(self.options)}


@dataclass(frozen=True)
class InputSpec:
    """What the model needs to know of its data: one sample's shape and what it holds."""

    shape: tuple[int, ...]  # one sample's input, e.g. (64,), (1, 8, 8) or (T,) tokens
    tokens: bool  # integer token ids (for an embedding) rather than real numbers
    vocab: int  # distinct input tokens (0 when not tokens)
    classes: int  # distinct labels
    label_shape: tuple[int, ...] = ()  # () one label per sample, (T,) one per position


@dataclass(frozen=True)
class ResolvedLayer:
    index: int
    spec: LayerSpec
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"layer {self.index} ({self.spec.type})"

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for shape in self.param_shapes.values())


def shorthand(sizes: tuple[int, ...]) -> tuple[LayerSpec, ...]:
    """``layers = [64, 128, 10]``: dense layers with a ReLU after every one but the last."""
    last = len(sizes) - 2
    return tuple(LayerSpec("dense", (("units", units),), relu=index < last)
                 for index, units in enumerate(sizes[1:]))


def resolve(specs: tuple[LayerSpec, ...], data: InputSpec) -> list[ResolvedLayer]:
    if not specs:
        raise ModelError("the model has no layers")
    shape = data.shape
    resolved = []
    for index, spec in enumerate(specs):
        layer = _resolve_one(index, spec, shape, data, last=index == len(specs) - 1)
        resolved.append(layer)
        shape = layer.out_shape
    _check_output(resolved[-1], data)
    return resolved


def _resolve_one(index: int, spec: LayerSpec, shape: tuple[int, ...], data: InputSpec,
                 last: bool) -> ResolvedLayer:
    where = f"layer {index} ({spec.type})"
    kind = spec.type
    if data.tokens and index == 0 and kind != "embedding":
        raise ModelError(f"{where}: the data are integer tokens {shape}; start the model with "
                         "an embedding layer")
    if kind == "embedding":
        if index != 0 or not data.tokens:
            raise ModelError(f"{where}: an embedding takes integer tokens and must be the first "
                             "layer (the data are not tokens, or it comes after another layer)")
        dim, context = spec.get("dim"), spec.get("context")
        if shape[0] > context:
            raise ModelError(f"{where}: the data have {shape[0]} tokens per sample but the "
                             f"context is {context}; raise context to {shape[0]}")
        return ResolvedLayer(index, spec, shape, (shape[0], dim),
                             {"tokens": (data.vocab, dim), "positions": (context, dim)})
    if kind == "dense":
        if len(shape) == 3:
            raise ModelError(f"{where}: the input is an image {shape} (channels, height, width); "
                             "put a flatten layer before it")
        units = spec.get("units")
        if units is None:
            if not last:
                raise ModelError(f"{where}: needs 'units' (only the last layer may leave it out "
                                 "to get one output per class)")
            units = data.classes
        return ResolvedLayer(index, spec, shape, (*shape[:-1], units),
                             {"weight": (shape[-1], units), "bias": (units,)})
    if kind in ("relu", "gelu", "dropout"):
        return ResolvedLayer(index, spec, shape, shape)
    if kind == "layernorm":
        return ResolvedLayer(index, spec, shape, shape,
                             {"weight": (shape[-1],), "bias": (shape[-1],)})
    if kind == "flatten":
        return ResolvedLayer(index, spec, shape, (math.prod(shape),))
    if kind in ("conv2d", "maxpool2d", "avgpool2d"):
        return _resolve_spatial(index, spec, shape, where)
    if kind == "block":
        if len(shape) != 2:
            raise ModelError(f"{where}: needs a sequence (T, d) input, got {shape}; put an "
                             "embedding before it")
        width, heads, hidden = shape[1], spec.get("heads"), spec.get("hidden")
        if width % heads:
            raise ModelError(f"{where}: width {width} is not divisible by {heads} heads; choose "
                             f"heads dividing {width}")
        shapes = dict(zip(BLOCK_PARAMETERS, [
            (width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,),
            (width,), (width,), (width, hidden), (hidden,), (hidden, width), (width,)],
            strict=True))
        return ResolvedLayer(index, spec, shape, shape, shapes)
    raise ModelError(f"{where}: unknown layer type (choose from {', '.join(LAYER_KEYS)})")


def _resolve_spatial(index: int, spec: LayerSpec, shape: tuple[int, ...],
                     where: str) -> ResolvedLayer:
    if len(shape) != 3:
        raise ModelError(f"{where}: needs (channels, height, width) input, got {shape} (image "
                         "data are (C, H, W); the digits are 1x8x8 when the model starts with "
                         "conv2d)")
    channels, height, width = shape
    if spec.type == "conv2d":
        kernel, stride, pad = spec.get("kernel"), spec.get("stride"), spec.get("padding")
    else:
        kernel, pad = spec.get("size"), 0
        stride = spec.get("stride") or kernel
    out_h, out_w = (output_size(height, kernel, stride, pad),
                    output_size(width, kernel, stride, pad))
    if out_h < 1 or out_w < 1:
        raise ModelError(f"{where}: a {kernel}x{kernel} window does not fit the "
                         f"{height + 2 * pad}x{width + 2 * pad} input; use a smaller kernel or "
                         "size, or more padding")
    if spec.type != "conv2d":
        return ResolvedLayer(index, spec, shape, (channels, out_h, out_w))
    filters = spec.get("channels")
    return ResolvedLayer(index, spec, shape, (filters, out_h, out_w),
                         {"weight": (filters, channels, kernel, kernel), "bias": (filters,)})


def _check_output(last: ResolvedLayer, data: InputSpec) -> None:
    out = last.out_shape
    if data.label_shape == () and len(out) != 1:
        raise ModelError(f"{last.name}: the model ends with {out} per sample but there is one "
                         "label per sample; end with flatten and dense")
    if data.label_shape and out[:-1] != data.label_shape:
        raise ModelError(f"{last.name}: the model ends with {out} per sample but the labels "
                         f"are {data.label_shape} per sample; end with a dense layer on the "
                         "sequence")
    if out[-1] < data.classes:
        raise ModelError(f"{last.name}: {out[-1]} outputs but the labels go up to "
                         f"{data.classes - 1}; give it at least {data.classes} units (or leave "
                         "units out)")


def parameter_names(resolved: list[ResolvedLayer], first: int = 0,
                    stop: int | None = None) -> list[str]:
    """Global names of the parameters of layers ``[first, stop)`` in canonical order (layer
    index ascending, then the contract's order inside a layer): the order of checkpoints,
    gradient digests and parameter transfers."""
    return [f"layers.{layer.index}.{name}" for layer in resolved[first:stop]
            for name in layer.param_shapes]


def build_layer(layer: ResolvedLayer, params: dict[str, np.ndarray]) -> Layer:
    """The layer object of ``layer`` over the (shared, not copied) arrays ``params`` (global
    names)."""
    own = {name: params[f"layers.{layer.index}.{name}"] for name in layer.param_shapes}
    spec, index = layer.spec, layer.index
    match spec.type:
        case "dense":
            return Dense(index, own["weight"], own["bias"], relu=spec.relu)
        case "relu":
            return ReLU(index)
        case "gelu":
            return GELU(index)
        case "flatten":
            return Flatten(index)
        case "layernorm":
            return LayerNorm(index, own["weight"], own["bias"])
        case "dropout":
            return Dropout(index, float(spec.get("p")))
        case "conv2d":
            return Conv2d(index, own["weight"], own["bias"], stride=spec.get("stride"),
                          padding=spec.get("padding"))
        case "maxpool2d":
            return MaxPool2d(index, spec.get("size"), spec.get("stride"))
        case "avgpool2d":
            return AvgPool2d(index, spec.get("size"), spec.get("stride"))
        case "embedding":
            return Embedding(index, own["tokens"], own["positions"])
        case "block":
            return Block(index, own, spec.get("heads"))
    raise ModelError(f"{layer.name}: unknown layer type")
