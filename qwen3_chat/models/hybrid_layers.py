"""Token mixers of the hybrid Qwen3 family: Gated DeltaNet (linear attention) and gated
full attention, with Hugging Face parameter names.

Norm weights here are the plain RMSNorm scale: the checkpoints' zero-centred `w` (scale
`1 + w`) becomes `1 + w` once, in `Model.sanitize`, so MLX's fused rms_norm applies as is.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from qwen3_chat.models.cache import KVCache, LinearCache
from qwen3_chat.models.gated_delta import gated_delta
from qwen3_chat.models.hybrid_config import HybridConfig
from qwen3_chat.models.qwen3 import Attention
from qwen3_chat.models.rope import RoPE, yarn_inv_freq

# The L2 norm of q and k adds this inside the square root (as transformers/FLA do).
L2_EPS = 1e-6


def l2_normalize(x: mx.array) -> mx.array:
    """x / sqrt(sum(x^2) + eps), as one fused rms_norm: rms_norm adds its eps to the mean,
    so eps / D there and a 1/sqrt(D) after give exactly the L2 form."""
    d = x.shape[-1]
    return mx.fast.rms_norm(x, None, L2_EPS / d) * d**-0.5


class RMSNormGated(nn.Module):
    """RMSNorm of the mixer output, then a SiLU gate from `z` (weight is not zero-centred)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps) * nn.silu(gate)


class DepthwiseConv1d(nn.Module):
    """Causal depthwise conv over time; weight [channels, kernel, 1] as MLX's Conv1d stores it.

    Computed as `kernel` shifted multiply-adds: exact, and cheaper than a grouped conv for a
    kernel of 4. Not a Linear, so quantization leaves it in float (as mlx-lm does).
    """

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel, 1))

    def __call__(self, window: mx.array) -> mx.array:
        """window: [B, kernel - 1 + S, C] (the cached inputs, then the new ones) -> [B, S, C]."""
        kernel = self.weight.shape[1]
        s = window.shape[1] - kernel + 1
        w = self.weight[:, :, 0].T  # [kernel, C]
        out = window[:, :s] * w[0]
        for i in range(1, kernel):
            out = out + window[:, i : i + s] * w[i]
        return out


