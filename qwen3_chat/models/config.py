"""Model configuration, built from a Hugging Face `config.json` (no size tables in code)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qwen3_chat.errors import ModelLoadError, Qwen3ChatError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")

# The bits a user may ask for (CLI, registry, download, convert, load): 4 and 8 are MLX
# affine quantization (group size 64); 16 means the original, unquantized weights.
QUANT_BITS = (4, 8)
ORIGINAL_BITS = 16
BITS = (*QUANT_BITS, ORIGINAL_BITS)
DEFAULT_BITS = 4  # what an alias resolves to when no --bits is given and nothing is on disk

# Hugging Face stores MoE experts one by one: layer prefix, expert index, projection, param.
EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(\w+_proj)\.(\w+)$")


def check_bits(
    bits: int, allowed: tuple[int, ...] = BITS, *, what: str = "bits",
    error: type[Qwen3ChatError] = Qwen3ChatError,
) -> int:  # fmt: skip
    """`bits` if it is one of `allowed`, else `error` saying which are allowed."""
    if bits not in allowed or isinstance(bits, bool):
        names = ", ".join(str(b) for b in allowed[:-1]) + f" or {allowed[-1]}"
        raise error(f"{what} must be {names}, not {bits}")
    return bits


def expert_key(prefix: str, expert: int, proj: str, param: str = "weight") -> str:
    """The per-expert tensor name EXPERT_KEY matches (prefix like `model.layers.0.mlp`)."""
    return f"{prefix}.experts.{expert}.{proj}.{param}"


def is_sparse_layer(cfg: Mapping[str, Any], index: int) -> bool:
    """Whether decoder layer `index` of a config with experts (HF field names) is sparse.

    Hugging Face's rule: every `decoder_sparse_step`-th layer, except those in
    `mlp_only_layers`. The one copy of the rule for the model, loader, verify and tests."""
    return (
        (cfg.get("num_experts") or 0) > 0
        and index not in (cfg.get("mlp_only_layers") or [])
        and (index + 1) % max(cfg.get("decoder_sparse_step") or 1, 1) == 0
    )


def transformers5_aliases(d: Mapping[str, Any]) -> dict[str, Any]:
    """`d` with transformers-5 spellings mapped back to the fields we read.

    A checkpoint re-saved by transformers >= 5 (any fine-tune or merge) keeps RoPE in
    `rope_parameters` (theta, scaling type and factors together), and some exporters name
    the expert count `num_local_experts`. M-RoPE sections are plain RoPE for text."""
    d = dict(d)
    rope = d.get("rope_parameters")
    if isinstance(rope, dict):
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope and key not in d:
                d[key] = rope[key]
        kind = rope.get("rope_type") or rope.get("type")
        if d.get("rope_scaling") is None and kind not in (None, "default", "mrope"):
            d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if d.get("num_experts") is None and "num_local_experts" in d:
        d["num_experts"] = d["num_local_experts"]
    return d


def check_model_type(model_type: Any) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r}: qwen3-chat runs "
            f"{' and '.join(SUPPORTED_MODEL_TYPES)} models"
        )


@dataclass(kw_only=True)
class ExpertFields:
    """The mixture-of-experts fields ModelConfig and HybridConfig share (HF names); no
    experts means a dense MLP. Keyword-only, so each config's required fields stay first."""

    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer `index` uses the sparse MoE block (HF's rule)."""
        return self.is_moe and is_sparse_layer(vars(self), index)

    def check_experts(self) -> None:
        if self.is_moe and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ModelLoadError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"1..num_experts ({self.num_experts})"
            )


C = TypeVar("C")


def build_config(cls: type[C], flat: dict[str, Any], raw: dict[str, Any], where: str) -> C:
    """`cls` from the config.json fields in `flat` (other keys ignored), keeping `raw`, the
    file as read; a missing or mistyped field is a ModelLoadError naming it (in `where`)."""
    flat = transformers5_aliases(flat)
    if flat.get("quantization") is None and isinstance(flat.get("quantization_config"), dict):
        flat["quantization"] = flat["quantization_config"]
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    kwargs = {k: v for k, v in flat.items() if k in {f.name for f in fields} - {"raw"}}
    kwargs["raw"] = dict(raw)
    missing = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        and f.name not in kwargs
    ]
    if missing:
        raise ModelLoadError(f"{where} is missing {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a null where a number is required
        raise ModelLoadError(f"config.json: {e}") from None


@dataclass
class ModelConfig(ExpertFields):
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
    # The MoE fields (qwen3_moe; ignored for dense models) come from ExpertFields.
    # MLX-community pre-quantized checkpoints carry this block.
    quantization: dict[str, Any] | None = None
    # The config.json it came from, every key kept, so saving or converting a model writes
    # back what was read without reading the file again.
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_model_type(self.model_type)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        self.check_experts()

    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen3_moe" and super().is_moe

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ModelLoadError("config.json must hold a JSON object")
        if "model_type" not in d:
            raise ModelLoadError("config.json has no model_type")
        check_model_type(d["model_type"])  # before "missing hidden_size, ..."
        return build_config(cls, d, d, "config.json")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        from qwen3_chat.files import read_json

        return cls.from_dict(read_json(path, error=ModelLoadError, what="JSON"))
