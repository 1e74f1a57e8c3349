"""The hybrid Qwen3 family in MLX: Qwen3-Next, Qwen3.5 / 3.6 / 3.8 (dense and MoE).

Three Gated DeltaNet (linear attention) layers to each gated full-attention layer (as
`layer_types` says), zero-centred RMSNorms, and a SwiGLU MLP or a sparse MoE with a
sigmoid-gated shared expert. The cache is an explicit per-layer list: `KVCache` for
attention layers, `LinearCache` (conv + recurrent state, snapshots) for linear ones.
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.models import qwen3
from qwen3_chat.models.cache import KVCache, LayerCache, LinearCache
from qwen3_chat.models.hybrid_config import HybridConfig
from qwen3_chat.models.hybrid_layers import GatedAttention, GatedDeltaNet, make_partial_rope
from qwen3_chat.models.moe import SparseMoeBlock
from qwen3_chat.models.qwen3 import MLP

# Stored as `w` with scale `1 + w` (zero-centred); the gated norm inside linear_attn is not.
ZERO_CENTRED_NORMS = re.compile(
    r"(input_layernorm|post_attention_layernorm|q_norm|k_norm)\.weight$|^model\.norm\.weight$"
)
VISION_PREFIXES = ("model.visual.", "visual.", "vision_tower.", "model.vision_tower.")
MTP_PREFIX = "mtp."
FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(gate_up_proj|down_proj)$")
VISION_NOTE = "this model's vision tower is not loaded: images are not supported"


class SharedExpertMoeBlock(SparseMoeBlock):
    """Routed experts as in Qwen3-MoE, plus one always-on expert scaled by a sigmoid gate."""

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().__call__(x) + shared


class DecoderLayer(nn.Module):
    def __init__(
        self, config: HybridConfig, index: int, rope: nn.Module, linear: bool | None = None
    ):
        super().__init__()
        # `linear` overrides layer_types: the MTP head's layer is full attention (models/mtp.py).
        self.is_linear = config.is_linear_layer(index) if linear is None else linear
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config, rope)
        if config.is_moe_layer(index):
            self.mlp = SharedExpertMoeBlock(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def make_cache(self) -> LayerCache:
        return LinearCache() if self.is_linear else KVCache()

    def __call__(self, x: mx.array, cache: LayerCache | None, last_only: bool = False) -> mx.array:
        """With last_only (the final layer of a prefill), every token reaches the cache but
        only the last position's output and MLP are computed."""
        mixer = self.linear_attn if self.is_linear else self.self_attn
        residual = x[:, -1:] if last_only else x
        h = residual + mixer(self.input_layernorm(x), cache, last_only)
        return h + self.mlp(self.post_attention_layernorm(h))


class HybridModel(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rope = make_partial_rope(config)
        self.layers = [DecoderLayer(config, i, rope) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(
        self, inputs: mx.array, cache: list[LayerCache] | None, last_only: bool = False
    ) -> mx.array:
        h = self.embed_tokens(inputs)
        caches = cache if cache is not None else [None] * len(self.layers)
        last = len(self.layers) - 1
        # Every layer must see every token (a linear layer's state folds them all in), but
        # with last_only the final layer's output, MLP, norm and lm_head need only the last
        # position: a prefill skips the rest of that work.
        for i, (layer, c) in enumerate(zip(self.layers, caches, strict=True)):
            h = layer(h, c, last_only=last_only and i == last)
        return h


class Model(qwen3.Model):
    """Qwen3's Model (logits, tied embeddings, expert stacking) over the hybrid stack."""

    load_notes: list[str]
    mtp_weights: dict[str, mx.array]
    # The decay's log: exp() of it in bf16 would lose the slow decays (mlx-lm keeps it too).
    float32_params = ("A_log",)

    def __init__(self, config: HybridConfig):
        nn.Module.__init__(self)  # not Qwen3's __init__: it would build a Qwen3 stack
        self.config = config
        self.model = HybridModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Plain attributes, not module children: nn.Module would count arrays in a dict as
        # parameters. What a load should tell the user (the library never prints; the CLI
        # may), and the multi-token-prediction head's tensors, kept as stored.
        object.__setattr__(self, "load_notes", [])
        object.__setattr__(self, "mtp_weights", {})

    def make_cache(self) -> list[LayerCache]:
        return [layer.make_cache() for layer in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a Hugging Face or MLX-community checkpoint onto this module tree."""
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            if key.startswith(VISION_PREFIXES):
                if VISION_NOTE not in self.load_notes:
                    self.load_notes.append(VISION_NOTE)
                continue
            if key.startswith(MTP_PREFIX):
                self.mtp_weights[key] = value
                continue
            # Vision-language checkpoints nest the language model (HF and mlx-lm spellings).
            for old, new in (
                ("model.language_model.", "model."),
                ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."),
            ):
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            out[key] = value
        # A Hugging Face checkpoint stores conv1d as [C, 1, K] and zero-centred norms;
        # an MLX-converted one has both fixed up already. The conv layout tells them apart.
        from_hf = any(k.endswith("conv1d.weight") and v.shape[-1] != 1 for k, v in out.items())
        for key, value in list(out.items()):
            if key.endswith("conv1d.weight") and value.shape[-1] != 1:
                out[key] = value.moveaxis(2, 1)
            elif from_hf and value.ndim == 1 and ZERO_CENTRED_NORMS.search(key):
                out[key] = value + 1.0
        self._unfuse_experts(out)
        # Qwen3's sanitize: drops rotary buffers and a tied lm_head, stacks per-expert keys.
        return super().sanitize(out)

    def _unfuse_experts(self, weights: dict[str, mx.array]) -> None:
        """transformers-5 / Qwen3.5-MoE store experts fused: gate_up_proj [E, 2I, H]."""
        for key in [k for k in weights if FUSED_EXPERTS.match(k)]:
            prefix, kind = FUSED_EXPERTS.match(key).groups()  # type: ignore[union-attr]
            value = weights.pop(key)
            if value.ndim != 3:
                raise ModelLoadError(f"tensor {key} has shape {tuple(value.shape)}, expected 3-D")
            if kind == "down_proj":
                weights[f"{prefix}.switch_mlp.down_proj.weight"] = value
                continue
            mid = value.shape[1] // 2
            weights[f"{prefix}.switch_mlp.gate_proj.weight"] = value[:, :mid]
            weights[f"{prefix}.switch_mlp.up_proj.weight"] = value[:, mid:]
