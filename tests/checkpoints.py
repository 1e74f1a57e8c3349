"""Tiny random-weight Qwen3 checkpoints in Hugging Face layout, written at test time.

Every test that needs a model builds one here: real safetensors files, real config.json,
optionally the real Qwen3 tokenizer files copied beside them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from qwen3_chat.models.config import expert_key, is_sparse_layer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)

TINY_DENSE: dict = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "vocab_size": 512,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "torch_dtype": "float32",
}

TINY_MOE: dict = {
    **TINY_DENSE,
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}

REAL_VOCAB = 151936


def tiny_config(moe: bool = False, **overrides) -> dict:
    """A tiny config dict (dense or MoE) with `overrides` applied."""
    return {**(TINY_MOE if moe else TINY_DENSE), **overrides}


def _linear(rng: np.random.Generator, out_dim: int, in_dim: int) -> np.ndarray:
    return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)


def _norm(rng: np.random.Generator, dim: int) -> np.ndarray:
    return (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)


def hf_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with Hugging Face names (per-expert keys for MoE), float32."""
    rng = np.random.default_rng(seed)
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((cfg["vocab_size"], h)).astype(np.float32)
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = _norm(rng, h)
        w[p + "post_attention_layernorm.weight"] = _norm(rng, h)
        w[p + "self_attn.q_proj.weight"] = _linear(rng, nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = _linear(rng, nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = _linear(rng, nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = _linear(rng, h, nh * hd)
        w[p + "self_attn.q_norm.weight"] = _norm(rng, hd)
        w[p + "self_attn.k_norm.weight"] = _norm(rng, hd)
        if cfg["model_type"] == "qwen3_moe" and is_sparse_layer(cfg, i):
            mi = cfg["moe_intermediate_size"]
            w[p + "mlp.gate.weight"] = _linear(rng, cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                w[expert_key(p + "mlp", e, "gate_proj")] = _linear(rng, mi, h)
                w[expert_key(p + "mlp", e, "up_proj")] = _linear(rng, mi, h)
                w[expert_key(p + "mlp", e, "down_proj")] = _linear(rng, h, mi)
        else:
            inter = cfg["intermediate_size"]
            w[p + "mlp.gate_proj.weight"] = _linear(rng, inter, h)
            w[p + "mlp.up_proj.weight"] = _linear(rng, inter, h)
            w[p + "mlp.down_proj.weight"] = _linear(rng, h, inter)
    w["model.norm.weight"] = _norm(rng, h)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = _linear(rng, cfg["vocab_size"], h)
    return w


def make_checkpoint(
    path: Path,
    cfg: dict,
    *,
    seed: int = 0,
    shards: int = 1,
    tokenizer_dir: Path | None = None,
    weights: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write config.json + safetensors (sharded with an index when shards > 1) into `path`.

    With `tokenizer_dir`, the tokenizer files found there are copied in too.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = hf_weights(cfg, seed) if weights is None else weights
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    names = sorted(weights)
    if shards <= 1:
        save_file({k: weights[k] for k in names}, str(path / "model.safetensors"))
    else:
        weight_map: dict[str, str] = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({k: weights[k] for k in part}, str(path / fname))
            weight_map.update({k: fname for k in part})
        total = sum(v.nbytes for v in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copyfile(src, path / name)
    return path


# -- in-memory models (MLX imported lazily so hub/CLI tests need no MLX) -------------------
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def build(cfg: dict, seed: int = 0):
    """Our Model with `hf_weights(cfg, seed)` loaded."""
    import mlx.core as mx

    from qwen3_chat.models.config import ModelConfig
    from qwen3_chat.models.qwen3 import Model

    model = Model(ModelConfig.from_dict(cfg))
    weights = {k: mx.array(v) for k, v in hf_weights(cfg, seed).items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


def tokens(n: int, vocab: int = 512, seed: int = 1):
    """A [1, n] int32 array of random token ids."""
    import mlx.core as mx

    return mx.array(np.random.default_rng(seed).integers(0, vocab, (1, n)), dtype=mx.int32)
