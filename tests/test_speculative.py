"""Speculative decoding (engine.speculative): greedy output identical to plain decoding on
copy-heavy prompts with several tokens per target step; the thinking budget's forced
tokens, stop tokens, penalties, the context limit and Ctrl-C behave as in plain decoding;
at temperature > 0 the emitted tokens follow the target distribution (chi-square on a
tiny vocabulary, fixed seeds), for prompt lookup and for a drafter with its own q."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build, tiny_config

from qwen3_chat import SamplingParams
from qwen3_chat.engine.events import Finished
from qwen3_chat.engine.generate import (
    TokenStream,
    cache_offset,
    generate_tokens,
    prefill,
    stream_generate,
)
from qwen3_chat.engine.sampling import make_sampler
from qwen3_chat.engine.speculative import (
    DraftLength,
    PromptLookup,
    SpecStats,
    Speculation,
    Verifier,
)
from qwen3_chat.models.cache import KVCache, LinearCache

GREEDY = SamplingParams(temperature=0)
CODE = (
    "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n\n\n"
    "class Calculator:\n    def run(self, op, a, b):\n        return op(a, b)\n"
)
PROMPT = f"<|im_start|>user\nRepeat this code exactly:\n{CODE}<|im_end|>\n<|im_start|>assistant\n"


def final(events) -> Finished:
    return [e for e in events if isinstance(e, Finished)][0]


def test_prompt_lookup_proposes_the_latest_continuation() -> None:
    look = PromptLookup(max_ngram=3, min_ngram=2)
    look.extend([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 1, 2])
    assert look.propose(3) == [3, 5, 6]  # the latest earlier "1 2", not the first one
    look.extend([3])
    assert look.propose(2) == [5, 6]  # "1 2 3" (the longer match) continues with 5
    assert look.propose(0) == [] and PromptLookup().propose(4) == []
    look.extend([42])
    assert look.propose(4) == []  # "3 42" was never seen


def test_draft_length_grows_on_full_acceptance_and_falls_after_a_miss() -> None:
    n = DraftLength(length=4, low=1, high=10)
    n.update(4, 4)
    assert n.length == 6
    n.update(6, 1)
    assert n.length == 2
    n.update(0, 0)  # nothing drafted: no evidence either way
    assert n.length == 2 and n.next() == 2
    n.update(2, 0)  # a complete miss: pause one step, then two, then four...
    assert [n.next() for _ in range(2)] == [0, 1]
    n.update(1, 0)
    assert [n.next() for _ in range(3)] == [0, 0, 1]
    n.update(1, 1)  # a hit ends the backoff
    n.update(3, 0)
    assert [n.next() for _ in range(2)] == [0, 1] and n.backoff == 2


def tokens_of(stream, n: int) -> list[int]:
    out = [t for t, _ in (next(stream) for _ in range(n))]
    stream.close()
    return out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_greedy_tokens_are_plain_greedy_on_a_copy_heavy_prompt(moe: bool) -> None:
    model = build(tiny_config(moe=moe))
    body = np.random.default_rng(3).integers(0, 512, 40).tolist()
    prompt = [*body, 7, *body, 7, *body[:5]]  # the model is asked to continue a copy
    plain = tokens_of(generate_tokens(model, prompt, model.make_cache(),
                                      make_sampler(GREEDY), []), 80)  # fmt: skip
    spec = Speculation()
    cache = model.make_cache()
    got = tokens_of(spec.tokens(model, prompt, cache, GREEDY, [], None, 512, TokenStream()), 80)
    assert got == plain
    assert cache_offset(cache) <= len(prompt) + 80  # rejected drafts left the cache


class Copier:
    """Test double with the model's call signature and a real KVCache, whose output copies
    the text `period` tokens back (as a model quoting its prompt would), except that every
    `twist`-th position it says something else: drafts are then partly rejected."""

    def __init__(self, period: int, twist: int = 13, vocab: int = 512):
        self.period, self.twist = period, twist
        self.fed: list[int] = []
        self.forwards = 0
        self.config = type("C", (), {"max_position_embeddings": 4096, "vocab_size": vocab})

    def make_cache(self) -> list[KVCache]:
        return [KVCache()]

    def __call__(self, inputs, cache=None, last_only=False):
        c, n = cache[0], inputs.shape[1]
        self.forwards += 1
        self.fed = self.fed[: c.offset] + inputs.reshape(-1).tolist()
        z = mx.zeros((1, 1, n, 2))
        c.update_and_fetch(z, z)
        rows = range(len(self.fed) - 1 if last_only else len(self.fed) - n, len(self.fed))
        nxt = [self._next(i) for i in rows]
        logits = np.full((1, len(nxt), self.config.vocab_size), -1e9, np.float32)
        logits[0, np.arange(len(nxt)), nxt] = 1e9
        return mx.array(logits)

    def _next(self, i: int) -> int:
        """The token after fed[: i + 1]."""
        copied = self.fed[i + 1 - self.period]
        return (copied + 1) % 512 if (i + 1) % self.twist == 0 else copied


def test_a_copying_model_gets_several_tokens_per_step_and_the_same_tokens() -> None:
    body = np.random.default_rng(6).integers(0, 512, 50).tolist()
    prompt = [*body, *body[:10]]

    def run(speculate: bool) -> tuple[list[int], Copier]:
        model, cache = Copier(period=50), [KVCache()]
        if speculate:
            stream = Speculation().tokens(model, prompt, cache, GREEDY, [], None, 512,
                                          TokenStream())  # fmt: skip
        else:
            stream = generate_tokens(model, prompt, cache, make_sampler(GREEDY), [])
        return tokens_of(stream, 150), model

    plain, _ = run(False)
    spec = Speculation()
    model, cache = Copier(period=50), [KVCache()]
    got = tokens_of(spec.tokens(model, prompt, cache, GREEDY, [], None, 512, TokenStream()), 150)
    assert got == plain
    s = spec.stats
    assert s.drafted > s.accepted > 0  # twists made some drafts wrong
    assert s.tokens_per_step >= 1.5 and model.forwards < 100, s


def test_stream_generate_with_lookup_equals_plain_on_the_real_tokenizer(tiny) -> None:
    model, tok = tiny
    ids = tok.encode(PROMPT)
    plain = final(stream_generate(model, tok, ids, sampling=GREEDY, max_tokens=60))
    spec = Speculation()
    got = final(stream_generate(model, tok, ids, sampling=GREEDY, max_tokens=60,
                                speculation=spec))  # fmt: skip
    assert got.token_ids == plain.token_ids and got.answer == plain.answer
    assert got.stats.finish_reason == plain.stats.finish_reason
    assert spec.stats.drafted > 0 and plain.stats.speculation is None
    assert got.stats.speculation == {"method": "lookup", "drafted": spec.stats.drafted,
                                     "accepted": spec.stats.accepted}  # fmt: skip


def test_budget_forced_tokens_stop_tokens_and_penalties_match_plain(tiny) -> None:
    model, tok = tiny
    eos = next(iter(tok.eos_ids))

    def stop_after_40(tokens, logits):  # sees the history, so rows must be fed in order
        if tokens.size >= 40:
            logits[..., eos] = 1e9
        return logits

    ids = tok.encode(PROMPT + "<think>\n")
    sampling = SamplingParams(temperature=0, repetition_penalty=1.1, presence_penalty=0.3)
    kw = dict(sampling=sampling, thinking_budget=8, grace=4, max_tokens=200,
              logits_processors=[stop_after_40])  # fmt: skip
    plain = final(stream_generate(model, tok, ids, **kw))
    got = final(stream_generate(model, tok, ids, speculation=Speculation(), **kw))
    assert got.token_ids == plain.token_ids
    assert got.stats.budget_hit and got.stats.finish_reason == "stop" == plain.stats.finish_reason
    assert got.token_ids[-1] == eos and tok.think_end_id in got.token_ids


def test_the_context_limit_holds_with_drafts(tiny) -> None:
    model, tok = tiny
    ids = tok.encode(PROMPT)
    cache = model.make_cache()
    ctx = len(ids) + 30
    got = final(stream_generate(model, tok, ids, sampling=GREEDY, context_length=ctx,
                                cache=cache, speculation=Speculation()))  # fmt: skip
    plain = final(stream_generate(model, tok, ids, sampling=GREEDY, context_length=ctx))
    assert got.stats.finish_reason == "context" and got.token_ids == plain.token_ids
    assert all(c.offset <= ctx for c in cache)


def test_drafts_stop_where_max_tokens_ends_the_reply(tiny) -> None:
    """The last steps draft only what the reply can still show: nothing past max_tokens is
    verified or counted as accepted (the stats once said 10 of 10 for an 8-token reply)."""
    model, tok = tiny
    ids = tok.encode(PROMPT)
    spec = Speculation("draft", draft_model=model)  # the target drafting for itself: all kept
    got = final(stream_generate(model, tok, ids, sampling=GREEDY, max_tokens=8,
                                speculation=spec))  # fmt: skip
    plain = final(stream_generate(model, tok, ids, sampling=GREEDY, max_tokens=8))
    assert got.token_ids == plain.token_ids and got.stats.finish_reason == "length"
    assert 0 < spec.stats.accepted == spec.stats.drafted <= len(got.token_ids) - 1, spec.stats


def test_ctrl_c_mid_verification_leaves_a_consistent_cache() -> None:
    model = build(tiny_config())
    body = np.random.default_rng(4).integers(0, 512, 30).tolist()
    prompt = [*body, *body, *body[:4]]
    calls = []

    def interrupt(tokens, logits):
        calls.append(1)
        if len(calls) == 25:
            raise KeyboardInterrupt
        return logits

    cache = model.make_cache()
    spec = Speculation()
    stream = spec.tokens(model, prompt, cache, GREEDY, [interrupt], None, 512, TokenStream())
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for t, _ in stream:
            seen.append(t)
    offsets = {c.offset for c in cache}
    assert len(offsets) == 1  # every layer at one place
    assert len(prompt) <= offsets.pop() <= len(prompt) + len(seen)  # nothing unverified


def test_hybrid_caches_are_taken_and_other_caches_refused_with_a_reason() -> None:
    # Linear layers go back to states kept inside the verifying forward (test_mtp.py
    # proves the output); a cache that can do neither is refused.
    spec = Speculation()
    assert spec.applies(None, [KVCache(), LinearCache()]) and spec.reason is None
    assert not spec.applies(None, [KVCache(), object()])
    assert "cannot drop rejected drafts" in spec.reason and spec.report()["method"] == "off"


# -- rejection sampling is exact -----------------------------------------------------------
V = 6
P_LOGITS = np.log(np.array([[0.30, 0.25, 0.20, 0.12, 0.08, 0.05],
                            [0.10, 0.15, 0.05, 0.40, 0.20, 0.10]]))  # fmt: skip
CHI2_CRIT_DF5 = 20.52  # p = 0.001: a correct sampler fails this once in a thousand seeds


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert counts[~keep].sum() == 0  # never a token the target rules out
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=11),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=4, min_p=0.0, seed=12),
], ids=["plain", "temp-topk-topp"])  # fmt: skip
@pytest.mark.parametrize("drafter", ["lookup", "draft-model"])
def test_rejection_sampling_follows_the_target_distribution(params, drafter) -> None:
    verifier = Verifier(params)
    logits = mx.array(P_LOGITS, dtype=mx.float32)
    target = np.array(verifier.probs(logits))
    rng = np.random.default_rng(5)
    q = np.array([[0.05, 0.05, 0.5, 0.3, 0.05, 0.05], [1 / 6] * 6])
    n = 3000
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(n):
        if drafter == "lookup":
            drafts, qd = [2, 3], None  # a certain guess, often wrong
        else:  # a draft model: drafts drawn from its own q
            drafts = [int(rng.choice(V, p=q[0])), int(rng.choice(V, p=q[1]))]
            qd = mx.array(q, dtype=mx.float32)
        out = verifier.verify(mx.concatenate([logits, logits[1:]]), drafts, qd)
        first[out[0]] += 1
        if len(out) > 1 and out[0] == drafts[0]:
            second[out[1]] += 1
    assert chi2(first, target[0]) < CHI2_CRIT_DF5
    assert second.sum() > 200 and chi2(second, target[1]) < CHI2_CRIT_DF5


def test_the_plain_sampler_and_the_verifier_agree_on_the_distribution() -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=4, min_p=0.05, seed=3)
    logits = mx.array(P_LOGITS[:1], dtype=mx.float32)
    target = np.array(Verifier(params).probs(logits))[0]
    sample = make_sampler(params)
    counts = np.bincount([int(sample(logits).item()) for _ in range(2000)], minlength=V)
    assert chi2(counts.astype(float), target) < CHI2_CRIT_DF5


def test_a_wrong_residual_is_caught_by_the_same_check() -> None:
    # The statistic has power: drawing the rejection's replacement from p itself (d not
    # removed) over-produces the draft, and the same threshold rejects it.
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=2)
    p = np.exp(P_LOGITS[0])
    rng = np.random.default_rng(0)
    counts = np.zeros(V)
    for _ in range(6000):
        t = 2 if rng.random() < p[2] else int(rng.choice(V, p=p))
        counts[t] += 1
    assert chi2(counts, np.array(Verifier(params).probs(mx.array(P_LOGITS[:1])))[0]) > 100


# -- the CLI -------------------------------------------------------------------------------
def test_cli_speculate_flags_and_json_report() -> None:
    import json

    from typer.testing import CliRunner

    from qwen3_chat.cli.app import app

    def chat(*args: str):
        return CliRunner().invoke(app, ["chat", "-m", "demo", "--temp", "0", "--no-think",
                                        "--json", *args, "Repeat: 12 + 30 = 42. 12 + 30 = 42."])

    off, on = chat("--speculate", "off"), chat("--speculate", "lookup")
    assert off.exit_code == on.exit_code == 0, (off.stderr, on.stderr)
    a, b = json.loads(off.stdout), json.loads(on.stdout)
    assert a["answer"] == b["answer"] and "speculation" not in a
    assert set(b["speculation"]) == {"method", "drafted", "accepted"}
    assert b["speculation"]["method"] == "lookup"
    assert 0 <= b["speculation"]["accepted"] <= b["speculation"]["drafted"]
    drafted = chat("--speculate", "draft", "--draft", "demo")  # the demo drafting for itself
    assert drafted.exit_code == 0, drafted.stderr
    c = json.loads(drafted.stdout)
    assert c["answer"] == a["answer"] and c["speculation"]["method"] == "draft"
    assert c["speculation"]["accepted"] == c["speculation"]["drafted"] > 0
    for bad, says in ((["--speculate", "nope"], "--speculate must be one of"),
                      (["--draft", "qwen3-0.6b"], "--draft needs --speculate draft"),
                      (["--speculate", "draft"], "needs --draft MODEL")):  # fmt: skip
        r = chat(*bad)
        assert r.exit_code == 2 and says in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


# -- a draft model -------------------------------------------------------------------------
@pytest.mark.parametrize("same", [True, False], ids=["draft=target", "other-weights"])
def test_a_draft_model_gives_plain_greedy_tokens(same: bool) -> None:
    model = build(tiny_config())
    drafter = model if same else build(tiny_config(num_hidden_layers=1), seed=9)
    body = np.random.default_rng(7).integers(0, 512, 20).tolist()
    plain = tokens_of(generate_tokens(model, body, model.make_cache(),
                                      make_sampler(GREEDY), []), 60)  # fmt: skip
    spec = Speculation("draft", draft_model=drafter)
    cache = model.make_cache()
    assert spec.applies(model, cache)
    got = tokens_of(spec.tokens(model, body, cache, GREEDY, [], None, 512, TokenStream()), 60)
    assert got == plain
    s = spec.stats
    if same:  # the target drafting for itself: every draft is kept
        assert s.accepted == s.drafted > 0 and s.tokens_per_step > 3, s
    else:
        assert s.accepted < s.drafted


def test_a_draft_model_must_share_the_vocabulary() -> None:
    from qwen3_chat.engine.speculative import SpeculationError

    class Tok:
        def __init__(self, n: int):
            self.vocab_size = n

    model, other = build(tiny_config()), build(tiny_config(vocab_size=256))
    spec = Speculation("draft")
    with pytest.raises(SpeculationError, match="vocabulary"):
        spec.use_draft(other, Tok(256), model, Tok(512))
    spec.use_draft(model, Tok(512), model, Tok(512))
    assert spec.draft_model is model and not Speculation("draft").applies(model, [KVCache()])


def test_sampling_with_a_draft_model_is_reproducible_and_mostly_accepted() -> None:
    model = build(tiny_config())
    body = np.random.default_rng(8).integers(0, 512, 20).tolist()
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=20, seed=4)

    def run() -> tuple[list[int], Speculation]:
        spec = Speculation("draft", draft_model=model)
        stream = spec.tokens(model, body, model.make_cache(), params, [], None, 512,
                             TokenStream())  # fmt: skip
        return tokens_of(stream, 40), spec

    (a, spec), (b, _) = run(), run()
    assert a == b and all(0 <= t < 512 for t in a)
    # q == p when the target drafts for itself: min(1, p/q) = 1, every draft is kept.
    assert spec.stats.accepted == spec.stats.drafted > 0


def test_stats_line_for_speculation() -> None:
    from dataclasses import replace

    from qwen3_chat.cli.render import speculation_line
    from qwen3_chat.engine.events import GenerationStats

    st = GenerationStats(1, 1, 0, 5, 1.0, 1.0, 0.1, 0.2, 0.0, "stop", False)
    assert speculation_line(st) is None
    on = replace(st, speculation={"method": "lookup", "drafted": 40, "accepted": 30})
    assert speculation_line(on) == "speculation (lookup): 30 of 40 drafted tokens accepted (75%)"
    why = "the model's recurrent layers cannot drop drafts"
    off = replace(st, speculation={"method": "off", "drafted": 0, "accepted": 0, "reason": why})
    assert speculation_line(off) == f"speculation off: {why}"


def test_auto_drafts_only_for_long_prompts(tiny) -> None:
    from qwen3_chat.engine.speculative import AUTO_MIN_PROMPT, make_speculation

    model, tok = tiny
    auto = make_speculation("auto")
    short = tok.encode(PROMPT)
    assert len(short) < AUTO_MIN_PROMPT
    plain = final(stream_generate(model, tok, short, sampling=GREEDY, max_tokens=20))
    got = final(stream_generate(model, tok, short, sampling=GREEDY, max_tokens=20,
                                speculation=auto))  # fmt: skip
    assert got.token_ids == plain.token_ids
    assert got.stats.speculation["method"] == "off" and "auto" in got.stats.speculation["reason"]
    long = tok.encode(PROMPT.replace(CODE, CODE * 6))
    assert len(long) >= AUTO_MIN_PROMPT
    got = final(stream_generate(model, tok, long, sampling=GREEDY, max_tokens=20,
                                speculation=auto))  # fmt: skip
    assert got.stats.speculation["method"] == "lookup"
    assert make_speculation("off") is None


def test_lookup_quotes_earlier_turns_held_in_the_cache() -> None:
    # Turn 2 asks for a copy of what turn 1 said: only the cached context holds it.
    body = np.random.default_rng(9).integers(0, 512, 50).tolist()
    first, second = body, body[:10]

    def run(context: list[int]) -> SpecStats:
        model, cache = Copier(period=50), [KVCache()]
        prefill(model, first, cache)  # turn 1, already in the cache
        spec = Speculation(context=context)
        tokens_of(spec.tokens(model, second, cache, GREEDY, [], None, 512, TokenStream()), 60)
        return spec.stats

    assert run(first).tokens_per_step >= 1.5 > run([]).tokens_per_step


@pytest.mark.parametrize("budget", [0, 3, 8])
def test_budget_forced_tokens_on_the_pipelined_plain_steps(tiny, budget: int) -> None:
    # No processors: steps without drafts are queued ahead, and a forced run must undo the
    # token fed ahead of it, exactly as plain decoding does.
    model, tok = tiny
    ids = tok.encode(PROMPT + "<think>\n")
    kw = dict(sampling=GREEDY, thinking_budget=budget, grace=2, max_tokens=30)
    plain = final(stream_generate(model, tok, ids, **kw))
    cache = model.make_cache()
    got = final(stream_generate(model, tok, ids, cache=cache, speculation=Speculation(), **kw))
    assert got.token_ids == plain.token_ids and got.stats.budget_hit
    assert got.stats.reasoning_tokens == plain.stats.reasoning_tokens
    assert all(c.offset <= len(ids) + len(got.token_ids) for c in cache)


def test_forced_runs_mid_plain_steps_undo_the_token_fed_ahead() -> None:
    model = build(tiny_config())
    prompt = np.random.default_rng(10).integers(0, 512, 20).tolist()

    def forcing():
        calls = []

        def override(token: int) -> list[int] | None:
            calls.append(token)
            return [5, 6, 7] if len(calls) in (4, 11, 12) else None

        return override

    plain = tokens_of(generate_tokens(model, prompt, model.make_cache(), make_sampler(GREEDY),
                                      [], forcing()), 40)  # fmt: skip
    cache = model.make_cache()
    spec = Speculation()
    got = tokens_of(spec.tokens(model, prompt, cache, GREEDY, [], forcing(), 512,
                                TokenStream()), 40)  # fmt: skip
    assert got == plain and got.count(6) >= 3
    assert cache_offset(cache) <= len(prompt) + 40
