"""Configuration of the hybrid Qwen3 family (Qwen3-Next, Qwen3.5/3.6/3.8), MLX-free.

Two layouts reach us: Qwen3-Next's flat config.json with top-level `rope_theta` /
`partial_rotary_factor` / `full_attention_interval`, and the vision-language Qwen3.5
config whose language model sits in `text_config`, with RoPE in transformers-5's
`rope_parameters` (M-RoPE sections that reduce to plain positions for text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.models.config import ExpertFields, build_config

HYBRID_MODEL_TYPES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
# Qwen3-Next fuses the Gated DeltaNet input projections (in_proj_qkvz + in_proj_ba);
# Qwen3.5 keeps them separate (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a).
FUSED_PROJECTION_TYPES = ("qwen3_next",)
LINEAR, FULL = "linear_attention", "full_attention"


@dataclass
class HybridConfig(ExpertFields):
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.25
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    layer_types: list[str] = field(default_factory=list)
    full_attention_interval: int = 4
    # MoE (Qwen3-Next and qwen3_5_moe; the dense Qwen3.5 has none): ExpertFields, plus
    # the shared expert every token also goes through.
    shared_expert_intermediate_size: int = 0
    quantization: dict[str, Any] | None = None
    # The folder also holds a vision tower we do not run (Qwen3.5 is vision-language).
    has_vision: bool = False
    # The config.json it came from, every key kept, so a save writes back what was read.
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in HYBRID_MODEL_TYPES:
            raise ModelLoadError(f"unsupported hybrid model_type {self.model_type!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.layer_types:
            step = self.full_attention_interval
            if step < 1:
                raise ModelLoadError(f"full_attention_interval must be >= 1, not {step}")
            self.layer_types = [
                FULL if (i + 1) % step == 0 else LINEAR for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {
            LINEAR,
            FULL,
        }:
            raise ModelLoadError(
                f"layer_types must list {self.num_hidden_layers} entries of {LINEAR!r} or {FULL!r}"
            )
        for heads, groups, what in (
            (self.num_attention_heads, self.num_key_value_heads, "num_key_value_heads"),
            (self.linear_num_value_heads, self.linear_num_key_heads, "linear_num_key_heads"),
        ):
            if groups < 1 or heads % groups:
                raise ModelLoadError(f"{what} ({groups}) must divide the head count ({heads})")
        self.check_experts()
        if not 0 < self.partial_rotary_factor <= 1:
            raise ModelLoadError(
                f"partial_rotary_factor must be in (0, 1], not {self.partial_rotary_factor}"
            )

    @property
    def fused_projections(self) -> bool:
        return self.model_type in FUSED_PROJECTION_TYPES

    @property
    def rope_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)  # type: ignore[operator]

    def snapshot_bytes(self, compute_bytes: int = 2, batch: int = 1) -> int:
        """Memory of one snapshot of every linear layer: the conv window ((kernel - 1) inputs
        of the q|k|v channels, in the compute dtype) plus the float32 recurrent state
        (value heads x Dk x Dv)."""
        channels = 2 * self.linear_num_key_heads * self.linear_key_head_dim + (
            self.linear_num_value_heads * self.linear_value_head_dim
        )
        conv = (self.linear_conv_kernel_dim - 1) * channels * compute_bytes
        recurrent = (
            self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim * 4
        )
        linear_layers = sum(self.is_linear_layer(i) for i in range(self.num_hidden_layers))
        return batch * linear_layers * (conv + recurrent)

    def is_linear_layer(self, index: int) -> bool:
        return self.layer_types[index] == LINEAR

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HybridConfig:
        if not isinstance(d, dict):
            raise ModelLoadError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        text = d.get("text_config")
        has_vision = isinstance(d.get("vision_config"), dict)
        if isinstance(text, dict):
            # Top-level keys (quantization, tied embeddings) apply to the language model.
            flat = {**text, **{k: v for k, v in d.items() if k not in ("text_config",)}}
        else:
            flat = dict(d)
        flat["model_type"] = model_type
        if flat.get("rope_scaling") is None and not isinstance(
            flat.get("rope_parameters"), (dict, type(None))
        ):
            raise ModelLoadError("config.json: rope_parameters must be an object")
        if flat.get("mlp_only_layers") is None:
            flat["mlp_only_layers"] = []
        if flat.get("layer_types") is None:
            flat["layer_types"] = []
        flat["has_vision"] = has_vision  # from the folder's layout, not a config.json key
        where = "text_config" if isinstance(text, dict) else "config.json"
        return build_config(cls, flat, d, where)