class GatedDeltaNet(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        h = config.hidden_size
        self.nk, self.nv = config.linear_num_key_heads, config.linear_num_value_heads
        self.dk, self.dv = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = config.linear_conv_kernel_dim
        self.fused = config.fused_projections
        if self.fused:
            self.in_proj_qkvz = nn.Linear(h, 2 * self.key_dim + 2 * self.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(h, 2 * self.nv, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(h, self.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(h, self.value_dim, bias=False)
            self.in_proj_b = nn.Linear(h, self.nv, bias=False)
            self.in_proj_a = nn.Linear(h, self.nv, bias=False)
        self.conv1d = DepthwiseConv1d(self.conv_dim, self.kernel)
        self.dt_bias = mx.ones((self.nv,))
        self.A_log = mx.zeros((self.nv,))
        self.norm = RMSNormGated(self.dv, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, h, bias=False)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """-> (q|k|v channels [B, S, conv_dim], z [B, S, nv, dv], b, a [B, S, nv])."""
        b, s, _ = x.shape
        if not self.fused:
            z = self.in_proj_z(x).reshape(b, s, self.nv, self.dv)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        # Qwen3-Next groups q, k, v, z (and b, a) per key head: [.., nk, (dk, dk, r*dv, r*dv)].
        r = self.nv // self.nk
        qkvz = self.in_proj_qkvz(x).reshape(b, s, self.nk, -1)
        q, k, v, z = mx.split(qkvz, [self.dk, 2 * self.dk, 2 * self.dk + r * self.dv], axis=-1)
        beta, a = mx.split(self.in_proj_ba(x).reshape(b, s, self.nk, 2 * r), [r], axis=-1)
        mixed = mx.concatenate(
            [q.reshape(b, s, -1), k.reshape(b, s, -1), v.reshape(b, s, -1)], axis=-1
        )
        z = z.reshape(b, s, self.nv, self.dv)
        return mixed, z, beta.reshape(b, s, self.nv), a.reshape(b, s, self.nv)

    def __call__(self, x: mx.array, cache: LinearCache | None, last_only: bool = False) -> mx.array:
        """With last_only, every token updates the state but only the last one's output is
        gated and projected (the final layer of a prefill)."""
        b, s, _ = x.shape
        mixed, z, beta_logits, a = self._project(x)
        conv_state = cache.conv if cache is not None else None
        if conv_state is None:
            conv_state = mx.zeros((b, self.kernel - 1, self.conv_dim), dtype=x.dtype)
        window = mx.concatenate([conv_state, mixed], axis=1)
        conv_out = nn.silu(self.conv1d(window))
        q, k, v = mx.split(conv_out, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = l2_normalize(q.reshape(b, s, self.nk, self.dk).astype(mx.float32)) * self.dk**-0.5
        k = l2_normalize(k.reshape(b, s, self.nk, self.dk).astype(mx.float32))
        v = v.reshape(b, s, self.nv, self.dv)
        beta = mx.sigmoid(beta_logits.astype(mx.float32))
        # The per-token log-decay; A_log stays float32 (exp of it in bf16 loses the decay).
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(
            a.astype(mx.float32) + self.dt_bias.astype(mx.float32)
        )
        state = cache.recurrent if cache is not None else None
        # Requested snapshots inside this chunk: run the rule up to each, keep it, go on.
        splits = cache.splits_for_snapshots(s) if cache is not None else []
        bounds = [0, *splits, s]
        outs = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            part, state = gated_delta(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi],
                                      beta[:, lo:hi], state)  # fmt: skip
            outs.append(part)
            if hi < s:
                cache.mark(window[:, hi : hi + self.kernel - 1], state, hi)  # type: ignore[union-attr]
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
        if cache is not None:
            cache.update(window[:, -(self.kernel - 1) :], state, s)
        if last_only:
            out, z = out[:, -1:], z[:, -1:]
        out = self.norm(out, z)
        return self.out_proj(out.reshape(b, out.shape[1], -1))


def make_partial_rope(config: HybridConfig) -> RoPE:
    """RoPE over the first `head_dim * partial_rotary_factor` dims (the rest pass through)."""
    dims, base = config.rope_dims, float(config.rope_theta)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default", "mrope"):  # M-RoPE is plain RoPE for text positions
        return RoPE(dims, base)
    if kind == "yarn":
        inv_freq, mscale = yarn_inv_freq(dims, base, scaling, config.max_position_embeddings)
        return RoPE(dims, base, freqs=1.0 / inv_freq, mscale=mscale)
    from qwen3_chat.errors import ModelLoadError

    raise ModelLoadError(f"unsupported rope type {kind!r} (supported: default, mrope, yarn)")


class GatedAttention(Attention):
    """Qwen3's GQA attention, but q_proj also yields a per-channel output gate (sigmoid)."""

    def __init__(self, config: HybridConfig, rope: RoPE):
        super().__init__(config, rope)  # type: ignore[arg-type]
        # Per head, q_proj holds [query (head_dim), gate (head_dim)].
        hd, bias = self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, 2 * self.n_heads * hd, bias=bias)

    def __call__(self, x: mx.array, cache: KVCache | None, last_only: bool = False) -> mx.array:
        """With last_only, every position's keys/values reach the cache but only the last
        position queries (as Qwen3's Attention)."""
        b, n, _ = x.shape
        offset = cache.offset if cache is not None else 0
        xq = x[:, -1:, :] if last_only else x
        nq = xq.shape[1]
        q, gate = mx.split(self.q_proj(xq).reshape(b, nq, self.n_heads, -1), 2, axis=-1)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(b, n, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, n, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q, offset=offset + n - nq), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = self.attend(q, k, v)
        return self.o_proj(out * mx.sigmoid(gate.reshape(b, nq, -1)))
