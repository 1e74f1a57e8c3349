"""Model configuration, built from a Hugging Face `config.json` (no size tables in code)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_chat.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")


@dataclass
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # MoE (qwen3_moe); ignored for dense models.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # MLX-community pre-quantized checkpoints carry this block.
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported model_type {self.model_type!r}: qwen3-chat runs "
                f"{' and '.join(SUPPORTED_MODEL_TYPES)} models"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.is_moe and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ModelLoadError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"1..num_experts ({self.num_experts})"
            )

    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen3_moe" and self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer `index` uses the sparse MoE block (HF's rule)."""
        return (
            self.is_moe
            and index not in self.mlp_only_layers
            and (index + 1) % max(self.decoder_sparse_step, 1) == 0
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ModelLoadError("config.json must hold a JSON object")
        if "model_type" not in d:
            raise ModelLoadError("config.json has no model_type")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("quantization") is None and isinstance(d.get("quantization_config"), dict):
            kwargs["quantization"] = d["quantization_config"]
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        missing = [n for n in required if n not in kwargs]
        if missing:
            raise ModelLoadError(f"config.json is missing {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except TypeError as e:  # e.g. a null where a number is required
            raise ModelLoadError(f"config.json: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path}: cannot read config ({e})") from None
        return cls.from_dict(data)
