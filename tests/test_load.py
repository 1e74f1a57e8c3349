"""Loading real safetensors folders: layouts, dtype, memory, and every bad-input error.

Quantized loading and pre-quantized folders are in test_quantize.py.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build, hf_weights, make_checkpoint, tiny_config, tokens
from mlx.utils import tree_flatten

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.weights.loader import load, load_model


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


def test_mismatched_expert_shape(tmp_path):
    cfg = tiny_config(moe=True)
    w = hf_weights(cfg)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    w[key] = np.zeros((64, 16), np.float32)
    path = make_checkpoint(tmp_path / "m", cfg, weights=w)
    with pytest.raises(
        ModelLoadError, match=rf"model.safetensors: tensor {key} has shape \(64, 16\), expected"
    ):
        load_model(path)


def _header(entries: object, data: bytes = b"") -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "content, message",
    [
        (_header({"a": 5}), "corrupt safetensors header entry for tensor a"),
        (_header({"a": {"dtype": "F32", "shape": [1]}}), "corrupt safetensors header entry"),
        (_header({"a": {"dtype": "F32", "data_offsets": ["0", 4]}}), "corrupt safetensors header"),
        (_header([1, 2]), "corrupt safetensors header"),
        (b"", "truncated safetensors file"),
        (
            _header({"a": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "cannot read safetensors",
        ),
        (
            _header({"a": {"dtype": "F32", "shape": [64], "data_offsets": [0, 4]}}, b"\0" * 4),
            "cannot read safetensors",
        ),
    ],
    ids=["int-entry", "no-offsets", "str-offsets", "list", "empty", "dtype", "size"],
)
def test_malformed_shard(tmp_path, content, message):
    path = make_checkpoint(tmp_path / "m", tiny_config(), shards=2)
    (path / "model-00002-of-00002.safetensors").write_bytes(content)
    with pytest.raises(ModelLoadError, match=f"model-00002-of-00002.safetensors: {message}"):
        load_model(path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", 7])
def test_index_cannot_point_outside_the_folder(tmp_path, shard):
    path = make_checkpoint(tmp_path / "m", tiny_config(), shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json: "):
        load_model(path)


def test_dtype_override(ckpt):
    model = load_model(ckpt, dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert model.layers[0].input_layernorm.weight.dtype == mx.bfloat16
    assert load_model(ckpt, dtype=mx.float16).lm_head.weight.dtype == mx.float16
    with pytest.raises(ModelLoadError, match="dtype must be one of"):
        load_model(ckpt, dtype="int8")


def test_quantized_load_peak_memory_near_quantized_size(tmp_path):
    """Float tensors are released layer by layer: peak stays far below float + quantized."""
    cfg = tiny_config(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=8, vocab_size=2048, head_dim=64
    )
    path = make_checkpoint(tmp_path / "m", cfg)
    float_bytes = (path / "model.safetensors").stat().st_size
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()  # models other tests keep alive are not this load's
    model = load_model(path, bits=4)
    quant_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    peak = mx.get_peak_memory() - base
    # Largest float tensors (embedding, lm_head) are transiently materialised, never all at once.
    assert peak < quant_bytes + 0.35 * float_bytes, (peak, quant_bytes, float_bytes)


def test_load_returns_the_real_tokenizer(tmp_path, qwen3_tokenizer_dir):
    path = make_checkpoint(tmp_path / "m", tiny_config(), tokenizer_dir=qwen3_tokenizer_dir)
    model, tokenizer = load(path)
    ids = tokenizer.encode("Hello world")
    assert ids and tokenizer.decode(ids) == "Hello world"
    assert model(mx.array([ids], dtype=mx.int32) % 512).shape == (1, len(ids), 512)


def test_wrong_dtype(ckpt):
    key = "model.layers.0.input_layernorm.weight"
    _rewrite(ckpt, lambda w: w.update({key: np.ones(64, np.int32)}))
    with pytest.raises(ModelLoadError, match=rf"{key} has dtype mlx.core.int32, expected a float"):
        load_model(ckpt)


def test_json_files_one_clear_error_and_atomic_writes(tmp_path):
    import os
    import stat

    from qwen3_chat.files import read_json, write_json

    with pytest.raises(ModelLoadError, match=r"nope\.json: no such file"):
        read_json(tmp_path / "nope.json", error=ModelLoadError)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match=r"bad\.json: not valid JSON"):
        read_json(tmp_path / "bad.json", error=ModelLoadError)
    with pytest.raises(ModelLoadError, match="is a folder"):
        read_json(tmp_path, error=ModelLoadError)
    target = write_json(tmp_path / "state" / "s.json", {"a": "é"}, mode=0o600)
    assert read_json(target) == {"a": "é"} and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    with pytest.raises(TypeError):
        write_json(target, {"a": object()})  # a failed write leaves the old content whole
    assert read_json(target) == {"a": "é"} and os.listdir(target.parent) == ["s.json"]
