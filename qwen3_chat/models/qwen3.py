"""Qwen3 (dense and MoE) in MLX, with Hugging Face parameter names.

GQA attention with per-head RMSNorm on q and k before RoPE, SwiGLU MLP or a sparse MoE
block, RMSNorm everywhere, optional tied embeddings. The KV cache is passed in explicitly.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from qwen3_chat.models.cache import KVCache
from qwen3_chat.models.config import EXPERT_KEY, ModelConfig
from qwen3_chat.models.moe import SparseMoeBlock, swiglu
from qwen3_chat.models.rope import make_rope


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rope: nn.Module):
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            hd,
        )
        self.scale = hd**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, h, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=config.rms_norm_eps)
        self.rope = rope

    def project(
        self, x: mx.array, offset: int | mx.array, last_only: bool = False
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values [B, heads, n, head_dim], rotated to start at `offset`
        (an array offset lets a compiled decode step skip re-tracing per position)."""
        b, n, _ = x.shape
        k = self.k_norm(self.k_proj(x).reshape(b, n, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, n, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        xq = x[:, -1:, :] if last_only else x
        nq = xq.shape[1]
        q = self.q_norm(self.q_proj(xq).reshape(b, nq, self.n_heads, -1)).transpose(0, 2, 1, 3)
        return self.rope(q, offset=offset + n - nq), self.rope(k, offset=offset), v

    def attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """Attention of q over the (cached) keys/values, heads merged: [B, nq, heads*hd]."""
        b, _, nq, _ = q.shape
        # "causal" aligns to the bottom-right, so it also holds for a chunk after cached tokens.
        mask = "causal" if nq > 1 else None
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, nq, -1)

    def __call__(self, x: mx.array, cache: KVCache | None, last_only: bool = False) -> mx.array:
        """With last_only, every position's keys/values reach the cache but only the last
        position queries: the final layer of a prefill needs nothing more."""
        q, k, v = self.project(x, cache.offset if cache is not None else 0, last_only)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.o_proj(self.attend(q, k, v))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, rope: nn.Module):
        super().__init__()
        self.self_attn = Attention(config, rope)
        if config.is_moe_layer(index):
            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def make_cache(self) -> KVCache:
        return KVCache()

    def __call__(self, x: mx.array, cache: KVCache | None, last_only: bool = False) -> mx.array:
        residual = x[:, -1:, :] if last_only else x
        h = residual + self.self_attn(self.input_layernorm(x), cache, last_only)
        return self.feed_forward(h)

    def feed_forward(self, h: mx.array) -> mx.array:
        """The second residual block: MLP (or experts) over the post-attention norm."""
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rope = make_rope(config)  # one instance: dense and MoE layers share the same RoPE
        self.layers = [DecoderLayer(config, i, rope) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(
        self, inputs: mx.array, cache: list[KVCache] | None, last_only: bool = False
    ) -> mx.array:
        h = self.embed_tokens(inputs)
        caches = cache if cache is not None else [None] * len(self.layers)
        last = len(self.layers) - 1
        for i, (layer, c) in enumerate(zip(self.layers, caches, strict=True)):
            h = layer(h, c, last_only=last_only and i == last)
        return h


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: list[KVCache] | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> mx.array | tuple[mx.array, mx.array]:
        """inputs: int32 [B, L] -> logits [B, L, vocab] ([B, 1, vocab] with last_only).

        return_hidden: (logits, final normed hidden states [B, L, H] of every position),
        from the same forward: what a multi-token-prediction head reads (models/mtp.py)."""
        if return_hidden:
            h = self.model.norm(self.model(inputs, cache))
            return self.project(h[:, -1:] if last_only else h), h
        # With last_only, the last layer's MLP, the norm and lm_head run on one position:
        # prefill needs only the next-token logits.
        return self.head(self.model(inputs, cache, last_only))

    def head(self, h: mx.array) -> mx.array:
        """Final norm and output projection: hidden states -> logits."""
        return self.project(self.model.norm(h))

    def project(self, h: mx.array) -> mx.array:
        """The output projection (lm_head or the tied embedding) of normed hidden states."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self) -> list[KVCache]:
        return [layer.make_cache() for layer in self.model.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a Hugging Face checkpoint onto this module tree (the only weight fix-ups)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        # HF stores experts one by one; we stack them into [E, out, in] per projection.
        groups: dict[tuple[str, str, str], dict[int, mx.array]] = {}
        for key in [k for k in weights if ".mlp.experts." in k]:
            m = EXPERT_KEY.match(key)
            if m is None:
                continue
            prefix, e, proj, kind = m.groups()
            groups.setdefault((prefix, proj, kind), {})[int(e)] = weights.pop(key)
        for (prefix, proj, kind), by_expert in groups.items():
            n = self.config.num_experts
            if sorted(by_expert) != list(range(n)):
                missing = sorted(set(range(n)) - set(by_expert))
                from qwen3_chat.errors import ModelLoadError

                raise ModelLoadError(
                    f"{prefix}.experts: {proj}.{kind} missing for experts {missing[:8]}"
                )
            weights[f"{prefix}.switch_mlp.{proj}.{kind}"] = mx.stack(
                [by_expert[e] for e in range(n)]
            )
        return weights
