"""Quantized hybrid models: mlx-lm's recipe (router and shared-expert gate at 8 bits, conv1d
and A_log in float), checked by greedy tokens against mlx-lm's own quantized model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hybrid_checkpoints import ARCHS, make_hybrid

from qwen3_chat.weights.loader import load_model

pytest.importorskip("torch")
mlx_lm_utils = pytest.importorskip("mlx_lm.utils")

# Every projection a multiple of the 64-wide quantization group, so all of them quantize.
QUANT_DIMS = {
    "hidden_size": 128,
    "intermediate_size": 128,
    "linear_value_head_dim": 16,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
}
PROMPT = [5, 17, 99, 3, 250, 42, 8, 8, 120, 64, 1, 77, 200, 31, 9, 140]


def greedy(model, n: int = 12) -> list[int]:
    cache = model.make_cache()
    logits = model(mx.array([PROMPT]), cache=cache)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return out


@pytest.fixture(scope="module", params=ARCHS)
def folder(request, tmp_path_factory):
    path, _ = make_hybrid(request.param, tmp_path_factory.mktemp("q") / "ckpt", **QUANT_DIMS)
    return request.param, path


@pytest.mark.parametrize("bits", [4, 8])
def test_same_greedy_tokens_as_mlx_lm_quantized(folder, bits):
    arch, path = folder
    ours = load_model(path, bits=bits)
    theirs, config = mlx_lm_utils.load_model(path)
    mlx_lm_utils.quantize_model(theirs, config, 64, bits)
    assert greedy(ours) == greedy(theirs), arch


def test_recipe_keeps_gates_at_8_bits_and_conv_and_decay_in_float(folder):
    arch, path = folder
    model = load_model(path, bits=4, dtype="bfloat16")  # the GPU's compute dtype
    layer = model.layers[0]
    projection = "in_proj_qkvz" if arch == "qwen3_next" else "in_proj_qkv"
    assert isinstance(getattr(layer.linear_attn, projection), nn.QuantizedLinear)
    assert layer.linear_attn.A_log.dtype == mx.float32
    assert layer.linear_attn.conv1d.weight.dtype == mx.bfloat16  # cast, never quantized
    if arch != "qwen3_5":
        assert layer.mlp.gate.bits == 8 and layer.mlp.shared_expert_gate.bits == 8
        assert layer.mlp.switch_mlp.up_proj.bits == 4


def test_mlx_community_style_folder_loads(folder, tmp_path):
    """What mlx-lm writes (its names, conv layout, shifted norms) loads and decodes alike."""
    arch, path = folder
    theirs, config = mlx_lm_utils.load_model(path)
    _, config = mlx_lm_utils.quantize_model(theirs, config, 64, 4)
    out = tmp_path / "mlx"
    mlx_lm_utils.save_model(out, theirs)
    mlx_lm_utils.save_config(config, out / "config.json")
    assert greedy(load_model(out)) == greedy(theirs), arch


def test_convert_writes_a_folder_that_loads_and_keeps_mtp(tmp_path):
    from hybrid_checkpoints import hf_model, save_released
    from safetensors.numpy import load_file, save_file

    from qwen3_chat.weights.convert import convert

    src = save_released(hf_model("qwen3_5_moe", **QUANT_DIMS), "qwen3_5_moe", tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["mtp.fc.weight"] = np.full((128, 256), 0.5, np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    out = convert(src, tmp_path / "out", 4)
    reloaded = load_model(out)
    assert greedy(reloaded) == greedy(load_model(src, bits=4))
    theirs, _ = mlx_lm_utils.load_model(out)  # an MLX-community-compatible folder
    assert greedy(theirs) == greedy(reloaded)
    np.testing.assert_array_equal(np.array(reloaded.mtp_weights["mtp.fc.weight"]), 0.5)
