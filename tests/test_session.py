"""ChatSession on a tiny real model and the real Qwen3 template: modes, prompt-cache reuse
across turns, interrupts, history edits, persistence and the context limit."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from qwen3_chat import ChatSession, SamplingParams
from qwen3_chat.chat.session import common_prefix, soft_switch
from qwen3_chat.engine.events import AnswerText, ContextTrimmed, Finished, ReasoningText
from qwen3_chat.errors import Qwen3ChatError

GREEDY = SamplingParams(temperature=0)
EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"




def finished(events) -> Finished:
    evs = list(events)
    assert isinstance(evs[-1], Finished)
    return evs[-1]


def session(tiny, **kw) -> ChatSession:
    model, tok = tiny
    return ChatSession(model, tok, **{"sampling": GREEDY, "max_tokens": 6, **kw})


class InterruptAt:
    """The tiny model, but Ctrl-C arrives during its `n`-th forward pass."""

    def __init__(self, model, n: int):
        self.model, self.n, self.calls = model, n, 0
        self.config = model.config

    def make_cache(self):
        return self.model.make_cache()

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.model(*args, **kwargs)


# -- modes ------------------------------------------------------------------------------
def test_zero_budget_is_non_thinking_mode(tiny):
    _, tok = tiny
    s = session(tiny, budget=0)
    fin = finished(s.send("hi"))
    prompt = s.render(False, s.messages[:1])
    assert tok.decode(prompt).endswith(EMPTY_THINK)
    assert fin.stats.prompt_tokens == len(prompt) and fin.stats.reasoning_tokens == 0
    assert "reasoning_content" not in s.messages[-1]


def test_soft_switches_set_the_turn_mode_and_pass_through(tiny):
    _, tok = tiny
    assert soft_switch("why? /no_think") is False and soft_switch("go /think  ") is True
    assert soft_switch("no switch / think") is None
    s = session(tiny)
    fin = finished(s.send("explain /no_think"))
    assert s.messages[0]["content"] == "explain /no_think"  # passed on as typed
    assert fin.stats.prompt_tokens == len(s.render(False, s.messages[:1]))
    assert fin.stats.prompt_tokens != len(s.render(True, s.messages[:1]))
    off = session(tiny, thinking=False)
    fin = finished(off.send("now think /think"))
    assert fin.stats.prompt_tokens == len(off.render(True, off.messages[:1]))


def test_capabilities(tiny):
    model, tok = tiny
    never = session(tiny, capability="never")
    assert not never.can_think and not never.thinking
    fin = finished(never.send("hi /think"))  # Instruct-2507: the switch cannot turn it on
    assert fin.stats.prompt_tokens == len(never.render(False, never.messages[:1]))
    always = session(tiny, capability="always", budget=3)
    assert always.can_think
    fin = finished(always.send("hi /no_think"))  # Thinking-2507: always thinks
    assert fin.stats.prompt_tokens == len(always.render(True, always.messages[:1]))
    with pytest.raises(Qwen3ChatError, match="capability"):
        ChatSession(model, tok, capability="sometimes")


# -- prompt-cache reuse -----------------------------------------------------------------
def test_turn_two_prefills_only_the_new_tokens_and_matches_from_scratch(tiny):
    s = session(tiny, max_tokens=8, budget=6)
    first = finished(s.send("Hello there"))
    prompt1 = s.render(True, s.messages[:1])
    assert first.stats.prefill_tokens == first.stats.prompt_tokens == len(prompt1)
    second = finished(s.send("And again?"))
    prompt2 = s.render(True, s.messages[:3])
    reused = common_prefix(prompt1 + list(first.token_ids), prompt2)
    # The template re-renders turn 1 without its reasoning: the cache is reused up to there.
    assert len(prompt1) <= reused < len(prompt1) + len(first.token_ids)
    assert second.stats.prompt_tokens == len(prompt2)
    assert second.stats.prefill_tokens == len(prompt2) - reused
    fresh = session(tiny, max_tokens=8, budget=6)
    fresh.messages = [dict(m) for m in s.messages[:2]]
    again = finished(fresh.send("And again?"))
    assert again.token_ids == second.token_ids
    assert again.stats.prefill_tokens == len(prompt2)


def test_retry_undo_clear(tiny):
    s = session(tiny, thinking=False)
    a = finished(s.send("one"))
    b = finished(s.retry())
    assert a.token_ids == b.token_ids and len(s.messages) == 2  # greedy: same reply again
    assert b.stats.prefill_tokens == 1  # everything but the last prompt token was cached
    finished(s.send("two"))
    assert s.undo() and [m["content"] for m in s.messages] == ["one", a.answer]
    s.clear()
    assert s.messages == [] and not s.undo() and s.context_used == 0
    with pytest.raises(Qwen3ChatError, match="nothing to retry"):
        s.retry()


def test_context_used_counts_the_rendered_conversation(tiny):
    _, tok = tiny
    s = session(tiny, system="Be brief.", thinking=False)
    finished(s.send("hello"))
    conv = [{"role": "system", "content": "Be brief."}, *s.messages]
    text = tok.apply_chat_template(conv, add_generation_prompt=False)
    assert s.context_used == len(tok.encode(text)) > 0


# -- interrupts -------------------------------------------------------------------------
def test_abort_after_closing_the_stream_keeps_the_partial_reply(tiny):
    # Seeded and flat: this random model's greedy reply is only newlines, which show nothing.
    noisy = SamplingParams(temperature=50.0, top_p=1.0, top_k=0, seed=2)
    s = session(tiny, max_tokens=20, budget=4, sampling=noisy)
    stream = s.send("Tell me a story")
    seen = []
    for ev in stream:
        seen.append(ev)
        if isinstance(ev, ReasoningText | AnswerText):
            break  # the UI stops reading at the first text, as after Ctrl-C
    stream.close()
    s.abort()
    last = s.messages[-1]
    assert last["role"] == "assistant" and last["interrupted"] is True
    kept = last.get("reasoning_content", "") + last["content"]
    assert kept and kept == seen[-1].text.strip()
    assert s.last_stats.finish_reason == "interrupted"
    nxt = finished(s.send("Another?"))
    fresh = session(tiny, max_tokens=20, budget=4, sampling=noisy)
    fresh.messages = [dict(m) for m in s.messages[:2]]
    assert finished(fresh.send("Another?")).token_ids == nxt.token_ids


@pytest.mark.parametrize("at", [1, 5])  # during prefill, during decoding
def test_keyboard_interrupt_inside_generation_leaves_a_consistent_cache(tiny, at):
    model, tok = tiny
    s = ChatSession(InterruptAt(model, at), tok, sampling=GREEDY, max_tokens=6, thinking=False)
    with pytest.raises(KeyboardInterrupt):
        finished(s.send("first question"))
    s.abort()
    assert s.messages[-1]["interrupted"] and s.last_stats.finish_reason == "interrupted"
    nxt = finished(s.send("second question"))
    fresh = session(tiny, thinking=False)
    fresh.messages = [dict(m) for m in s.messages[:2]]
    ref = finished(fresh.send("second question"))
    assert nxt.token_ids == ref.token_ids


# -- persistence ------------------------------------------------------------------------
def test_to_dict_from_dict_round_trip_through_json(tiny):
    model, tok = tiny
    params = SamplingParams(temperature=0.3, top_p=0.9, top_k=5, seed=4)
    s = ChatSession(model, tok, system="Be brief.", budget=64, sampling=params, max_tokens=4,
                    context_length=2000, thinking=False)  # fmt: skip
    finished(s.send("hi"))
    d = json.loads(json.dumps(s.to_dict()))
    back = ChatSession.from_dict(model, tok, d)
    assert back.to_dict() == d and back.messages == s.messages
    assert (back.sampling, back.context_length, back.thinking) == (params, 2000, False)
    assert finished(back.send("more")).answer == finished(s.send("more")).answer


@pytest.mark.parametrize(
    "bad",
    [
        {"version": 99, "messages": []},
        {"version": 1, "messages": [{"role": "x", "content": "hi"}]},
        {"version": 1, "messages": [{"role": "user", "content": 3}]},
        {"version": 1, "messages": [], "budget": "lots"},
        {"version": 1, "messages": [], "sampling": {"temperature": -1}},
        {"version": 1},
    ],
)
def test_from_dict_rejects_what_is_not_a_conversation(tiny, bad):
    model, tok = tiny
    with pytest.raises(Qwen3ChatError):
        ChatSession.from_dict(model, tok, bad)


# -- the context limit ------------------------------------------------------------------
def test_oldest_turns_are_dropped_to_fit_the_context(tiny):
    s = session(tiny, max_tokens=4, thinking=False, context_length=120)
    for i in range(4):
        s.messages += [{"role": "user", "content": f"question {i} " + "x " * 12},
                       {"role": "assistant", "content": "y " * 6}]  # fmt: skip
    events = list(s.send("last one"))
    trims = [e for e in events if isinstance(e, ContextTrimmed)]
    fin = events[-1]
    assert len(trims) == 1 and trims[0].dropped_turns >= 1
    assert trims[0].context_used == fin.stats.prompt_tokens <= 120 - 4
    assert trims[0].context_length == 120
    assert s.messages[0]["content"].startswith(f"question {trims[0].dropped_turns} ")
    assert s.messages[-2]["content"] == "last one"


def test_a_prompt_longer_than_the_context_is_rejected_and_not_kept(tiny):
    s = session(tiny, thinking=False, context_length=64)
    finished(s.send("short"))
    before = [dict(m) for m in s.messages]
    with pytest.raises(Qwen3ChatError, match="longer than the model's context of 64"):
        list(s.send("word " * 100))
    assert s.messages == before
    assert finished(s.send("short again")).stats.finish_reason in ("stop", "length")


def test_context_length_defaults_to_the_model_config(tiny):
    model, _ = tiny
    assert session(tiny).context_length == model.config.max_position_embeddings
    assert mx.array(0).item() == 0  # keep mx imported for the double above


def test_one_sampling_knob_keeps_each_modes_defaults(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, sampling_overrides={"seed": 3},
                    mode_sampling={"thinking": {"top_k": 40}})  # fmt: skip
    think, plain = s.sampling_for(True), s.sampling_for(False)
    assert (think.temperature, think.top_k, think.seed) == (0.6, 40, 3)
    assert (plain.temperature, plain.top_p, plain.seed) == (0.7, 0.8, 3)
    back = ChatSession.from_dict(model, tok, s.to_dict())
    assert back.sampling_for(True) == think and back.sampling_for(False) == plain
