"""Quantization: on-load 4/8-bit vs mlx-lm, pre-quantized folders (ours, mlx-lm's), save_model."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import make_checkpoint, tiny_config, tokens
from mlx_lm.utils import load_model as mlx_lm_load
from mlx_lm.utils import quantize_model as mlx_lm_quantize
from mlx_lm.utils import save_config as mlx_lm_save_config
from mlx_lm.utils import save_model as mlx_lm_save_model

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.models.moe import QuantizedSwitchLinear
from qwen3_chat.weights.loader import load, load_model, save_model
from qwen3_chat.weights.quantize import quantize_model

# Quantization needs input dims divisible by the group size (64).
QCFG = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64}


def qconfig(moe: bool, **overrides) -> dict:
    return tiny_config(moe=moe, **{**QCFG, **overrides})


def greedy(model, x: mx.array, steps: int = 32) -> list[int]:
    out = []
    for _ in range(steps):
        t = mx.argmax(model(x)[:, -1], axis=-1)
        out.append(int(t.item()))
        x = mx.concatenate([x, t[:, None]], axis=1)
    return out


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a - b).max())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_quantized_on_load_matches_mlx_lm(tmp_path, moe, bits, tied):
    path = make_checkpoint(tmp_path / "m", qconfig(moe, tie_word_embeddings=tied))
    ours = load_model(path, bits=bits)
    ref, ref_cfg = mlx_lm_load(Path(path))
    assert ours.config.quantization["bits"] == bits  # what `qwen3 convert` saves
    mlx_lm_quantize(ref, ref_cfg, 64, bits)
    x = tokens(10)
    assert greedy(ours, x) == greedy(ref, x)
    assert max_diff(ours(x), ref(x)) < 1e-4
    full = load_model(path)
    # Quantization error stays small relative to the float model's logits.
    rel = float(mx.abs(ours(x) - full(x)).mean() / mx.abs(full(x)).mean())
    assert rel < (0.35 if bits == 4 else 0.03), rel


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_quantize_model_layout_and_block(tmp_path, moe):
    model = load_model(make_checkpoint(tmp_path / "m", qconfig(moe)))
    block = quantize_model(model, 4)
    assert model.config.quantization == block  # recorded for save_model
    assert {k: block[k] for k in ("group_size", "bits", "mode")} == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
    }
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.lm_head, nn.QuantizedLinear) and model.lm_head.bits == 4
    layer = model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(layer.input_layernorm, nn.RMSNorm)  # norms stay float
    assert isinstance(layer.self_attn.k_norm, nn.RMSNorm)
    if moe:
        assert isinstance(layer.mlp.switch_mlp.up_proj, QuantizedSwitchLinear)
        assert layer.mlp.switch_mlp.up_proj.bits == 4
        for i in range(2):  # the router stays at 8 bits, and the config says so
            assert model.layers[i].mlp.gate.bits == 8
            assert block[f"model.layers.{i}.mlp.gate"] == {"group_size": 64, "bits": 8}
    else:
        assert set(block) == {"group_size", "bits", "mode"}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_save_model_folder_round_trip(tmp_path, moe):
    cfg = qconfig(moe)
    src = make_checkpoint(tmp_path / "src", cfg)
    model = load_model(src)
    quantize_model(model, 4)
    (tmp_path / "tokenizer.json").write_text("{}")
    # A tiny shard limit forces the sharded layout with an index.
    out = save_model(
        model,
        cfg,
        tmp_path / "q4",
        extra_files=[tmp_path / "tokenizer.json"],
        max_shard_bytes=1 << 16,
    )
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization"] == saved["quantization_config"] == model.config.quantization
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    x = tokens(9)
    loaded = load_model(out)
    np.testing.assert_array_equal(loaded(x), load_model(src, bits=4)(x))
    if moe:
        assert loaded.layers[1].mlp.gate.bits == 8
    ref, _ = mlx_lm_load(Path(out))  # mlx-lm reads our folder too
    assert max_diff(ref(x), loaded(x)) < 1e-4
    with pytest.raises(ModelLoadError, match="q4: exists and is not an empty folder"):
        save_model(model, cfg, out)


def test_mlx_lm_convert_folder_loads(tmp_path, qwen3_tokenizer_dir):
    from mlx_lm.convert import convert

    cfg = qconfig(True)
    src = make_checkpoint(tmp_path / "src", cfg, tokenizer_dir=qwen3_tokenizer_dir)
    out = tmp_path / "mlx-q4"
    convert(str(src), str(out), quantize=True, q_bits=4, q_group_size=64)
    model, tokenizer = load(out)
    assert model.layers[0].mlp.gate.bits == 8 and model.layers[0].mlp.switch_mlp.up_proj.bits == 4
    x = mx.array([tokenizer.encode("Hello, world! Quantized MoE test.")], dtype=mx.int32) % 512
    np.testing.assert_array_equal(model(x), load_model(src, bits=4)(x))
    ref, _ = mlx_lm_load(out)
    assert max_diff(ref(x), model(x)) < 1e-4


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_mixed_precision_folder_from_mlx_lm(tmp_path, moe):
    """Per-layer overrides: some layers at 8 bits, some left float, others at the default."""
    src = make_checkpoint(tmp_path / "src", qconfig(moe))
    ref, ref_cfg = mlx_lm_load(src)

    def predicate(path: str, _module) -> bool | dict:
        if path.endswith("mlp.gate") or "layers.1.self_attn" in path:
            return {"group_size": 64, "bits": 8}
        if path.startswith("model.layers.0.self_attn.v_proj"):
            return False
        return True

    _, qcfg = mlx_lm_quantize(ref, ref_cfg, 64, 4, quant_predicate=predicate)
    out = tmp_path / "mixed"
    mlx_lm_save_model(out, ref)
    mlx_lm_save_config(qcfg, out / "config.json")
    ours = load_model(out)
    assert ours.layers[1].self_attn.k_proj.bits == 8
    assert ours.layers[0].self_attn.k_proj.bits == 4
    assert isinstance(ours.layers[0].self_attn.v_proj, nn.Linear)
    x = tokens(11)
    assert max_diff(ours(x), ref(x)) < 1e-4


def test_unnamed_layer_bits_inferred_from_shapes(tmp_path):
    """A layer stored at 8 bits that the config does not name still loads (shapes decide)."""
    cfg = qconfig(False)
    model = load_model(make_checkpoint(tmp_path / "src", cfg))
    quantize_model(model, 4)
    model.layers[1].mlp.down_proj = nn.QuantizedLinear.from_linear(
        nn.Linear(256, 128, bias=False), 64, 8
    )
    out = save_model(model, cfg, tmp_path / "q")
    loaded = load_model(out)
    assert loaded.layers[1].mlp.down_proj.bits == 8 and loaded.layers[0].mlp.down_proj.bits == 4
    x = tokens(5)
    np.testing.assert_array_equal(loaded(x), model(x))


def _prequantized(tmp_path: Path) -> Path:
    model = load_model(make_checkpoint(tmp_path / "src", qconfig(False)))
    quantize_model(model, 4)
    return save_model(model, qconfig(False), tmp_path / "q4")


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_quantization_errors(tmp_path):
    q4 = _prequantized(tmp_path)
    with pytest.raises(ModelLoadError, match="already quantized"):
        load_model(q4, bits=8)
    with pytest.raises(ModelLoadError, match="bits must be 4 or 8, not 3"):
        load_model(tmp_path / "src", bits=3)
    with pytest.raises(ModelLoadError, match="quantization bits 7"):
        quantize_model(load_model(tmp_path / "src"), 7)
    # The stored tensors are 4-bit: shape validation names the tensor and both shapes.
    bad = {"model.layers.0.self_attn.q_proj": {"group_size": 64, "bits": 5}}
    _edit_config(q4, quantization={"group_size": 64, "bits": 4, **bad})
    key = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ModelLoadError, match=rf"{key} has shape \(64, 16\), expected \(64, 20\)"):
        load_model(q4)
    _edit_config(q4, quantization={"group_size": 64, "bits": 4, "mode": "mxfp4"})
    with pytest.raises(ModelLoadError, match="config.json: quantization mode 'mxfp4'"):
        load_model(q4)
    _edit_config(q4, quantization={"group_size": 64, "bits": 4, "lm_head": {"bits": 12}})
    with pytest.raises(ModelLoadError, match=r"quantization\['lm_head'\]: quantization bits 12"):
        load_model(q4)


def test_hf_quant_method_checkpoint_rejected(tmp_path):
    path = make_checkpoint(tmp_path / "m", tiny_config())
    fp8 = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    _edit_config(path, quantization_config=fp8)
    with pytest.raises(ModelLoadError, match="quant_method 'fp8' checkpoints are not supported"):
        load_model(path)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_quantized_folder_missing_a_packed_weight_names_it(tmp_path, moe):
    """A pre-quantized folder whose .scales is stored but its packed .weight is not."""
    model = load_model(make_checkpoint(tmp_path / "src", qconfig(moe)))
    quantize_model(model, 4)
    out = save_model(model, qconfig(moe), tmp_path / "q4")
    weights = mx.load(str(out / "model.safetensors"))
    key = ("model.layers.1.mlp.switch_mlp.up_proj.weight" if moe
           else "model.layers.1.mlp.up_proj.weight")  # fmt: skip
    del weights[key]
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(ModelLoadError, match=rf"missing tensor {key}"):
        load_model(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_quantizing_in_pieces_gives_the_same_tensors(tmp_path, monkeypatch, moe, dtype):
    """Row chunks read from the file (f32, or bf16 by its bits) and experts quantized one
    by one before stacking give exactly the tensors of quantizing whole matrices, while the
    whole float embedding never sits in memory."""
    from mlx.utils import tree_flatten

    from qwen3_chat.weights import quantize

    src = make_checkpoint(tmp_path / "src", qconfig(moe, vocab_size=8192))
    weights = mx.load(str(src / "model.safetensors"))
    path = tmp_path / dtype
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()})  # fmt: skip
    (path / "config.json").write_text((src / "config.json").read_text())
    embed_bytes = weights["model.embed_tokens.weight"].nbytes  # as float32, as computed
    del weights

    def load_measured() -> tuple[dict, int]:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        model = load_model(path, bits=4, dtype="float32")
        return dict(tree_flatten(model.parameters())), mx.get_peak_memory() - base

    whole, whole_peak = load_measured()
    monkeypatch.setattr(quantize, "CHUNK_BYTES", 64 * 128 * 4)  # 64-row chunks
    pieces, pieces_peak = load_measured()
    assert whole.keys() == pieces.keys()
    for k in whole:
        assert whole[k].dtype == pieces[k].dtype and mx.array_equal(whole[k], pieces[k]), k
    assert whole_peak > embed_bytes > pieces_peak, (whole_peak, embed_bytes, pieces_peak)
