"""Speculation on the hybrid family: prompt lookup over Gated DeltaNet caches, and MTP
drafting with the checkpoint's own `mtp.*` head, from tiny checkpoints transformers builds
and that get random `mtp.*` tensors written into their safetensors in Qwen's layout."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hybrid_checkpoints import fuse_experts, make_hybrid
from safetensors.numpy import load_file, save_file

from qwen3_chat import SamplingParams
from qwen3_chat.engine.generate import TokenStream, cache_offset, generate_tokens
from qwen3_chat.engine.sampling import make_sampler
from qwen3_chat.engine.speculative import Speculation, SpeculationError, make_speculation
from qwen3_chat.models.cache import LinearCache
from qwen3_chat.models.mtp import mtp_head
from qwen3_chat.weights.loader import load_model

pytest.importorskip("torch")

GREEDY = SamplingParams(temperature=0)
RNG = np.random.default_rng(4)
BODY = RNG.integers(0, 256, 30).tolist()
PROMPT = [*BODY, 7, *BODY, 7, *BODY[:4]]  # asks for a copy: lookup drafts from it


def add_mtp(path: Path, *, seed: int = 1, mostly_right: bool = False, damp: float = 0.02) -> Path:
    """Write an `mtp.*` head into the checkpoint as Qwen stores it (zero-centred norms, the
    experts as the main layers store them): its one layer starts as a copy of the last
    (full-attention) layer, every tensor perturbed (random) unless `mostly_right`.

    mostly_right makes drafts mostly right without training: the target's token mixers
    are damped (`damp`: the next token depends mostly on the current one), layers 0-2's
    MLPs are switched off and the embedding rows get unit RMS; then an MTP head with
    fc = [I, 0] (the embedding half only) and the last layer's MLP computes what the
    target will say after the token it is given."""
    f = path / "model.safetensors"
    t = load_file(str(f))
    pre = "model.language_model." if "model.language_model.embed_tokens.weight" in t else "model."
    rng = np.random.default_rng(seed)
    h = t[pre + "embed_tokens.weight"].shape[1]
    last = f"{pre}layers.3."
    head = {"mtp.layers.0." + k[len(last) :]: v.copy() for k, v in t.items() if k.startswith(last)}
    head["mtp.norm.weight"] = t[pre + "norm.weight"].copy()
    if mostly_right:
        for k in list(t):
            if k.endswith(("linear_attn.out_proj.weight", "self_attn.o_proj.weight")):
                t[k] = t[k] * damp
            elif not k.startswith(last) and "down_proj" in k:
                t[k] = t[k] * 0.0
        e = t[pre + "embed_tokens.weight"]
        t[pre + "embed_tokens.weight"] = e / np.sqrt((e**2).mean(axis=1, keepdims=True))
        head["mtp.layers.0.self_attn.o_proj.weight"] *= damp
        fc = np.concatenate([np.eye(h), np.zeros((h, h))], axis=1)
        norms = np.zeros(h)
    else:
        for k, v in head.items():
            head[k] = v + rng.normal(0, 0.3 if v.ndim == 1 else 0.05, v.shape)
        fc = rng.normal(0, 0.08, (h, 2 * h))
        norms = rng.normal(0, 0.3, h)
    head["mtp.fc.weight"] = fc
    head["mtp.pre_fc_norm_embedding.weight"] = norms
    head["mtp.pre_fc_norm_hidden.weight"] = norms[::-1].copy()
    t.update({k: np.asarray(v, dtype=np.float32) for k, v in head.items()})
    save_file(t, str(f), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def next_random(tmp_path_factory):
    """(folder, transformers model, our model): Qwen3-Next-like MoE with a random head."""
    path, hf = make_hybrid("qwen3_next", tmp_path_factory.mktemp("next") / "ckpt")
    return path, hf, load_model(add_mtp(path))


def partial(arch: str, out: Path, damp: float):
    """A model whose drafts (lookup's and the head's) are partly right: the mixers keep
    `damp` of their weight, so the context still changes what it says."""
    path, _ = make_hybrid(arch, out, seed=5)
    return load_model(add_mtp(path, mostly_right=True, damp=damp))


@pytest.fixture(scope="module")
def next_partial(tmp_path_factory):
    return partial("qwen3_next", tmp_path_factory.mktemp("next-p") / "ckpt", 1.0)


@pytest.fixture(scope="module")
def dense_partial(tmp_path_factory):
    """Qwen3.5-like: dense, vision-language layout, separate q/k/v/z projections."""
    return partial("qwen3_5", tmp_path_factory.mktemp("q35-p") / "ckpt", 0.6)


@pytest.fixture(params=["next", "dense"])
def partly_right(request, next_partial, dense_partial):
    return next_partial if request.param == "next" else dense_partial


def plain_tokens(model, prompt: list[int], n: int, params: SamplingParams = GREEDY) -> list[int]:
    stream = generate_tokens(model, prompt, model.make_cache(), make_sampler(params), [])
    out = [t for t, _ in (next(stream) for _ in range(n))]
    stream.close()
    return out


def spec_tokens(spec: Speculation, model, prompt: list[int], n: int, cache=None,
                params: SamplingParams = GREEDY) -> list[int]:  # fmt: skip
    cache = model.make_cache() if cache is None else cache
    assert spec.applies(model, cache), spec.reason
    stream = spec.tokens(model, prompt, cache, params, [], None, 512, TokenStream())
    out = [t for t, _ in (next(stream) for _ in range(n))]
    stream.close()
    return out


# -- 1. speculation on hybrid caches ---------------------------------------------------------
def test_prompt_lookup_on_a_hybrid_cache_is_plain_greedy(partly_right) -> None:
    model = partly_right
    cache = model.make_cache()
    assert any(isinstance(c, LinearCache) for c in cache)
    spec = Speculation("lookup")
    got = spec_tokens(spec, model, PROMPT, 60, cache)
    assert got == plain_tokens(model, PROMPT, 60)
    # Drafts were partly kept and partly rejected: the linear layers went back mid-forward.
    assert 0 < spec.stats.accepted < spec.stats.drafted, spec.stats
    assert len({c.offset for c in cache}) == 1 and cache_offset(cache) <= len(PROMPT) + 60
    assert all(not c.snapshot_at and not c.marked for c in cache if isinstance(c, LinearCache))


# -- 2. the MTP head -------------------------------------------------------------------------
def test_the_mtp_head_matches_a_transformers_reference(next_random) -> None:
    """vLLM's formula (qwen3_next_mtp.py) on transformers' own decoder layer and norms."""
    import torch
    from transformers.models.qwen3_next import modeling_qwen3_next as ref

    path, hf, model = next_random
    stored = load_file(str(path / "model.safetensors"))
    cfg = hf.config
    layer = ref.Qwen3NextDecoderLayer(cfg, 3).float().eval()  # layer 3: full attention, MoE
    # transformers holds the experts fused, as Qwen3.5-MoE stores them.
    mine = fuse_experts({k[len("mtp.") :]: v for k, v in stored.items()
                         if k.startswith("mtp.layers.0.")}, cfg.num_experts)  # fmt: skip
    layer.load_state_dict({k[len("layers.0.") :]: torch.tensor(v) for k, v in mine.items()})

    def norm(name: str) -> torch.nn.Module:
        n = ref.Qwen3NextRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        n.load_state_dict({"weight": torch.tensor(stored[f"mtp.{name}.weight"])})
        return n

    ids = PROMPT[:24]
    with torch.no_grad():
        h = hf.model(input_ids=torch.tensor([ids])).last_hidden_state[:, :-1]  # after model.norm
        e = hf.model.embed_tokens(torch.tensor([ids[1:]]))
        x = torch.cat([norm("pre_fc_norm_embedding")(e), norm("pre_fc_norm_hidden")(h)], -1)
        x = x @ torch.tensor(stored["mtp.fc.weight"]).T
        pos = torch.arange(x.shape[1])[None]
        cos_sin = hf.model.rotary_emb(x, pos)
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
        out = layer(x, position_embeddings=cos_sin, attention_mask=mask, position_ids=pos)
        out = out[0] if isinstance(out, tuple) else out
        want = hf.lm_head(norm("norm")(out))[0].numpy()

    logits, hidden = model(mx.array([ids]), return_hidden=True)
    head = mtp_head(model)
    g = head(model.model.embed_tokens(mx.array([ids[1:]])), hidden[:, :-1], head.make_cache())
    got = np.array(model.project(g)[0])
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_hidden_states_come_from_the_same_forward(dense_partial) -> None:
    model = dense_partial
    ids = mx.array([PROMPT[:20]])
    plain = model(ids, cache=model.make_cache(), last_only=True)
    logits, hidden = model(ids, cache=model.make_cache(), last_only=True, return_hidden=True)
    assert hidden.shape == (1, 20, model.config.hidden_size)
    assert np.allclose(np.array(logits), np.array(plain), atol=1e-5)
    assert np.allclose(np.array(model.project(hidden[:, -1:])), np.array(plain), atol=1e-5)


# -- 3 and 4. MTP drafting ----------------------------------------------------------------
def test_a_random_head_drafts_and_the_tokens_stay_plain_greedy(next_random) -> None:
    model = next_random[2]
    spec = make_speculation("mtp")
    assert spec_tokens(spec, model, PROMPT, 50) == plain_tokens(model, PROMPT, 50)
    assert spec.stats.method == "mtp" and spec.stats.drafted > 0


def test_partly_right_mtp_drafts_give_plain_greedy_tokens(partly_right) -> None:
    spec = make_speculation("mtp")
    cache = partly_right.make_cache()
    got = spec_tokens(spec, partly_right, PROMPT, 60, cache)
    assert got == plain_tokens(partly_right, PROMPT, 60)
    assert 0 < spec.stats.accepted < spec.stats.drafted, spec.stats  # some went back
    assert all(not c.marked for c in cache if isinstance(c, LinearCache))


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_a_mostly_right_head_is_mostly_accepted_and_exact(arch, tmp_path) -> None:
    model = partial(arch, tmp_path / "ckpt", 0.3)
    spec = make_speculation("auto")  # auto picks the head when there is one
    cache = model.make_cache()
    got = spec_tokens(spec, model, PROMPT, 60, cache)
    assert got == plain_tokens(model, PROMPT, 60)
    assert spec.stats.method == "mtp"
    assert spec.stats.accepted > spec.stats.drafted // 2, spec.stats
    assert spec.stats.tokens_per_step > 1.5
    assert all(not c.marked for c in cache if isinstance(c, LinearCache))


def test_a_quantized_model_drafts_with_a_quantized_head(tmp_path) -> None:
    import mlx.nn as nn

    from qwen3_chat.weights.loader import save_model

    path, _ = make_hybrid("qwen3_next", tmp_path / "ckpt", seed=6)
    loaded = load_model(add_mtp(path, mostly_right=True), bits=8)
    # What `qwen3 convert --bits 8` writes: the head's tensors kept as stored, beside.
    model = load_model(save_model(loaded, None, tmp_path / "q8"))
    assert model.config.quantization and isinstance(mtp_head(model).fc, nn.QuantizedLinear)
    spec = make_speculation("mtp")
    assert spec_tokens(spec, model, PROMPT, 30) == plain_tokens(model, PROMPT, 30)
    assert spec.stats.accepted > 0


def forcing():
    """An override (the thinking budget's role) replacing a few tokens by a forced run."""
    calls = []

    def override(token: int) -> list[int] | None:
        calls.append(token)
        return [5, 6, 7] if len(calls) in (3, 9, 10, 20) else None

    return override


def test_forced_runs_with_mtp_drafts_match_plain(next_partial) -> None:
    model = next_partial
    plain = generate_tokens(model, PROMPT, model.make_cache(), make_sampler(GREEDY), [],
                            forcing())  # fmt: skip
    want = [next(plain)[0] for _ in range(50)]
    spec = make_speculation("mtp")
    stream = spec.tokens(model, PROMPT, model.make_cache(), GREEDY, [], forcing(), 512,
                         TokenStream())  # fmt: skip
    got = [next(stream)[0] for _ in range(50)]
    stream.close()
    assert got == want and got.count(6) >= 3 and spec.stats.accepted > 0


def test_stopping_mid_step_leaves_every_layer_as_if_only_the_output_was_fed(next_partial):
    """A stop (or Ctrl-C) right after a kept draft: the cache goes back to what was handed
    out, and the linear layers' states equal a fresh prefill of exactly that text."""
    model = next_partial
    for n in (7, 12, 23):
        cache = model.make_cache()
        spec = make_speculation("mtp")
        stream = spec.tokens(model, PROMPT, cache, GREEDY, [], None, 512, TokenStream())
        out = [next(stream)[0] for _ in range(n)]
        stream.close()
        fresh = model.make_cache()
        model(mx.array([[*PROMPT, *out]]), cache=fresh)
        mx.eval([c.state for c in fresh])
        for c, f in zip(cache, fresh, strict=True):
            assert c.offset == f.offset == len(PROMPT) + n
            if isinstance(c, LinearCache):
                assert np.allclose(np.array(c.recurrent), np.array(f.recurrent), atol=1e-4)
                assert np.allclose(np.array(c.conv), np.array(f.conv), atol=1e-5)
                assert not c.marked and not c.snapshot_at


def test_sampled_mtp_is_reproducible_and_keeps_the_target_distribution(next_partial) -> None:
    """Rejection sampling with the head's q: the second token (a kept draft or a residual
    draw whenever the head drafted) follows the target's own distribution given the first
    (chi-squared over seeds, on the runs whose first token is the most common one)."""
    from qwen3_chat.engine.verify import Verifier

    model = next_partial
    prompt = PROMPT[:8]

    def params(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_p=1.0, top_k=3, min_p=0.0, seed=seed)

    a = spec_tokens(make_speculation("mtp"), model, prompt, 12, params=params(1))
    assert a == spec_tokens(make_speculation("mtp"), model, prompt, 12, params=params(1))
    pairs = []
    drafted = 0
    for seed in range(400):
        spec = make_speculation("mtp")
        pairs.append(spec_tokens(spec, model, prompt, 2, params=params(100 + seed)))
        drafted += spec.stats.drafted
    assert drafted > 300  # the second token was verified against drafts, not sampled plainly
    first = max({p[0] for p in pairs}, key=[p[0] for p in pairs].count)
    seconds = [p[1] for p in pairs if p[0] == first]
    logits = model(mx.array([[*prompt, first]]))[0, -1:]
    p = np.array(Verifier(params(0)).probs(logits))[0]
    counts = np.bincount(seconds, minlength=p.size).astype(float)
    keep = p > 0
    assert counts[~keep].sum() == 0
    expected = len(seconds) * p[keep]
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert len(seconds) > 100 and chi2 < 13.8  # df = 2 (top-k 3), p = 0.001


# -- the CLI ---------------------------------------------------------------------------------
def test_cli_speculate_mtp_without_a_head_is_one_line_and_exit_2() -> None:
    from typer.testing import CliRunner

    from qwen3_chat.cli.app import app

    r = CliRunner().invoke(app, ["chat", "-m", "demo", "--speculate", "mtp", "2+2?"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "MTP head" in lines[0] and "Traceback" not in r.output


def test_stats_report_mtp(next_partial, tiny) -> None:
    """What --json prints and /stats shows: GenerationStats.speculation."""
    from qwen3_chat.cli.render import speculation_line
    from qwen3_chat.engine.events import Finished
    from qwen3_chat.engine.generate import stream_generate

    _, tok = tiny  # the real tokenizer reads the tiny vocabulary's ids too (bytes)
    events = list(stream_generate(next_partial, tok, PROMPT, sampling=GREEDY, max_tokens=20,
                                  speculation=make_speculation("mtp")))  # fmt: skip
    stats = [e for e in events if isinstance(e, Finished)][0].stats
    assert stats.speculation["method"] == "mtp" and stats.speculation["drafted"] > 0
    assert speculation_line(stats).startswith("speculation (mtp): ")


def test_a_head_that_does_not_fit_is_said_once_and_decoding_goes_on(tmp_path) -> None:
    from qwen3_chat.errors import ModelLoadError

    path, _ = make_hybrid("qwen3_next", tmp_path / "ckpt", seed=7)
    f = add_mtp(path) / "model.safetensors"
    t = load_file(str(f))
    t["mtp.fc.weight"] = t["mtp.fc.weight"][:, :10]  # not [H, 2H]
    save_file(t, str(f), metadata={"format": "pt"})
    model = load_model(path)
    with pytest.raises(ModelLoadError, match="MTP head"):
        make_speculation("mtp").check_mtp(model)
    for method in ("mtp", "auto"):
        spec = make_speculation(method)
        assert not spec.applies(model, model.make_cache()) and "MTP head" in spec.reason


def test_make_speculation_knows_mtp() -> None:
    assert make_speculation("mtp").method == "mtp"
    with pytest.raises(SpeculationError):
        make_speculation("mtp", "some-draft")


def test_a_chat_session_with_mtp_says_what_it_says_without(qwen3_tokenizer_dir, tmp_path):
    """Turns, a thinking budget's forced closing and /retry on a hybrid with a head: the
    session's own snapshots (requested inside the prompt) survive the drafts' kept states."""
    from qwen3_chat import ChatSession
    from qwen3_chat.engine.events import Finished
    from qwen3_chat.weights.loader import load

    path, _ = make_hybrid("qwen3_next", tmp_path / "ckpt", seed=8,
                          tokenizer_dir=qwen3_tokenizer_dir, vocab_size=151936,
                          tie_word_embeddings=False)  # fmt: skip
    model, tok = load(add_mtp(path, mostly_right=True, damp=0.3))

    def run(speculation) -> list[tuple[list[int], int, dict | None]]:
        s = ChatSession(model, tok, sampling=GREEDY, max_tokens=12, budget=6)
        s.speculation = speculation
        out = []
        for turn in (lambda: s.send("Hello there"), lambda: s.send("And again?"), s.retry):
            done = [e for e in turn() if isinstance(e, Finished)][0]
            out.append((done.token_ids, done.stats.prefill_tokens, done.stats.speculation))
        assert s.snapshots.points  # the session still has its rewind points
        return out

    plain, spec = run(None), run(make_speculation("auto"))
    # The same tokens, and the same prefills: turn 2 and the retry resumed from the same
    # snapshots.
    assert [t[:2] for t in spec] == [t[:2] for t in plain]
    assert all(sp["method"] == "mtp" for *_, sp in spec)
    assert sum(sp["accepted"] for *_, sp in spec) > 0
