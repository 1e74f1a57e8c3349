"""Tiny random hybrid Qwen3 checkpoints (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) that
transformers builds and saves at test time, rewritten into the layout Qwen released.

transformers-5 saves RoPE in `rope_parameters` and experts one by one; the released
folders differ: Qwen3-Next has top-level `rope_theta` / `partial_rotary_factor` and a
`full_attention_interval`, Qwen3.5 has M-RoPE sections and Qwen3.5-MoE fused experts
(`experts.gate_up_proj`). Every parameter is random, zero-centred norms included, so a
wrong `1 + w` or a swapped projection shows in the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from checkpoints import TOKENIZER_FILES
from safetensors.numpy import load_file, save_file

ARCHS = ("qwen3_next", "qwen3_5", "qwen3_5_moe")

TEXT: dict = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,  # value heads outnumber key heads, as released
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
MOE: dict = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "norm_topk_prob": True,
}
VISION: dict = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 4,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
}
ROPE_THETA = 1_000_000.0


def hf_model(arch: str, seed: int = 0, **text_overrides):
    """The transformers model of `arch` with every parameter random (float32, eval mode)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    text = {**TEXT, **(MOE if arch != "qwen3_5" else {}), **text_overrides}
    rope = {"rope_type": "default", "rope_theta": ROPE_THETA, "partial_rotary_factor": 0.25}
    if arch == "qwen3_next":
        model = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**text, rope_parameters=rope))
    else:
        rope = {**rope, "mrope_section": [1, 1, 0], "mrope_interleaved": True}
        config_cls, model_cls = {
            "qwen3_5": (tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration),
            "qwen3_5_moe": (tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeForConditionalGeneration),
        }[arch]
        model = model_cls(
            config_cls(text_config={**text, "rope_parameters": rope}, vision_config=VISION)
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.01, 4, generator=gen).log())
            elif p.ndim == 1:  # zero-centred norms around 0; dt_bias, gated norm around 1
                centre = 1.0 if name.endswith(("dt_bias", "linear_attn.norm.weight")) else 0.0
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + centre)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    return model.float().eval()


def _released_config(arch: str, cfg: dict) -> dict:
    if arch == "qwen3_next":
        # Qwen3-Next's config.json: RoPE at the top level, an interval instead of layer_types.
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
        cfg["rope_scaling"] = None
        cfg.pop("layer_types", None)
        cfg["full_attention_interval"] = 4
    return cfg


def fuse_experts(tensors: dict[str, np.ndarray], num_experts: int) -> dict[str, np.ndarray]:
    """Per-expert keys -> Qwen3.5-MoE's released `experts.gate_up_proj` / `experts.down_proj`."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    prefixes = sorted({k.split(".experts.")[0] for k in tensors if ".mlp.experts." in k})
    for p in prefixes:
        e = range(num_experts)
        gate = [tensors[f"{p}.experts.{i}.gate_proj.weight"] for i in e]
        up = [tensors[f"{p}.experts.{i}.up_proj.weight"] for i in e]
        out[f"{p}.experts.gate_up_proj"] = np.stack(
            [np.concatenate([g, u]) for g, u in zip(gate, up, strict=True)]
        )
        out[f"{p}.experts.down_proj"] = np.stack(
            [tensors[f"{p}.experts.{i}.down_proj.weight"] for i in e]
        )
    return out


def save_released(model, arch: str, out: Path, *, tokenizer_dir: Path | None = None) -> Path:
    """Save `model` with transformers, then rewrite config/tensors as Qwen released them."""
    model.save_pretrained(out)
    cfg = _released_config(arch, json.loads((out / "config.json").read_text()))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if arch == "qwen3_5_moe":
        f = out / "model.safetensors"
        tensors = fuse_experts(load_file(str(f)), cfg["text_config"]["num_experts"])
        save_file(tensors, str(f), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def make_hybrid(
    arch: str, out: Path, *, seed: int = 0, tokenizer_dir: Path | None = None, **text
) -> tuple[Path, object]:
    """(folder, transformers model) for a tiny random `arch` checkpoint saved as released."""
    model = hf_model(arch, seed, **text)
    return save_released(model, arch, Path(out), tokenizer_dir=tokenizer_dir), model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [L, vocab] of the transformers model (text only, no cache)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()
