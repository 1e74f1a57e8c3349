"""Config layouts: transformers-5 re-saves of plain Qwen3 (rope_parameters,
num_local_experts) and the hybrid family's two layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from checkpoints import YARN, make_checkpoint, tiny_config, tokens

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.models import config_from_dict
from qwen3_chat.models.config import ModelConfig
from qwen3_chat.models.hybrid_config import HybridConfig
from qwen3_chat.weights.loader import load_model


def resave_as_transformers5(cfg: dict) -> dict:
    """What transformers >= 5 writes for a Qwen3 config: RoPE in rope_parameters (and, in
    some exporters, MoE experts under their Mixtral name)."""
    cfg = dict(cfg)
    scaling = cfg.pop("rope_scaling", None) or {"rope_type": "default"}
    cfg["rope_parameters"] = {**scaling, "rope_theta": cfg.pop("rope_theta")}
    if "num_experts" in cfg:
        cfg["num_local_experts"] = cfg.pop("num_experts")
    return cfg


@pytest.mark.parametrize("moe", [False, True])
def test_qwen3_resaved_with_rope_parameters_gives_the_original_logits(tmp_path, moe):
    cfg = tiny_config(moe=moe, rope_theta=5000.0, rope_scaling=dict(YARN))
    ids = tokens(48)
    original = make_checkpoint(tmp_path / "original", cfg)
    resaved = make_checkpoint(tmp_path / "resaved", cfg)
    (resaved / "config.json").write_text(json.dumps(resave_as_transformers5(cfg)))
    want = np.array(load_model(original)(ids))
    got = np.array(load_model(resaved)(ids))
    np.testing.assert_array_equal(got, want)


def test_qwen3_rope_parameters_fill_theta_and_scaling():
    cfg = ModelConfig.from_dict(resave_as_transformers5(tiny_config(rope_scaling=dict(YARN))))
    assert cfg.rope_theta == 1_000_000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling["factor"] == 4.0
    plain = ModelConfig.from_dict(resave_as_transformers5(tiny_config(rope_theta=5000.0)))
    assert plain.rope_theta == 5000.0 and plain.rope_scaling is None


def test_hybrid_layouts_agree():
    """Qwen3-Next's flat layout and Qwen3.5's text_config + rope_parameters give one config."""
    text = {
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 8,
    }  # fmt: skip
    flat = config_from_dict(
        {"model_type": "qwen3_5", **text, "rope_theta": 1e7, "partial_rotary_factor": 0.5}
    )
    nested = config_from_dict(
        {
            "model_type": "qwen3_5",
            "vision_config": {},
            "text_config": {
                **text,
                "model_type": "qwen3_5_text",
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e7,
                    "partial_rotary_factor": 0.5,
                    "mrope_section": [11, 11, 10],
                    "mrope_interleaved": True,
                },  # fmt: skip
            },
        }
    )
    assert isinstance(flat, HybridConfig) and isinstance(nested, HybridConfig)
    for c in (flat, nested):
        assert (c.rope_theta, c.rope_dims, c.rope_scaling) == (1e7, 8, None)
        assert c.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert nested.has_vision and not flat.has_vision


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'.*qwen3_5_moe"):
        config_from_dict({"model_type": "llama", "hidden_size": 8})
    # Even the plain Qwen3 config class says so, rather than "missing hidden_size".
    with pytest.raises(ModelLoadError, match="unsupported model_type 'qwen3_5'"):
        ModelConfig.from_dict({"model_type": "qwen3_5", "text_config": {}})
