"""Generation: sampling policies, the thinking budget, events, and ChatSession turns."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen3_chat import ChatSession, SamplingParams
from qwen3_chat.chat.session import common_prefix
from qwen3_chat.engine.budget import CLOSING_TEXT
from qwen3_chat.engine.events import (
    AnswerText,
    ContextTrimmed,
    Finished,
    ReasoningText,
    ThinkingDone,
)
from qwen3_chat.engine.generate import stream_generate
from qwen3_chat.engine.sampling import keep_min_p, keep_top_k, keep_top_p, make_sampler
from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.models.cache import KVCache

GREEDY = SamplingParams(temperature=0)




# -- sampling ---------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = mx.array(np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32))
    assert make_sampler(GREEDY)(logits).tolist() == np.argmax(np.array(logits), -1).tolist()


def test_top_k_top_p_min_p_keep_exactly_the_right_set():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32)
    lp = mx.array(np.log(probs))[None]
    kept = lambda out: set(np.flatnonzero(np.isfinite(np.array(out[0]))).tolist())  # noqa: E731
    assert kept(keep_top_k(lp, 2)) == {0, 1}
    assert kept(keep_top_p(lp, 0.7)) == {0, 1}  # 0.5 + 0.2 reaches 0.7
    assert kept(keep_top_p(lp, 0.71)) == {0, 1, 2}
    assert kept(keep_min_p(lp, 0.3)) == {0, 1, 2}  # >= 0.3 * 0.5
    assert kept(keep_top_k(lp, 0)) == {0, 1, 2, 3, 4}


def test_penalties_math():
    from qwen3_chat.engine.sampling import make_logits_processors

    logits = mx.array([[2.0, -2.0, 1.0, 0.5]])
    seen = mx.array([0, 1, 1])
    (presence,) = make_logits_processors(SamplingParams(presence_penalty=1.5))
    np.testing.assert_allclose(presence(seen, mx.array(logits)), [[0.5, -3.5, 1.0, 0.5]])
    (rep,) = make_logits_processors(SamplingParams(repetition_penalty=2.0))
    np.testing.assert_allclose(rep(seen, mx.array(logits)), [[1.0, -4.0, 1.0, 0.5]])


def test_seeded_sampling_is_reproducible():
    logits = mx.array(np.random.default_rng(1).standard_normal((1, 1000)).astype(np.float32))
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=7)
    a = [make_sampler(params)(logits).item() for _ in range(1)]
    s1, s2 = make_sampler(params), make_sampler(params)
    run1 = [s1(logits).item() for _ in range(20)]
    run2 = [s2(logits).item() for _ in range(20)]
    assert run1 == run2 and a[0] == run1[0]
    assert len(set(run1)) > 1  # it really samples


def test_qwen_recommended_defaults():
    assert SamplingParams.for_mode(True) == SamplingParams(0.6, 0.95, 20, 0.0)
    assert SamplingParams.for_mode(False) == SamplingParams(0.7, 0.8, 20, 0.0)


# -- the thinking budget ----------------------------------------------------------------
class EndlessThinker:
    """A test double with the model's call signature: it reasons in short lines forever,
    and only answers once `</think>` has been fed to it (as the budget does)."""

    def __init__(self, tok, line: str = " let me think about it more\n", answer: str = " 42."):
        self.tok = tok
        self.line, self.answer = tok.encode(line), tok.encode(answer)
        self.fed: list[int] = []
        self.config = type("C", (), {"max_position_embeddings": 4096})

    def make_cache(self) -> list[KVCache]:
        return [KVCache()]

    def __call__(self, inputs, cache=None, last_only=False):
        ids = inputs.reshape(-1).tolist()
        c = cache[0]
        self.fed = self.fed[: c.offset] + ids
        z = mx.zeros((1, 1, len(ids), 2))
        c.update_and_fetch(z, z)
        logits = mx.full((1, 1, self.tok.vocab_size), -1e9)
        return logits.at[0, 0, self._next()].add(2e9)

    def _next(self) -> int:
        end = self.tok.think_end_id
        if end in self.fed:
            after = len(self.fed) - 1 - self.fed[::-1].index(end)
            n = len(self.fed) - after - 1  # answer tokens fed so far
            seq = self.tok.encode("\n\n") + self.answer + [self.tok.im_end_id]
            return seq[min(n, len(seq) - 1)]
        if self.tok.think_start_id not in self.fed[-200:]:
            return self.tok.think_start_id
        since = len(self.fed) - 1 - self.fed[::-1].index(self.tok.think_start_id)
        return self.line[(len(self.fed) - since - 1) % len(self.line)]


def run(model, tok, prompt_text: str, **kw) -> list:
    ids = tok.encode(prompt_text)
    return list(stream_generate(model, tok, ids, sampling=GREEDY, **kw))


@pytest.mark.parametrize("budget", [0, 5, 20, 40])
def test_budget_cuts_at_a_line_end_then_forces_the_closing(tiny, budget):
    _, tok = tiny
    model = EndlessThinker(tok)
    events = run(model, tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                 thinking_budget=budget, grace=32)  # fmt: skip
    done = [e for e in events if isinstance(e, ThinkingDone)]
    fin = events[-1]
    assert isinstance(fin, Finished) and len(done) == 1 and done[0].budget_hit
    assert fin.stats.budget_hit and fin.stats.finish_reason == "stop"
    closing = len(tok.encode(CLOSING_TEXT.split("</think>")[0]))
    own = fin.stats.reasoning_tokens - closing
    assert budget <= own <= budget + 32, own
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningText))
    body = reasoning.split("\n\nConsidering")[0]
    assert body.endswith("more\n") or body.endswith("more"), repr(body[-30:])
    assert reasoning.rstrip().endswith("based on the thinking directly now.")
    assert fin.answer == "42."
    # The forced run really went through the model, </think> included.
    assert tok.think_end_id in model.fed


def test_budget_counts_reasoning_across_think_blocks(tiny):
    _, tok = tiny
    model = EndlessThinker(tok)
    from qwen3_chat.engine.budget import ThinkingBudget

    b = ThinkingBudget(8, [1, 2], tok.think_start_id, tok.think_end_id, grace=0)
    for t in [tok.think_start_id, 11, 12, 13, 14, 15, tok.think_end_id, 16]:
        assert b.on_token(t, "x") is None  # 5 reasoning tokens, then an answer token
    assert b.used == 5
    b.on_token(tok.think_start_id, "")
    results = [b.on_token(20 + i, "\n") for i in range(4)]
    # Tokens 6-8 of the budget pass; with no grace window the 9th never happens.
    assert results[:3] == [None, None, None] and results[3] == [1, 2] and b.hit
    del model


def test_answer_is_bounded_by_max_tokens_after_a_long_think(tiny):
    model, tok = tiny
    ban = [tok.think_end_id, *tok.eos_ids]

    def never_stop(tokens, logits):
        logits[..., mx.array(ban)] = -mx.inf
        return logits

    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    events = run(model, tok, prompt, thinking_budget=10, max_tokens=12,
                 logits_processors=[never_stop])  # fmt: skip
    fin = events[-1]
    assert fin.stats.budget_hit and fin.stats.finish_reason == "length"
    assert fin.stats.answer_tokens == 12
    assert 10 <= fin.stats.reasoning_tokens <= 10 + 32 + 8 + len(tok.encode(CLOSING_TEXT))


def test_events_reassemble_the_decoded_tokens(tiny):
    _, tok = tiny
    model = EndlessThinker(tok)
    events = run(model, tok, "<|im_start|>assistant\n", thinking_budget=6)
    fin = events[-1]
    text = tok.decode(list(fin.token_ids))
    reasoning, answer = text.split("</think>")
    assert "".join(e.text for e in events if isinstance(e, ReasoningText)) == reasoning.replace(
        "<think>", ""
    ).lstrip("\n")
    assert "".join(e.text for e in events if isinstance(e, AnswerText)) == answer.replace(
        "<|im_end|>", ""
    ).lstrip("\n")


# -- ChatSession ------------------------------------------------------------------------
def test_zero_budget_renders_the_empty_think_block(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, budget=0, sampling=GREEDY, max_tokens=4)
    ids = s.render(s._thinking_for("hi"), [{"role": "user", "content": "hi"}])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_soft_switches_set_the_turn_mode(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, sampling=GREEDY, max_tokens=3)
    assert s._thinking_for("hello /no_think") is False
    s.thinking = False
    assert s._thinking_for("hello /think") is True
    list(s.send("explain /no_think"))
    assert s.messages[0]["content"] == "explain /no_think"  # passed on as typed


def test_turn_two_prefills_only_new_tokens_and_matches_from_scratch(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, sampling=GREEDY, max_tokens=8, budget=6)
    first = list(s.send("Hello there"))[-1]
    cached = s.render(True, s.messages[:1])[: len(s._cache_ids)] + []  # the turn-1 prompt
    held = s._cache_ids
    second = list(s.send("And again?"))[-1]
    ids2 = s.render(True, s.messages[:-1])
    assert second.stats.prompt_tokens == len(ids2)
    assert second.stats.prefill_tokens == len(ids2) - common_prefix(held, ids2)
    fresh = ChatSession(model, tok, sampling=GREEDY, max_tokens=8, budget=6)
    fresh.messages = [dict(m) for m in s.messages[:2]]
    again = list(fresh.send("And again?"))[-1]
    assert again.token_ids == second.token_ids
    assert again.stats.prefill_tokens == len(ids2)
    del first, cached


def test_abort_keeps_partial_reply_and_next_turn_matches_fresh(tiny):
    _, tok = tiny
    s = ChatSession(EndlessThinker(tok), tok, sampling=GREEDY, max_tokens=30, budget=5)
    stream = s.send("Tell me a story")
    for i, _ in enumerate(stream):
        if i == 2:
            break  # as if Ctrl-C arrived mid-reply
    stream.close()
    s.abort()
    last = s.messages[-1]
    assert last["role"] == "assistant" and last["interrupted"] and last["reasoning_content"]
    nxt = list(s.send("Another?"))[-1]
    assert nxt.answer == "42." and nxt.stats.budget_hit
    fresh = ChatSession(EndlessThinker(tok), tok, sampling=GREEDY, max_tokens=30, budget=5)
    fresh.messages = [dict(m) for m in s.messages[:2]]
    assert list(fresh.send("Another?"))[-1].token_ids == nxt.token_ids


def test_save_and_restore_round_trip(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, system="Be brief.", budget=64, sampling=GREEDY, max_tokens=4)
    list(s.send("hi"))
    d = s.to_dict()
    back = ChatSession.from_dict(model, tok, d)
    assert back.to_dict() == d
    with pytest.raises(Qwen3ChatError, match="not a saved qwen3-chat conversation"):
        ChatSession.from_dict(model, tok, {"version": 1, "messages": [{"role": "x"}]})


def test_context_trimming_and_too_long_prompt(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, sampling=GREEDY, max_tokens=4, thinking=False,
                    context_length=120)  # fmt: skip
    for i in range(4):
        s.messages += [{"role": "user", "content": f"question {i} " + "x " * 12},
                       {"role": "assistant", "content": "y " * 6}]  # fmt: skip
    events = list(s.send("last one"))
    trims = [e for e in events if isinstance(e, ContextTrimmed)]
    assert trims and trims[0].dropped_turns >= 1 and trims[0].context_used <= 120
    with pytest.raises(Qwen3ChatError, match="longer than the model's context of 120"):
        list(s.send("word " * 200))
    assert s.messages[-1]["role"] == "assistant"  # the rejected message was not kept
