"""Token + position embedding and the pre-LayerNorm causal transformer block.

The block (one layer of the model, never cut between stages)::

    h = x + attn(ln1(x))          attn: q, k, v = column blocks of ln1(x) @ qkv.weight + bias;
    y = h + mlp(ln2(h))                 per head softmax(q k^T / sqrt(dh), causal) @ v, heads
                                        concatenated, @ proj.weight + proj.bias
                                  mlp:  gelu(z @ fc.weight + fc.bias) @ proj.weight + proj.bias

Attention runs on (N, heads, T, dh) stacks: every head and every sample is one batched matrix
product, and the causal mask is an additive -inf matrix, so no Python loop touches a position.
The input-gradient pass keeps, for each of the block's six parameterised pieces, the pair (its
input, its output gradient); the weight pass turns those pairs into parameter gradients.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipetrain.nn.basic import (
    gelu_backward,
    gelu_forward,
    layernorm_forward,
    layernorm_input_grad,
    layernorm_weight_grad,
)
from pipetrain.nn.layer import Context, Layer, linear, linear_input_grad, linear_weight_grad

BLOCK_PARAMETERS = (
    "ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
    "attn.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc.weight", "mlp.fc.bias",
    "mlp.proj.weight", "mlp.proj.bias",
)


class Embedding(Layer):
    """``tokens[x] + positions[:T]`` for integer tokens x of shape (N, T)."""

    type = "embedding"

    def __init__(self, index: int, tokens: np.ndarray, positions: np.ndarray) -> None:
        super().__init__(index, {"tokens": tokens, "positions": positions})

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        vocab, context_len = len(self.params["tokens"]), len(self.params["positions"])
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"layer {self.index}: expects integer tokens (N, T), got "
                             f"{x.dtype} {x.shape}")
        if x.shape[1] > context_len:
            raise ValueError(f"layer {self.index}: {x.shape[1]} tokens exceed the context "
                             f"of {context_len}")
        if x.size and (x.min() < 0 or x.max() >= vocab):
            raise ValueError(f"layer {self.index}: a token is outside 0..{vocab - 1}")
        y = self.params["tokens"][x]
        y += self.params["positions"][: x.shape[1]]
        return y, x

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        return None, (cache, grad_y)  # tokens have no gradient

    def backward_weight(self, weight_cache: Any) -> None:
        tokens, grad_y = weight_cache
        # np.add.at adds row by row in index order: repeated tokens sum in one fixed order.
        np.add.at(self.grad["tokens"], tokens.ravel(), grad_y.reshape(-1, grad_y.shape[-1]))
        self.grad["positions"][: tokens.shape[1]] += grad_y.sum(axis=0)


def causal_bias(length: int, dtype: np.dtype) -> np.ndarray:
    """0 on and below the diagonal, -inf above: added to the scores before the softmax."""
    return np.triu(np.full((length, length), -np.inf, dtype=dtype), k=1)


def attention_forward(qkv: np.ndarray, heads: int) -> tuple[np.ndarray, Any]:
    """Causal multi-head attention of (N, T, 3d) projections: ((N, T, d), cache)."""
    n, length, width3 = qkv.shape
    width = width3 // 3
    head_width = width // heads
    # (3, N, heads, T, dh): column block b, head j is qkv[..., b*d + j*dh : b*d + (j+1)*dh]
    q, k, v = np.ascontiguousarray(
        qkv.reshape(n, length, 3, heads, head_width).transpose(2, 0, 3, 1, 4))
    scale = 1 / math.sqrt(head_width)
    scores = q @ k.transpose(0, 1, 3, 2)
    scores *= scores.dtype.type(scale)
    scores += causal_bias(length, scores.dtype)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = (scores @ v).transpose(0, 2, 1, 3).reshape(n, length, width)
    return out, (q, k, v, scores)


def attention_backward(grad_out: np.ndarray, cache: Any) -> np.ndarray:
    """The gradient w.r.t. the (N, T, 3d) projections."""
    q, k, v, probs = cache
    n, heads, length, head_width = q.shape
    grad_heads = np.ascontiguousarray(
        grad_out.reshape(n, length, heads, head_width).transpose(0, 2, 1, 3))
    grad_probs = grad_heads @ v.transpose(0, 1, 3, 2)
    grad_v = probs.transpose(0, 1, 3, 2) @ grad_heads
    # softmax backward; masked entries have probability 0, so their gradient is 0 too
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(axis=-1, keepdims=True))
    grad_scores *= grad_scores.dtype.type(1 / math.sqrt(head_width))
    # (N, T, 3, heads, dh) is the layout of the qkv columns: each gradient is copied once
    grad_qkv = np.empty((n, length, 3, heads, head_width), dtype=grad_v.dtype)
    grad_qkv[:, :, 0] = (grad_scores @ k).transpose(0, 2, 1, 3)
    grad_qkv[:, :, 1] = (grad_scores.transpose(0, 1, 3, 2) @ q).transpose(0, 2, 1, 3)
    grad_qkv[:, :, 2] = grad_v.transpose(0, 2, 1, 3)
    return grad_qkv.reshape(n, length, 3 * heads * head_width)


class Block(Layer):
    """Pre-LayerNorm causal transformer block, parameters named as in ``BLOCK_PARAMETERS``."""

    type = "block"

    def __init__(self, index: int, params: dict[str, np.ndarray], heads: int) -> None:
        super().__init__(index, {name: params[name] for name in BLOCK_PARAMETERS})
        width = self.params["ln1.weight"].shape[0]
        if width % heads:
            raise ValueError(f"layer {index}: width {width} is not a multiple of {heads} heads")
        self.heads = heads

    def forward(self, x: np.ndarray, context: Context | None) -> tuple[np.ndarray, Any]:
        p = self.params
        a, x_hat1, inv_std1 = layernorm_forward(x, p["ln1.weight"], p["ln1.bias"])
        qkv, a_rows = linear(a, p["attn.qkv.weight"], p["attn.qkv.bias"])
        mixed, attn_cache = attention_forward(qkv, self.heads)
        attn_out, mixed_rows = linear(mixed, p["attn.proj.weight"], p["attn.proj.bias"])
        h = x + attn_out
        c, x_hat2, inv_std2 = layernorm_forward(h, p["ln2.weight"], p["ln2.bias"])
        f, c_rows = linear(c, p["mlp.fc.weight"], p["mlp.fc.bias"])
        g, t = gelu_forward(f)
        m, g_rows = linear(g, p["mlp.proj.weight"], p["mlp.proj.bias"])
        y = h + m
        cache = (x.shape, x_hat1, inv_std1, a_rows, attn_cache, mixed_rows, x_hat2, inv_std2,
                 c_rows, f, t, g_rows)
        return y, cache

    def backward_input(self, cache: Any, grad_y: np.ndarray,
                       need_input_grad: bool) -> tuple[np.ndarray | None, Any]:
        p = self.params
        (shape, x_hat1, inv_std1, a_rows, attn_cache, mixed_rows, x_hat2, inv_std2, c_rows,
         f, t, g_rows) = cache
        grad_g, grad_m_rows = linear_input_grad(grad_y, p["mlp.proj.weight"], f.shape)
        grad_f = gelu_backward(f, t, grad_g)
        grad_c, grad_f_rows = linear_input_grad(grad_f, p["mlp.fc.weight"], shape)
        grad_h = grad_y + layernorm_input_grad(grad_c, x_hat2, inv_std2, p["ln2.weight"])
        grad_mixed, grad_h_rows = linear_input_grad(grad_h, p["attn.proj.weight"], shape)
        grad_qkv = attention_backward(grad_mixed, attn_cache)
        grad_a, grad_qkv_rows = linear_input_grad(grad_qkv, p["attn.qkv.weight"], shape)
        grad_x = None
        if need_input_grad:
            grad_x = grad_h + layernorm_input_grad(grad_a, x_hat1, inv_std1, p["ln1.weight"])
        weight_cache = (x_hat1, grad_a, a_rows, grad_qkv_rows, mixed_rows, grad_h_rows, x_hat2,
                        grad_c, c_rows, grad_f_rows, g_rows, grad_m_rows)
        return grad_x, weight_cache

    def backward_weight(self, weight_cache: Any) -> None:
        (x_hat1, grad_a, a_rows, grad_qkv_rows, mixed_rows, grad_h_rows, x_hat2, grad_c, c_rows,
         grad_f_rows, g_rows, grad_m_rows) = weight_cache
        g = self.grad
        layernorm_weight_grad(x_hat1, grad_a, g["ln1.weight"], g["ln1.bias"])
        linear_weight_grad(a_rows, grad_qkv_rows, g["attn.qkv.weight"], g["attn.qkv.bias"])
        linear_weight_grad(mixed_rows, grad_h_rows, g["attn.proj.weight"], g["attn.proj.bias"])
        layernorm_weight_grad(x_hat2, grad_c, g["ln2.weight"], g["ln2.bias"])
        linear_weight_grad(c_rows, grad_f_rows, g["mlp.fc.weight"], g["mlp.fc.bias"])
        linear_weight_grad(g_rows, grad_m_rows, g["mlp.proj.weight"], g["mlp.proj.bias"])
