"""Parity with mlx-lm (our reference implementation) on the same random weights."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import YARN, build, hf_weights, tiny_config, tokens


def reference(cfg: dict, seed: int = 0):
    mod = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    weights = {k: mx.array(v) for k, v in hf_weights(cfg, seed).items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


@pytest.mark.parametrize(
    "cfg",
    [tiny_config(), tiny_config(moe=True), tiny_config(tie_word_embeddings=True),
     tiny_config(rope_scaling=YARN)],
    ids=["dense", "moe", "tied", "dense-yarn"],
)  # fmt: skip
def test_logits_match_mlx_lm(cfg):
    x = tokens(120)
    ours, ref = build(cfg)(x), reference(cfg)(x)
    diff = float(mx.abs(ours - ref).max())
    assert diff < 1e-4, diff


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cached_decode_matches_mlx_lm(moe):
    from mlx_lm.models.cache import make_prompt_cache

    cfg = tiny_config(moe=moe)
    ours, ref = build(cfg), reference(cfg)
    x = tokens(40)
    oc, rc = ours.make_cache(), make_prompt_cache(ref)
    np.testing.assert_allclose(ours(x[:, :32], cache=oc), ref(x[:, :32], cache=rc), atol=1e-4)
    for i in range(32, 40):
        a, b = ours(x[:, i : i + 1], cache=oc), ref(x[:, i : i + 1], cache=rc)
        np.testing.assert_allclose(a, b, atol=1e-4)
