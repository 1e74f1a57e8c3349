"""Loading real safetensors folders: layouts, quantization, and every bad-input error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import hf_weights, make_checkpoint, tiny_config
from mlx_lm.utils import load_model as mlx_lm_load
from mlx_lm.utils import quantize_model as mlx_lm_quantize
from test_model import build, tokens

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.loader import load_model, save_model
from qwen3_chat.quantize import quantize_model

# Quantization needs input dims divisible by the group size (64).
QCFG = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_single_and_sharded_load_match_direct_build(tmp_path, moe):
    cfg = tiny_config(moe=moe)
    one = load_model(make_checkpoint(tmp_path / "one", cfg))
    three = load_model(make_checkpoint(tmp_path / "three", cfg, shards=3))
    x = tokens(12)
    expected = build(cfg)(x)
    np.testing.assert_array_equal(one(x), expected)
    np.testing.assert_array_equal(three(x), expected)
    assert one.model.embed_tokens.weight.dtype == mx.float32  # CPU computes in float32


def greedy(model, x: mx.array, steps: int = 32) -> list[int]:
    out = []
    for _ in range(steps):
        t = mx.argmax(model(x)[:, -1], axis=-1)
        out.append(int(t.item()))
        x = mx.concatenate([x, t[:, None]], axis=1)
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_quantized_matches_mlx_lm_greedy_32_steps(tmp_path, moe, bits):
    path = make_checkpoint(tmp_path / "m", tiny_config(moe=moe, **QCFG))
    ours = load_model(path, bits=bits)
    ref, ref_cfg = mlx_lm_load(Path(path))
    mlx_lm_quantize(ref, ref_cfg, 64, bits)
    x = tokens(10)
    assert greedy(ours, x) == greedy(ref, x)
    assert float(mx.abs(ours(x) - ref(x)).max()) < 1e-4
    full = load_model(path)
    # Quantization error stays small relative to the float model's logits.
    rel = float(mx.abs(ours(x) - full(x)).mean() / mx.abs(full(x)).mean())
    assert rel < (0.35 if bits == 4 else 0.03), rel
    if moe:
        assert ours.layers[0].mlp.gate.bits == 8  # the router stays at 8 bits


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_prequantized_folder_round_trip(tmp_path, moe):
    cfg = tiny_config(moe=moe, **QCFG)
    src = make_checkpoint(tmp_path / "src", cfg)
    model = load_model(src)
    block = quantize_model(model, 4)
    out = save_model(model, {**cfg, "quantization": block}, tmp_path / "q4")
    x = tokens(9)
    np.testing.assert_array_equal(load_model(out)(x), load_model(src, bits=4)(x))
    ref, _ = mlx_lm_load(Path(out))  # mlx-lm reads our folder too
    assert float(mx.abs(ref(x) - load_model(out)(x)).max()) < 1e-4


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "m", tiny_config())


def test_missing_folder_and_config(tmp_path, ckpt):
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(tmp_path / "nope")
    (ckpt / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json: no such file"):
        load_model(ckpt)


def test_bad_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: not valid JSON"):
        load_model(ckpt)


def test_unsupported_model_type(ckpt):
    (ckpt / "config.json").write_text(json.dumps({**tiny_config(), "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'"):
        load_model(ckpt)


def test_no_weights_and_pickle_only(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        load_model(ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ModelLoadError, match="pickle weights .* safetensors only"):
        load_model(ckpt)


def test_index_names_missing_shard(tmp_path):
    path = make_checkpoint(tmp_path / "m", tiny_config(), shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="lists model-00002-of-00002.safetensors, which is"):
        load_model(path)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="model.safetensors: truncated safetensors file"):
        load_model(ckpt)


def test_garbage_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors: corrupt safetensors header"):
        load_model(ckpt)


def _rewrite(path: Path, change) -> None:
    w = hf_weights(tiny_config())
    change(w)
    shutil.rmtree(path)
    make_checkpoint(path, tiny_config(), weights=w)


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda w: w.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ModelLoadError, match="missing tensor model.layers.1.self_attn.k_norm"):
        load_model(ckpt)


def test_extra_tensor(ckpt):
    _rewrite(ckpt, lambda w: w.update({"model.layers.0.surprise": np.zeros(3, np.float32)}))
    with pytest.raises(
        ModelLoadError, match="model.safetensors: unexpected tensor model.layers.0.surprise"
    ):
        load_model(ckpt)


def test_wrong_shape(ckpt):
    key = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(ckpt, lambda w: w.update({key: np.zeros((64, 32), np.float32)}))
    with pytest.raises(ModelLoadError, match=rf"{key} has shape \(64, 32\), expected \(64, 64\)"):
        load_model(ckpt)


def test_missing_expert(tmp_path):
    cfg = tiny_config(moe=True)
    w = hf_weights(cfg)
    del w["model.layers.0.mlp.experts.5.up_proj.weight"]
    path = make_checkpoint(tmp_path / "m", cfg, weights=w)
    with pytest.raises(ModelLoadError, match=r"up_proj.weight missing for experts \[5\]"):
        load_model(path)
