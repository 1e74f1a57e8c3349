"""The thinking budget: the policy on its own, the phase tracker that feeds it, then
through generation with a model that never stops thinking by itself (a scripted test
double, and the real tiny model with `</think>` and eos banned)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from qwen3_chat import ChatSession, SamplingParams
from qwen3_chat.engine.budget import CLOSING_TEXT, ThinkingBudget
from qwen3_chat.engine.events import AnswerText, Finished, ReasoningText, ThinkingDone
from qwen3_chat.engine.generate import stream_generate
from qwen3_chat.engine.phase import Kind, ThinkPhase
from qwen3_chat.models.cache import KVCache

GREEDY = SamplingParams(temperature=0)
START, END = 1000, 1001
CLOSE = [7, 8, 9]


def feed(b: ThinkingBudget, pieces: list[str], first_id: int = 10) -> tuple[int, list[int]]:
    """Feed reasoning tokens with the given texts; returns (index that closed, forced ids)."""
    for i, text in enumerate(pieces):
        out = b.on_reasoning_token(first_id + i, text)
        if out is not None:
            return i, out
    return -1, []


# -- the policy -------------------------------------------------------------------------
def test_within_budget_nothing_happens():
    b = ThinkingBudget(5, CLOSE, grace=4)
    assert feed(b, [" a"] * 5) == (-1, []) and b.used == 5 and not b.hit


def test_cut_after_the_first_newline_in_the_grace_window():
    b = ThinkingBudget(3, CLOSE, grace=10)
    i, out = feed(b, [" a", " b", " c", "d", " e", "f.\n", " g"])
    assert i == 5 and out == [15, *CLOSE]  # the newline token is kept, then the closing
    assert b.hit and b.used == 6


def test_word_boundary_near_the_end_of_the_window_cuts_before_the_new_word():
    b = ThinkingBudget(2, CLOSE, grace=10)
    # Over the budget from token 3; words start early in the window but are let run,
    # then the first word start among the last 8 window slots ends the thought.
    pieces = [" a", " b", " long", "er", "word", " c", "xx", "yy", "zz", "ww", " next"]
    i, out = feed(b, pieces)
    assert i == 5 and out == CLOSE  # " c" is dropped: the reasoning ends after "word"
    assert b.used == 5


def test_no_newline_nor_boundary_cuts_at_budget_plus_grace():
    b = ThinkingBudget(4, CLOSE, grace=6)
    i, out = feed(b, ["x"] * 20)
    assert i == 10 and out == CLOSE and b.used == 4 + 6


def test_zero_grace_stops_exactly_at_the_budget():
    b = ThinkingBudget(3, CLOSE, grace=0)
    i, out = feed(b, [" a", " b", " c", ".\n"])
    assert i == 3 and out == CLOSE and b.used == 3


def test_reasoning_after_the_budget_was_hit_is_closed_at_once():
    b = ThinkingBudget(1, CLOSE, grace=2)
    feed(b, ["a", "b", "c", "d"])
    assert b.hit and b.on_reasoning_token(20, "x") == CLOSE  # the window is already spent


# -- the phase tracker ------------------------------------------------------------------
def test_the_phase_after_a_prompt_is_its_last_marker():
    assert ThinkPhase.after([5, START, 6], START, END).inside
    assert not ThinkPhase.after([START, 6, END, 7], START, END).inside
    assert not ThinkPhase.after([5, 6], START, END).inside
    assert not ThinkPhase.after([START], None, None).inside  # a tokenizer without markers


def test_the_phase_classifies_markers_and_stray_markers():
    p = ThinkPhase(START, END)
    kinds = [p.feed(t) for t in [5, END, START, START, 6, END, 7]]
    assert kinds == [Kind.ANSWER, Kind.ANSWER, Kind.OPEN, Kind.REASONING, Kind.REASONING,
                     Kind.CLOSE, Kind.ANSWER]  # fmt: skip
    assert p.peek(START) is Kind.OPEN and not p.inside  # peek does not move


# -- through generation -----------------------------------------------------------------


class EndlessThinker:
    """Test double with the model's call signature and a real KVCache: it opens <think>,
    reasons in the same line forever, and answers only once `</think>` has been fed."""

    def __init__(self, tok, line: str = " let me think about it more\n", answer: str = " 42."):
        self.tok = tok
        self.line, self.answer = tok.encode(line), tok.encode(answer)
        self.fed: list[int] = []
        self.config = type("C", (), {"max_position_embeddings": 4096, "vocab_size": 151936})

    def make_cache(self) -> list[KVCache]:
        return [KVCache()]

    def __call__(self, inputs, cache=None, last_only=False):
        c = cache[0]
        self.fed = self.fed[: c.offset] + inputs.reshape(-1).tolist()
        z = mx.zeros((1, 1, inputs.shape[1], 2))
        c.update_and_fetch(z, z)
        logits = mx.full((1, 1, self.tok.vocab_size), -1e9)
        return logits.at[0, 0, self._next()].add(2e9)

    def _next(self) -> int:
        tok, fed = self.tok, self.fed
        if tok.think_end_id in fed:
            n = len(fed) - 1 - (len(fed) - 1 - fed[::-1].index(tok.think_end_id))
            seq = tok.encode("\n\n") + self.answer + [tok.im_end_id]
            return seq[min(n, len(seq) - 1)]
        if tok.think_start_id not in fed:
            return tok.think_start_id
        since = len(fed) - 1 - fed[::-1].index(tok.think_start_id)
        return self.line[(len(fed) - since - 1) % len(self.line)]


PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("budget", [0, 5, 20, 40])
def test_stops_at_a_line_end_within_grace_then_feeds_the_exact_closing(tiny, budget):
    _, tok = tiny
    model = EndlessThinker(tok)
    events = list(stream_generate(model, tok, tok.encode(PROMPT), sampling=GREEDY,
                                  thinking_budget=budget, grace=32))  # fmt: skip
    fin = events[-1]
    done = [e for e in events if isinstance(e, ThinkingDone)]
    assert isinstance(fin, Finished) and len(done) == 1 and done[0].budget_hit
    assert fin.stats.budget_hit and fin.stats.finish_reason == "stop"
    closing = tok.encode(CLOSING_TEXT)
    gen = list(fin.token_ids)
    start, end = gen.index(tok.think_start_id), gen.index(tok.think_end_id)
    own = gen[start + 1 : end + 1 - closing.index(tok.think_end_id) - 1]
    # The model's own reasoning: at least the budget, at most budget + grace, ending a line.
    assert budget <= len(own) <= budget + 32
    assert tok.decode(own).endswith("more\n")
    # Then exactly the closing tokens, and they really went through the model.
    assert gen[start + 1 + len(own) : start + 1 + len(own) + len(closing)] == closing
    k = len(tok.encode(PROMPT)) + start + 1 + len(own)
    assert model.fed[k : k + len(closing)] == closing
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningText))
    assert reasoning.endswith("more\n" + CLOSING_TEXT.split("</think>")[0])
    assert CLOSING_TEXT.startswith("\n\nConsidering the limited time by the user, I have to ")
    assert fin.answer == "42." and done[0].tokens == fin.stats.reasoning_tokens


def test_real_model_that_never_closes_answers_up_to_max_tokens(tiny):
    model, tok = tiny
    ban = mx.array([tok.think_end_id, *tok.eos_ids])

    def never_stop(tokens, logits):
        logits[..., ban] = -mx.inf
        return logits

    prompt = tok.encode(PROMPT + "<think>\n")  # starts inside the think block
    events = list(
        stream_generate(model, tok, prompt, sampling=GREEDY, thinking_budget=10, grace=4,
                        max_tokens=12, logits_processors=[never_stop])
    )  # fmt: skip
    fin = events[-1]
    assert fin.stats.budget_hit and fin.stats.finish_reason == "length"
    assert fin.stats.answer_tokens == 12  # the answer gets its full max_tokens
    closing = tok.encode(CLOSING_TEXT)
    gen = list(fin.token_ids)
    end = gen.index(tok.think_end_id)
    head = closing.index(tok.think_end_id)  # forced reasoning tokens before </think>
    assert 10 <= end - head <= 14 and gen[end - head : end + 1] == closing[: head + 1]
    assert fin.stats.reasoning_tokens == end  # own + forced, </think> itself not counted
    answer_text = "".join(e.text for e in events if isinstance(e, AnswerText))
    assert answer_text.strip() == fin.answer


def test_without_a_budget_thinking_is_bounded_only_by_the_context(tiny):
    _, tok = tiny
    model = EndlessThinker(tok)
    ids = tok.encode(PROMPT)
    fin = list(stream_generate(model, tok, ids, sampling=GREEDY, max_tokens=5,
                               context_length=len(ids) + 300))[-1]  # fmt: skip
    assert fin.stats.finish_reason == "context" and not fin.stats.budget_hit
    assert len(fin.token_ids) == 300 and fin.stats.reasoning_tokens == 299
    assert fin.stats.answer_tokens == 0


def test_events_reassemble_a_reply_whose_model_opened_the_think_block(tiny):
    _, tok = tiny
    model = EndlessThinker(tok)
    events = list(stream_generate(model, tok, tok.encode("<|im_start|>assistant\n"),
                                  sampling=GREEDY, thinking_budget=6))  # fmt: skip
    text = tok.decode(list(events[-1].token_ids))
    reasoning, answer = text.split("</think>")
    shown = "".join(e.text for e in events if isinstance(e, ReasoningText))
    assert shown == reasoning.replace("<think>", "").lstrip("\n")
    assert shown.endswith(CLOSING_TEXT.split("</think>")[0])  # the forced part is reasoning
    said = "".join(e.text for e in events if isinstance(e, AnswerText))
    assert said == answer.replace("<|im_end|>", "").lstrip("\n") == " 42."


def test_a_session_interrupted_mid_thought_then_answers_within_the_budget(tiny):
    _, tok = tiny
    s = ChatSession(EndlessThinker(tok), tok, sampling=GREEDY, max_tokens=30, budget=5)
    stream = s.send("Tell me a story")
    for i, _ in enumerate(stream):
        if i == 2:
            break  # as if Ctrl-C arrived mid-thought
    stream.close()
    s.abort()
    last = s.messages[-1]
    assert last["role"] == "assistant" and last["interrupted"] and last["reasoning_content"]
    nxt = list(s.send("Another?"))[-1]
    assert nxt.answer == "42." and nxt.stats.budget_hit
    fresh = ChatSession(EndlessThinker(tok), tok, sampling=GREEDY, max_tokens=30, budget=5)
    fresh.load_messages(s.messages[:2])
    assert list(fresh.send("Another?"))[-1].token_ids == nxt.token_ids
