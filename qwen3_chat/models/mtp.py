"""The multi-token-prediction (MTP) head of the hybrid Qwen3 family: the checkpoint's
`mtp.*` tensors, which `qwen3_next.Model.sanitize` keeps as stored.

Given the target's hidden state h_i at position i and the next token t_(i+1), the head
predicts t_(i+2):

    x = fc([pre_fc_norm_embedding(embed(t_(i+1))); pre_fc_norm_hidden(h_i)])
    g = norm(layer(x))            one full-attention decoder layer, with its own KV cache
    logits = lm_head(g)           the target's embedding and lm_head, shared

h_i is the target's last hidden state after its final norm (what the model returns), and a
chained draft step feeds the head's own g back as h. This follows vLLM's
vllm/model_executor/models/qwen3_next_mtp.py (Qwen3NextMultiTokenPredictor.forward: the
embedding first in the concatenation, `fc` without bias, `mtp.layers.N` built as
Qwen3NextDecoderLayer(layer_type="full_attention") with the model's MoE or MLP, then
`mtp.norm`; the target hidden state is Qwen3NextModel's output, after `model.norm`).
All of the head's norms are zero-centred (GemmaRMSNorm in vLLM: scale 1 + w), as stored.
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.models.cache import KVCache
from qwen3_chat.models.hybrid_config import HybridConfig
from qwen3_chat.models.hybrid_layers import make_partial_rope
from qwen3_chat.models.qwen3_next import MTP_PREFIX, DecoderLayer

# Every norm of the head is stored zero-centred (scale 1 + w), as Qwen released it.
MTP_NORMS = re.compile(
    r"(pre_fc_norm_embedding|pre_fc_norm_hidden|input_layernorm|post_attention_layernorm"
    r"|q_norm|k_norm)\.weight$|^norm\.weight$"
)


def mtp_layers(config: HybridConfig) -> int:
    """`mtp_num_hidden_layers` from config.json (flat or under text_config), default 1."""
    raw = config.raw.get("text_config", config.raw) if config.raw else {}
    return int(raw.get("mtp_num_hidden_layers", 1) or 1)


class MTPHead(nn.Module):
    def __init__(self, config: HybridConfig, layers: int = 1):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.pre_fc_norm_embedding = nn.RMSNorm(h, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(h, eps=eps)
        self.fc = nn.Linear(2 * h, h, bias=False)
        rope = make_partial_rope(config)
        # Index 0 decides MoE vs MLP, as vLLM's layer index for "mtp.layers.0" does.
        self.layers = [DecoderLayer(config, 0, rope, linear=False) for _ in range(layers)]
        self.norm = nn.RMSNorm(h, eps=eps)

    def make_cache(self) -> list[KVCache]:
        return [layer.make_cache() for layer in self.layers]  # full attention: KV caches

    def __call__(
        self, embeds: mx.array, hidden: mx.array, cache: list[KVCache] | None = None
    ) -> mx.array:
        """embeds [B, L, H] of the tokens that follow, hidden [B, L, H] of the positions they
        follow -> the head's hidden states [B, L, H] (after mtp.norm: lm_head reads them)."""
        x = mx.concatenate(
            [self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], axis=-1
        )
        x = self.fc(x)
        caches = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, caches, strict=True):
            x = layer(x, c)
        return self.norm(x)


def has_mtp(model) -> bool:
    """Whether the loaded model kept an MTP head's tensors."""
    return bool(getattr(model, "mtp_weights", None))


def mtp_head(model) -> MTPHead | None:
    """The model's MTP head, built from its kept `mtp.*` tensors once and kept on it; None
    when the checkpoint has none (MLX-community conversions usually drop them)."""
    head = getattr(model, "_mtp_head", None)
    if head is not None or not has_mtp(model):
        return head
    config = model.config
    if mtp_layers(config) != 1:  # every released head has one; chaining more is untested
        raise ModelLoadError(f"an MTP head of {mtp_layers(config)} layers is not supported")
    head = MTPHead(config)
    # Reuse the model's own mapping (fused or per-expert experts -> stacked switch_mlp) by
    # naming the tensors as a main-model layer would be named, then strip that prefix again.
    named = {"model." + k[len(MTP_PREFIX) :]: v for k, v in model.mtp_weights.items()}
    try:
        mapped = model.sanitize(named)
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot map the MTP head's tensors ({e})") from None
    dtype = model.model.norm.weight.dtype  # the compute dtype the model was loaded in
    weights = []
    for key, value in mapped.items():
        key = key.removeprefix("model.")
        if value.ndim == 1 and MTP_NORMS.search(key):
            value = value.astype(mx.float32) + 1.0
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        weights.append((key, value))
    try:
        head.load_weights(weights, strict=True)
    except ValueError as e:
        raise ModelLoadError(f"the MTP head's tensors do not fit the config ({e})") from None
    quant = getattr(config, "quantization", None)
    if quant:  # a quantized model: its head quantized alike (the kept tensors are float)
        from qwen3_chat.weights.quantize import quantize_model

        quantize_model(head, int(quant["bits"]), int(quant["group_size"]))
    mx.eval(head.parameters())
    head.eval()
    object.__setattr__(model, "_mtp_head", head)  # an attribute, not a parameter
    return head
