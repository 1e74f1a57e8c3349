"""Qwen3 sparse MoE block: softmax router, top-k experts, no shared expert.

Experts are stacked into one [E, out, in] tensor per projection and applied with
`mx.gather_mm` / `mx.gather_qmm`, so no Python loop runs over experts.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

# Below this many (token, expert) pairs, sorting costs more than it saves.
SORT_THRESHOLD = 64


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one fused kernel (decode is launch-bound on a GPU)."""
    return nn.silu(gate) * up


@partial(mx.compile, shapeless=True)
def combine_experts(y: mx.array, scores: mx.array) -> mx.array:
    """Weighted sum of the k expert outputs [..., k, H] -> [..., H], fused."""
    return (y * scores[..., None]).sum(axis=-2).astype(y.dtype)


class SwitchLinear(nn.Module):
    """A bank of `num_experts` linear layers (no bias), indexed per token."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(
            x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedSwitchLinear.from_float(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """The affine-quantized twin of SwitchLinear (weight, scales, biases per expert)."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((num_experts, output_dims, input_dims))
        self.weight, self.scales, self.biases = mx.quantize(w, group_size, bits, mode=mode)
        self.freeze()

    @classmethod
    def from_float(
        cls, layer: SwitchLinear, group_size: int, bits: int, mode: str = "affine"
    ) -> QuantizedSwitchLinear:
        e, out_dims, in_dims = layer.weight.shape
        q = cls(in_dims, out_dims, e, group_size, bits, mode)
        q.weight, q.scales, q.biases = mx.quantize(layer.weight, group_size, bits, mode=mode)
        return q

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.biases,
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


def _sort_by_expert(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Lay (token, expert) pairs out grouped by expert so each expert's weights are read once."""
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    inverse = mx.argsort(order)
    x = x.reshape(-1, 1, x.shape[-1])[order // k]
    return x, flat[order], inverse


class SwitchGLU(nn.Module):
    """SwiGLU experts: down(silu(gate(x)) * up(x)) for each selected expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x: [..., H], indices: [..., k] -> [..., k, H]."""
        lead, k = indices.shape[:-1], indices.shape[-1]
        do_sort = indices.size >= SORT_THRESHOLD
        if do_sort:
            x, idx, inverse = _sort_by_expert(x, indices)
        else:
            x, idx = mx.expand_dims(x, (-2, -3)), indices
        h = swiglu(self.gate_proj(x, idx, do_sort), self.up_proj(x, idx, do_sort))
        y = self.down_proj(h, idx, do_sort)
        if do_sort:
            y = y[inverse].reshape(*lead, k, y.shape[-1])
        else:
            y = y.squeeze(-2)
        return y


class SparseMoeBlock(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(
            config.hidden_size, config.moe_intermediate_size, config.num_experts
        )

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Top-k expert indices and their (optionally renormalised) softmax weights."""
        # precise=True: the softmax accumulates in float32 whatever the compute dtype.
        probs = mx.softmax(self.gate(x), axis=-1, precise=True)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(probs, kth=-k, axis=-1)[..., -k:])
        scores = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return indices, scores

    def __call__(self, x: mx.array) -> mx.array:
        indices, scores = self.route(x)
        return combine_experts(self.switch_mlp(x, indices), scores)
