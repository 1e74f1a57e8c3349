"""ChatSession on a tiny real model and the real Qwen3 template: modes, prompt-cache reuse
across turns, interrupts, history edits, persistence and the context limit."""

from __future__ import annotations

import json
import shutil

import pytest
from checkpoints import TOKENIZER_FILES

from qwen3_chat import ChatSession, SamplingParams
from qwen3_chat.chat.prompt_cache import common_prefix
from qwen3_chat.chat.session import soft_switch
from qwen3_chat.chat.tokenizer import Tokenizer
from qwen3_chat.engine.budget import CLOSING_TEXT
from qwen3_chat.engine.events import AnswerText, ContextTrimmed, Finished, ReasoningText
from qwen3_chat.engine.generate import DEFAULT_PREFILL_STEP
from qwen3_chat.errors import Qwen3ChatError, SettingsError

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
    """The tiny model, but Ctrl-C arrives during its `n`-th forward pass (0: never)."""

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
    fresh.load_messages(s.messages[:2])
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
    assert s.messages == () and not s.undo() and s.context_used == 0
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
    fresh.load_messages(s.messages[:2])
    assert finished(fresh.send("Another?")).token_ids == nxt.token_ids


@pytest.mark.parametrize("at", [1, 5])  # during prefill, during decoding
def test_a_turn_stopped_before_its_first_word_is_undone_and_the_cache_stays_sound(tiny, at):
    # Greedy, this random model's reply is only newlines: nothing is shown before Ctrl-C.
    model, tok = tiny
    s = ChatSession(InterruptAt(model, 0), tok, sampling=GREEDY, max_tokens=6, thinking=False)
    finished(s.send("first question"))
    before = s.messages
    s.model.n, s.model.calls = at, 0
    with pytest.raises(KeyboardInterrupt):
        finished(s.send("second question"))
    s.abort()
    assert s.messages == before and s.last_stats.finish_reason == "interrupted"
    nxt = finished(s.send("third question"))
    fresh = session(tiny, thinking=False)
    fresh.load_messages(before)
    assert nxt.token_ids == finished(fresh.send("third question")).token_ids


def test_a_retry_stopped_before_its_first_word_keeps_the_old_reply(tiny):
    model, tok = tiny
    s = ChatSession(InterruptAt(model, 0), tok, sampling=GREEDY, max_tokens=6, thinking=False)
    finished(s.send("question"))
    before = s.messages
    s.model.n, s.model.calls = 2, 0
    stream = s.retry()
    with pytest.raises(KeyboardInterrupt):
        finished(stream)
    s.abort()
    assert s.messages == before


def test_a_stream_never_read_is_undone_by_the_next_send(tiny):
    s = session(tiny, thinking=False)
    s.send("never read")  # the caller dropped the stream
    finished(s.send("read"))
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    assert s.messages[0]["content"] == "read"


def test_an_interrupted_prefill_is_counted_as_far_as_it_went_and_reused(tiny):
    # Ctrl-C in the second chunk of a long prompt: the first chunk stays in the cache.
    model, tok = tiny
    s = ChatSession(InterruptAt(model, 2), tok, sampling=GREEDY, max_tokens=3, thinking=False)
    long = "many words " * 400
    with pytest.raises(KeyboardInterrupt):
        finished(s.send(long))
    s.abort()
    step = DEFAULT_PREFILL_STEP
    assert s.messages == () and s.last_stats.prefill_tokens == step
    again = finished(s.send(long))
    assert again.stats.prefill_tokens == again.stats.prompt_tokens - step
    ref = finished(session(tiny, max_tokens=3, thinking=False).send(long))
    assert again.token_ids == ref.token_ids


# -- Thinking-2507: the template opens <think> in the generation prompt ----------------
@pytest.fixture(scope="module")
def thinking_2507(tiny, qwen3_tokenizer_dir, tmp_path_factory):
    """The tiny model with the real Qwen3-4B-Thinking-2507 chat template."""
    template = qwen3_tokenizer_dir / "family" / "Qwen3-4B-Thinking-2507" / "chat_template.jinja"
    if not template.exists():
        pytest.skip(f"the Thinking-2507 template is not at {template}")
    folder = tmp_path_factory.mktemp("thinking-2507")
    for name in TOKENIZER_FILES:
        if (qwen3_tokenizer_dir / name).exists():
            shutil.copyfile(qwen3_tokenizer_dir / name, folder / name)
    shutil.copyfile(template, folder / "chat_template.jinja")
    return tiny[0], Tokenizer.from_dir(folder)


