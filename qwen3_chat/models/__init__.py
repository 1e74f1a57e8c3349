"""Model architectures in MLX, one file each, with shared layers and caches beside them.

`config`, `hybrid_config` and this module are MLX-free (architectures are imported
lazily); every other module here imports MLX. `model_type` picks the architecture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from qwen3_chat.models.hybrid_config import HYBRID_MODEL_TYPES, HybridConfig

if TYPE_CHECKING:
    import mlx.nn as nn

AnyConfig = ModelConfig | HybridConfig
ALL_MODEL_TYPES = SUPPORTED_MODEL_TYPES + HYBRID_MODEL_TYPES


def config_from_dict(d: Any) -> AnyConfig:
    """The config dataclass of the architecture `d["model_type"]` names."""
    if isinstance(d, dict) and d.get("model_type") in HYBRID_MODEL_TYPES:
        return HybridConfig.from_dict(d)
    if isinstance(d, dict) and d.get("model_type") not in (None, *SUPPORTED_MODEL_TYPES):
        raise ModelLoadError(
            f"unsupported model_type {d['model_type']!r}: qwen3-chat runs "
            f"{', '.join(ALL_MODEL_TYPES)} models"
        )
    return ModelConfig.from_dict(d)


def build_model(config: AnyConfig) -> nn.Module:
    """An untrained model of `config`'s architecture (weights are loaded into it)."""
    if isinstance(config, HybridConfig):
        from qwen3_chat.models.qwen3_next import Model as HybridModel

        return HybridModel(config)
    from qwen3_chat.models.qwen3 import Model

    return Model(config)
