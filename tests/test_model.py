"""The model itself: config parsing, cache consistency, MoE vs a naive reference, YaRN."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import YARN, build, hf_weights, tiny_config, tokens

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.models.config import ModelConfig
from qwen3_chat.models.moe import SparseMoeBlock
from qwen3_chat.models.rope import make_rope


@pytest.mark.parametrize("name", ["config.json", "Qwen3-30B-A3B/config.json"])
def test_real_configs_parse(qwen3_tokenizer_dir, name):
    raw = json.loads((qwen3_tokenizer_dir / name).read_text())
    cfg = ModelConfig.from_dict(raw)
    assert cfg.head_dim == raw["head_dim"]
    assert cfg.is_moe == (raw["model_type"] == "qwen3_moe")
    if cfg.is_moe:
        assert (cfg.num_experts, cfg.num_experts_per_tok) == (128, 8)
        assert all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert cfg.tie_word_embeddings == raw["tie_word_embeddings"]


def test_unknown_keys_ignored_and_bad_type_rejected():
    cfg = ModelConfig.from_dict({**tiny_config(), "some_future_key": 3})
    assert cfg.hidden_size == 64
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'"):
        ModelConfig.from_dict({**tiny_config(), "model_type": "llama"})
    with pytest.raises(ModelLoadError, match="missing hidden_size"):
        ModelConfig.from_dict({k: v for k, v in tiny_config().items() if k != "hidden_size"})


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_full_forward_equals_chunked_and_token_by_token(moe):
    model = build(tiny_config(moe=moe))
    x = tokens(80)
    full = model(x)
    assert full.shape == (1, 80, 512)
    cache = model.make_cache()
    parts = [model(x[:, :30], cache=cache), model(x[:, 30:70], cache=cache)]
    parts += [model(x[:, i : i + 1], cache=cache) for i in range(70, 80)]
    assert cache[0].offset == 80
    np.testing.assert_allclose(mx.concatenate(parts, axis=1), full, atol=1e-4)


def test_cache_trim_then_refeed_matches():
    model = build(tiny_config())
    x = tokens(40)
    full = model(x)
    cache = model.make_cache()
    model(x[:, :40], cache=cache)
    assert cache[0].trim(15) == 15 and cache[0].offset == 25
    for c in cache[1:]:
        c.trim(15)
    again = model(x[:, 25:], cache=cache)
    np.testing.assert_allclose(again, full[:, 25:], atol=1e-4)
    assert cache[0].trim(1000) == 40  # never below zero


def test_cache_grows_past_its_step():
    model = build(tiny_config())
    cache = model.make_cache()
    x = tokens(300)
    model(x[:, :250], cache=cache)
    out = model(x[:, 250:], cache=cache)  # crosses the 256-token allocation step
    np.testing.assert_allclose(out, model(x)[:, 250:], atol=1e-4)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_last_only_is_last_row(moe):
    model = build(tiny_config(moe=moe))
    x = tokens(17)
    np.testing.assert_allclose(model(x, last_only=True)[:, 0], model(x)[:, -1], atol=1e-5)


def naive_moe(block: SparseMoeBlock, x: np.ndarray, cfg: dict, w: dict, layer: int) -> np.ndarray:
    """Every expert computed densely on every token, combined with the router's weights."""
    p = f"model.layers.{layer}.mlp."
    logits = x @ w[p + "gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    k = cfg["num_experts_per_tok"]
    top = np.argsort(-probs, axis=-1)[..., :k]
    weights = np.zeros_like(probs)
    np.put_along_axis(weights, top, np.take_along_axis(probs, top, -1), -1)
    if cfg["norm_topk_prob"]:
        weights /= weights.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for e in range(cfg["num_experts"]):
        q = f"{p}experts.{e}."
        g, u = x @ w[q + "gate_proj.weight"].T, x @ w[q + "up_proj.weight"].T
        y = ((g / (1 + np.exp(-g))) * u) @ w[q + "down_proj.weight"].T
        out += weights[..., e : e + 1] * y
    return out


@pytest.mark.parametrize("n_tokens", [3, 100], ids=["decode-path", "sorted-prefill-path"])
@pytest.mark.parametrize("norm_topk", [True, False])
def test_moe_block_equals_naive_every_expert_reference(n_tokens, norm_topk):
    cfg = tiny_config(moe=True, norm_topk_prob=norm_topk)
    model = build(cfg)
    w = hf_weights(cfg)
    x = np.random.default_rng(2).standard_normal((1, n_tokens, 64)).astype(np.float32)
    block = model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock)
    ours = block(mx.array(x))
    np.testing.assert_allclose(ours, naive_moe(block, x, cfg, w, 0), atol=1e-4)


def test_sparse_step_and_mlp_only_layers_make_dense_layers():
    cfg = tiny_config(moe=True, num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    model = build(cfg)
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["MLP", "SparseMoeBlock", "MLP", "MLP"]


def test_tied_embeddings_use_the_embedding_matrix():
    cfg = tiny_config(tie_word_embeddings=True)
    model = build(cfg)
    assert "lm_head" not in model
    h = model.model(tokens(5), None)
    expected = model.model.norm(h) @ model.model.embed_tokens.weight.T
    np.testing.assert_allclose(model(tokens(5)), expected, atol=1e-4)


def test_yarn_changes_frequencies_and_scales_attention():
    plain = make_rope(ModelConfig.from_dict(tiny_config()))
    yarn = make_rope(ModelConfig.from_dict(tiny_config(rope_scaling=YARN)))
    assert yarn.mscale == pytest.approx(0.1 * np.log(4.0) + 1.0)
    x = mx.ones((1, 1, 8, 16))
    assert not np.allclose(plain(x, offset=100), yarn(x, offset=100))


def test_moe_model_applies_the_same_yarn_rope_as_dense():
    dense = build(tiny_config(rope_scaling=YARN))
    moe = build(tiny_config(moe=True, rope_scaling=YARN))
    x = mx.array(np.random.default_rng(3).standard_normal((1, 4, 12, 16)).astype(np.float32))
    d_rope, m_rope = dense.layers[0].self_attn.rope, moe.layers[0].self_attn.rope
    np.testing.assert_array_equal(d_rope(x, offset=50), m_rope(x, offset=50))
    assert m_rope.mscale != 1.0
    # And the attention blocks, given the same weights, agree.
    moe.layers[0].self_attn.update(dense.layers[0].self_attn.parameters())
    h = mx.array(np.random.default_rng(4).standard_normal((1, 12, 64)).astype(np.float32))
    np.testing.assert_allclose(
        moe.layers[0].self_attn(h, None), dense.layers[0].self_attn(h, None), atol=1e-5
    )