@pytest.mark.parametrize("again", ["retry", "undo and resend", "clear and resend"])
def test_an_always_thinking_model_thinks_again_from_a_cached_prompt(thinking_2507, again):
    model, tok = thinking_2507
    s = ChatSession(model, tok, capability="always", budget=3, sampling=GREEDY, max_tokens=4)
    first = finished(s.send("hi"))
    assert tok.decode(s.render(True, s.messages[:1])).endswith("<think>\n")
    if again == "retry":
        second = finished(s.retry())
    else:
        s.undo() if again.startswith("undo") else s.clear()
        second = finished(s.send("hi"))
    assert second.stats.prefill_tokens == 1  # the whole prompt but its last token was cached
    closing = CLOSING_TEXT.split("</think>")[0].strip()
    for fin in (first, second):
        assert fin.stats.budget_hit and fin.stats.reasoning_tokens > 3
        assert fin.reasoning.endswith(closing) and closing not in fin.answer
    assert second.token_ids == first.token_ids and second.reasoning == first.reasoning
    assert s.messages[-1]["reasoning_content"] == first.reasoning
    assert closing not in s.messages[-1]["content"]


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
    s.load_messages([m for i in range(4) for m in (
        {"role": "user", "content": f"question {i} " + "x " * 12},
        {"role": "assistant", "content": "y " * 6})])  # fmt: skip
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
    assert list(s.messages) == before
    assert finished(s.send("short again")).stats.finish_reason in ("stop", "length")


def test_context_length_defaults_to_the_model_config(tiny):
    model, _ = tiny
    assert session(tiny).context_length == model.config.max_position_embeddings


def test_one_sampling_knob_keeps_each_modes_defaults(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, sampling_overrides={"seed": 3},
                    mode_sampling={"thinking": {"top_k": 40}})  # fmt: skip
    think, plain = s.sampling_for(True), s.sampling_for(False)
    assert (think.temperature, think.top_k, think.seed) == (0.6, 40, 3)
    assert (plain.temperature, plain.top_p, plain.seed) == (0.7, 0.8, 3)
    back = ChatSession.from_dict(model, tok, s.to_dict())
    assert back.sampling_for(True) == think and back.sampling_for(False) == plain


# -- settings are checked where they come in ----------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"budget": -1}, "thinking budget must be an integer >= 0 or None, not -1"),
        ({"budget": "512"}, "thinking budget must be an integer >= 0 or None, not '512'"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1, not 0"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer >= 1, not 2.5"),
        ({"context_length": -3}, "context_length must be an integer >= 1 or None"),
        ({"system": 5}, "system must be a string or None, not int"),
        ({"thinking": "yes"}, "thinking must be True or False"),
        ({"capability": "sometimes"}, "capability must be one of hybrid, always, never"),
        ({"sampling": {"temperature": 0}}, "sampling must be a SamplingParams"),
    ],
)
def test_bad_settings_fail_at_construction_with_a_named_error(tiny, kw, match):
    model, tok = tiny
    with pytest.raises(SettingsError, match=match):
        ChatSession(model, tok, **kw)


def test_setters_validate_and_the_conversation_is_read_only(tiny):
    s = session(tiny, thinking=False)
    with pytest.raises(SettingsError, match="the message must be a string, not int"):
        s.send(123)
    assert s.messages == ()
    for name, value in (("budget", -5), ("max_tokens", None), ("system", ["x"]),
                        ("thinking", 1)):  # fmt: skip
        with pytest.raises(SettingsError, match=name.replace("budget", "thinking budget")):
            setattr(s, name, value)
    s.budget, s.max_tokens = 7, 3
    s.set_system("Be brief.")
    assert (s.budget, s.max_tokens, s.system) == (7, 3, "Be brief.")
    s.set_system("")
    assert s.system is None
    finished(s.send("hi"))
    copy = s.messages
    copy[0]["content"] = "edited"
    assert s.messages[0]["content"] == "hi" and isinstance(copy, tuple)
    with pytest.raises(SettingsError, match="bad message"):
        s.load_messages([{"role": "tool", "content": "x"}])
    assert s.messages[0]["content"] == "hi"  # a rejected load changes nothing
    never = session(tiny, capability="never")
    with pytest.raises(SettingsError, match="cannot think"):
        never.thinking = True
    always = session(tiny, capability="always")
    with pytest.raises(SettingsError, match="always thinks"):
        always.thinking = False


def test_a_reply_cut_by_the_context_is_marked_truncated(tiny):
    s = session(tiny, thinking=False, max_tokens=50, context_length=40)
    fin = finished(s.send("hi"))
    assert fin.stats.finish_reason == "context" and s.messages[-1]["truncated"] is True
    assert fin.stats.prompt_tokens + len(fin.token_ids) == 40
