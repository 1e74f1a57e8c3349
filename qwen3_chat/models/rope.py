"""Rotary position embeddings: plain RoPE, or YaRN when `rope_scaling` asks for it."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn


class RoPE(nn.Module):
    """Non-interleaved RoPE (Qwen's rotate-half layout) via the fused kernel.

    `freqs` are per-pair periods (1 / inv_freq); `mscale` multiplies the rotated q and k,
    which is how YaRN sharpens attention at long range.
    """

    def __init__(self, dims: int, base: float, freqs: mx.array | None = None, mscale: float = 1.0):
        super().__init__()
        self.dims = dims
        self.base = None if freqs is not None else base
        self._freqs = freqs
        self.mscale = mscale

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.mscale != 1.0:
            x = x * self.mscale
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=self.base,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(
    dims: int, base: float, scaling: dict[str, Any], max_position_embeddings: int
) -> tuple[mx.array, float]:
    """YaRN inverse frequencies and attention scale, as Hugging Face computes them."""
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dims - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1 where wavelengths are short: keep the original freq

    pos_freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if m and m_all:
            attention_factor = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all)
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def make_rope(config: Any) -> RoPE:
    """The RoPE module for `config` (a ModelConfig); shared by dense and MoE models."""
    dims, base = config.head_dim, float(config.rope_theta)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return RoPE(dims, base)
    if kind == "yarn":
        inv_freq, mscale = yarn_inv_freq(dims, base, scaling, config.max_position_embeddings)
        return RoPE(dims, base, freqs=1.0 / inv_freq, mscale=mscale)
    from qwen3_chat.errors import ModelLoadError

    raise ModelLoadError(f"unsupported rope_scaling type {kind!r} (supported: yarn)")
