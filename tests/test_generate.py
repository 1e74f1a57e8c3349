"""stream_generate on a tiny real model: tokens equal a cache-free greedy loop, events
reassemble the tokens, phases come from token ids, stats, stops and bad input."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen3_chat import SamplingParams
from qwen3_chat.engine.budget import CLOSING_TEXT
from qwen3_chat.engine.defaults import PRESENCE_PENALTY_MAX
from qwen3_chat.engine.events import AnswerText, Finished, ReasoningText, ThinkingDone
from qwen3_chat.engine.generate import DEFAULT_PREFILL_STEP, prefill, stream_generate
from qwen3_chat.errors import Qwen3ChatError, SettingsError
from qwen3_chat.models.cache import KVCache

GREEDY = SamplingParams(temperature=0)
PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def run(model, tok, ids, **kw) -> list:
    return list(stream_generate(model, tok, ids, **{"sampling": GREEDY, **kw}))


def recorder(store: list):
    """A logits processor that records the logits it sees (and changes nothing)."""

    def record(tokens, logits):
        store.append(np.array(logits))
        return logits

    return record


def naive_greedy(model, ids: list[int], n: int) -> list[int]:
    """Recompute the whole sequence each step, no cache: the reference for greedy decoding."""
    out = list(ids)
    for _ in range(n):
        logits = model(mx.array([out], dtype=mx.int32))
        out.append(int(mx.argmax(logits[0, -1]).item()))
    return out[len(ids) :]


def test_greedy_tokens_equal_a_cache_free_loop(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT)
    fin = run(model, tok, ids, max_tokens=12)[-1]
    expected = naive_greedy(model, ids, len(fin.token_ids))
    assert list(fin.token_ids) == expected and len(expected) >= 1


def test_chunked_prefill_matches_one_chunk(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT * 3)
    one, chunked = model.make_cache(), model.make_cache()
    a = prefill(model, ids, one, step=4096)
    b = prefill(model, ids, chunked, step=7)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
    assert one[0].offset == chunked[0].offset == len(ids)
    fa = run(model, tok, ids, max_tokens=6, prefill_step=5)[-1]
    fb = run(model, tok, ids, max_tokens=6)[-1]
    assert fa.token_ids == fb.token_ids


def test_events_reassemble_exactly_the_decoded_tokens(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT + "<think>\n")
    events = run(model, tok, ids, thinking_budget=8, grace=4, max_tokens=10)
    fin = events[-1]
    gen = list(fin.token_ids)
    end = gen.index(tok.think_end_id)
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningText))
    answer = "".join(e.text for e in events if isinstance(e, AnswerText))
    assert reasoning == tok.decode(gen[:end]).lstrip("\n")
    rest = [t for t in gen[end + 1 :] if t not in tok.eos_ids]
    assert answer == tok.decode(rest).lstrip("\n")
    assert fin.reasoning == reasoning.strip() and fin.answer == answer.strip()
    # Special tokens never appear as text.
    assert "<think>" not in reasoning + answer and "</think>" not in reasoning + answer
    kinds = [type(e) for e in events]
    assert kinds.count(ThinkingDone) == 1 and kinds.count(Finished) == 1
    assert kinds.index(ThinkingDone) > max(i for i, k in enumerate(kinds) if k is ReasoningText)


def force_after(tok, n: int, target: int):
    """A processor that makes `target` the only choice right after `n` generated tokens,
    and bans the think markers everywhere else (this random model repeats its input)."""
    markers = mx.array([tok.think_start_id, tok.think_end_id])

    def force(tokens, logits):
        if tokens.size == n:
            return mx.full(logits.shape, -1e9).at[..., target].add(2e9)
        logits[..., markers] = -mx.inf
        return logits

    return force


def ban_markers(tok):
    markers = mx.array([tok.think_start_id, tok.think_end_id, *tok.eos_ids])

    def ban(tokens, logits):
        logits[..., markers] = -mx.inf
        return logits

    return ban


def script(tok, plan: dict[int, int]):
    """Force `plan[n]` as the token after n generated ones; elsewhere no marker or eos."""
    ban = ban_markers(tok)

    def force(tokens, logits):
        if tokens.size in plan:
            return mx.full(logits.shape, -1e9).at[..., plan[tokens.size]].add(2e9)
        return ban(tokens, logits)

    return force


def test_the_budget_counts_every_think_block_and_only_reasoning(tiny):
    model, tok = tiny
    start, end = tok.think_start_id, tok.think_end_id
    # <think> r r r </think> a a <think> r r | budget 5 spent: the closing is forced.
    plan = {0: start, 4: end, 7: start}
    events = run(model, tok, tok.encode(PROMPT), thinking_budget=5, grace=0, max_tokens=6,
                 logits_processors=[script(tok, plan)])  # fmt: skip
    fin = events[-1]
    gen, closing = list(fin.token_ids), tok.encode(CLOSING_TEXT)
    assert gen[0] == start and gen[4] == end and gen[7] == start
    assert gen[10 : 10 + len(closing)] == closing and fin.stats.budget_hit
    head = closing.index(end)  # forced reasoning tokens before </think>
    assert fin.stats.reasoning_tokens == 3 + 2 + head
    assert fin.stats.answer_tokens == 6 and fin.stats.finish_reason == "length"
    done = [e for e in events if isinstance(e, ThinkingDone)]
    assert len(done) == 1 and done[0].tokens == 3 and not done[0].budget_hit


def test_phase_comes_from_token_ids_not_text(tiny):
    model, tok = tiny
    # A prompt ending inside an open <think> starts in reasoning.
    inside = run(model, tok, tok.encode(PROMPT + "<think>\n"), max_tokens=5,
                 logits_processors=[force_after(tok, 3, tok.think_end_id)])  # fmt: skip
    fin = inside[-1]
    assert fin.stats.reasoning_tokens == 3 and fin.stats.answer_tokens == 5
    assert [type(e) for e in inside].count(ThinkingDone) == 1
    # A prompt with a closed think block starts in the answer; a generated <think> opens one.
    closed = tok.encode(PROMPT + "<think>\n\n</think>\n\n")
    fin = run(model, tok, closed, max_tokens=4)[-1]
    assert fin.stats.reasoning_tokens == 0 and fin.stats.answer_tokens == 4
    opened = run(model, tok, closed, max_tokens=4, context_length=len(closed) + 12,
                 logits_processors=[force_after(tok, 2, tok.think_start_id)])[-1]  # fmt: skip
    # 2 answer tokens, <think>, then reasoning until the context is full.
    assert (opened.stats.answer_tokens, opened.stats.reasoning_tokens) == (2, 9)
    assert opened.token_ids[2] == tok.think_start_id and opened.reasoning


def test_stops_at_any_eos_without_emitting_it(tiny):
    model, tok = tiny
    for eos in sorted(tok.eos_ids):
        events = run(model, tok, tok.encode(PROMPT), max_tokens=50,
                     logits_processors=[force_after(tok, 4, eos)])  # fmt: skip
        fin = events[-1]
        assert fin.stats.finish_reason == "stop" and fin.token_ids[-1] == eos
        assert len(fin.token_ids) == 5 and fin.stats.answer_tokens == 4
        text = "".join(e.text for e in events if isinstance(e, AnswerText))
        assert "<|im_end|>" not in text and "<|endoftext|>" not in text


def test_a_model_looping_on_a_marker_still_stops(tiny):
    model, tok = tiny
    # This random model repeats its last input token: after </think> it says </think>
    # forever. Stray markers count as answer tokens, so max_tokens still ends the turn.
    end = tok.think_end_id

    def close_at_2(tokens, logits):
        return mx.full(logits.shape, -1e9).at[..., end].add(2e9) if tokens.size == 2 else logits

    fin = run(model, tok, tok.encode(PROMPT + "<think>\n"), max_tokens=6,
              logits_processors=[close_at_2])[-1]  # fmt: skip
    assert list(fin.token_ids[2:]) == [end] * 7  # the model's own loop, not the processor's
    assert fin.stats.finish_reason == "length" and fin.stats.answer_tokens == 6
    assert fin.answer == ""


def test_stats(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT)
    fin = run(model, tok, ids, max_tokens=9)[-1]
    st = fin.stats
    assert st.finish_reason == "length" and st.answer_tokens == 9 and len(fin.token_ids) == 9
    assert st.prompt_tokens == st.prefill_tokens == len(ids)
    assert 0 < st.ttft_s <= st.total_s and st.prefill_tps > 0 and st.decode_tps > 0
    assert st.peak_memory_gb > 0 and not st.budget_hit


def test_cache_reuse_gives_the_same_logits_as_from_scratch(tiny):
    model, tok = tiny
    first = tok.encode(PROMPT)
    second = tok.encode(PROMPT + "4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
                        "<|im_start|>assistant\n")  # fmt: skip
    cache = model.make_cache()
    run(model, tok, first, cache=cache, max_tokens=3)
    keep = len(first) - 2  # back into the first prompt, as when a template drops text
    for c in cache:
        c.trim(c.offset - keep)
    reused, fresh = [], []
    a = run(model, tok, second[keep:], cache=cache, max_tokens=6,
            logits_processors=[recorder(reused)])[-1]  # fmt: skip
    b = run(model, tok, second, max_tokens=6, logits_processors=[recorder(fresh)])[-1]
    assert a.token_ids == b.token_ids
    assert a.stats.prefill_tokens == len(second) - keep and a.stats.prompt_tokens == len(second)
    for x, y in zip(reused, fresh, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_penalties_see_the_token_just_sampled(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT)
    plain = run(model, tok, ids, max_tokens=30)[-1].token_ids
    assert len(set(plain)) < len(plain)  # this random model repeats itself...
    params = SamplingParams(temperature=0, presence_penalty=PRESENCE_PENALTY_MAX)
    # Past the user-facing bound (set around the check): a penalty so large that the engine
    # must forbid every repeat, which only holds if it counts each token as it is sampled.
    object.__setattr__(params, "presence_penalty", 1e6)
    pen = run(model, tok, ids, sampling=params, max_tokens=30)[-1].token_ids
    assert len(set(pen)) == len(pen)  # ...and a huge presence penalty forbids any repeat


def test_running_penalties_match_penalties_over_the_history_through_a_replaced_token(tiny):
    # The engine keeps running counts; processors over the generated ids are the reference.
    # A sampled token replaced by a forced run (as the budget does) must leave no trace.
    from qwen3_chat.engine.generate import generate_tokens
    from qwen3_chat.engine.sampling import Penalties, make_logits_processors

    model, tok = tiny
    ids = tok.encode(PROMPT)
    params = SamplingParams(temperature=0, presence_penalty=1.5, repetition_penalty=1.5)
    forced = tok.encode(" forced run")

    def collect(**kw) -> tuple[list[int], list[np.ndarray], list[int]]:
        seen, replaced, logits = [], [], []

        def sample(x):
            logits.append(np.array(x))
            return mx.argmax(x, axis=-1)

        def override(t):
            if replaced or not seen or t in seen or t in forced:
                return None
            replaced.append(t)  # a token not generated before: its count must go back to 0
            return forced

        for t, _ in generate_tokens(model, ids, model.make_cache(), sample, override=override,
                                    **kw):  # fmt: skip
            seen.append(t)
            if len(seen) == 12:
                break
        return seen, logits, replaced

    running = collect(processors=(), penalties=Penalties(params))
    reference = collect(processors=make_logits_processors(params))
    assert running[2] and running[2] == reference[2] and running[0] == reference[0]
    for a, b in zip(running[1], reference[1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_seeded_generation_is_reproducible(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT)
    params = SamplingParams(temperature=50.0, top_p=1.0, top_k=0, seed=11)  # flat: random
    a = run(model, tok, ids, sampling=params, max_tokens=15)[-1].token_ids
    b = run(model, tok, ids, sampling=params, max_tokens=15)[-1].token_ids
    c = run(model, tok, ids, sampling=params.replace(seed=12), max_tokens=15)[-1].token_ids
    assert a == b and a != c


def test_a_full_context_is_its_own_finish_reason_not_max_tokens(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT)
    fin = run(model, tok, ids, max_tokens=100, context_length=len(ids) + 6)[-1]
    assert fin.stats.finish_reason == "context" and len(fin.token_ids) == 6
    # Reasoning that fills the context is "context" too; max_tokens reached first is "length".
    think = tok.encode(PROMPT + "<think>\n")
    fin = run(model, tok, think, max_tokens=2, context_length=len(think) + 5,
              logits_processors=[ban_markers(tok)])[-1]  # fmt: skip
    assert (fin.stats.finish_reason, fin.stats.reasoning_tokens) == ("context", 5)
    fin = run(model, tok, ids, max_tokens=5, context_length=len(ids) + 5)[-1]
    assert (fin.stats.finish_reason, fin.stats.answer_tokens) == ("length", 5)


def test_the_cached_part_of_the_prompt_decides_the_phase_when_told(tiny):
    # Thinking-2507: the template opens <think>; with a prompt cache only "\n" is new.
    model, tok = tiny
    ids = tok.encode(PROMPT + "<think>\n")
    closer = force_after(tok, 3, tok.think_end_id)
    whole = run(model, tok, ids, max_tokens=4, logits_processors=[closer])[-1]
    cache = model.make_cache()
    prefill(model, ids[:-1], cache)
    cached = run(model, tok, ids[-1:], cache=cache, max_tokens=4, in_think=True,
                 prompt_tokens=len(ids), logits_processors=[closer])[-1]  # fmt: skip
    assert cached.token_ids == whole.token_ids
    assert (cached.reasoning, cached.answer) == (whole.reasoning, whole.answer)
    assert cached.stats.reasoning_tokens == whole.stats.reasoning_tokens == 3


class BreakAt(KVCache):
    """A layer cache whose `n`-th write raises KeyboardInterrupt, as Ctrl-C mid-forward."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.writes = n, 0

    def update_and_fetch(self, k, v):
        self.writes += 1
        if self.writes == self.n:
            raise KeyboardInterrupt
        return super().update_and_fetch(k, v)


def test_prefill_is_interruptible_between_small_chunks_and_rewinds_to_whole_ones(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT * 200)  # ~3k tokens: several default chunks
    assert len(ids) > 4 * DEFAULT_PREFILL_STEP and DEFAULT_PREFILL_STEP <= 512
    cache = model.make_cache()
    cache[-1] = BreakAt(4)  # the last layer fails in chunk 4, after the first has written
    with pytest.raises(KeyboardInterrupt):
        prefill(model, ids, cache)
    done = 3 * DEFAULT_PREFILL_STEP
    assert [c.offset for c in cache] == [done] * len(cache)  # whole chunks, every layer
    # What the cache holds is exactly the prompt's first chunks: generation resumes there.
    cache[-1].n = 0
    a = run(model, tok, ids[done:], cache=cache, max_tokens=5)[-1]
    b = run(model, tok, ids, max_tokens=5)[-1]
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize(
    "ids, kw, match",
    [
        ([], {}, "empty"),
        ([5, 151936], {}, "outside the vocabulary"),
        ([5] * 10, {"context_length": 10}, "longer than the model's context of 10"),
    ],
)
def test_bad_prompts_raise_named_errors(tiny, ids, kw, match):
    model, tok = tiny
    with pytest.raises(Qwen3ChatError, match=match):
        run(model, tok, ids, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1, not 0"),
        ({"max_tokens": "9"}, "max_tokens must be an integer >= 1, not '9'"),
        ({"thinking_budget": -1}, "thinking budget must be an integer >= 0, not -1"),
        ({"thinking_budget": True}, "thinking budget must be an integer >= 0, not True"),
        ({"grace": -2}, "grace must be an integer >= 0"),
        ({"prefill_step": 0}, "prefill_step must be an integer >= 1"),
    ],
)
def test_bad_settings_raise_a_settings_error_before_any_work(tiny, kw, match):
    model, tok = tiny
    cache = model.make_cache()
    with pytest.raises(SettingsError, match=match):
        run(model, tok, [5, 6], cache=cache, **kw)
    assert cache[0].offset == 0


def test_generation_works_from_another_thread_after_the_main_one(tiny):
    """A server generates on a worker thread; MLX streams belong to their thread, so the
    generation stream is per thread (a shared one failed: no Stream(cpu, N) in this thread)."""
    import threading

    from qwen3_chat.engine.generate import release_thread_streams

    model, tok = tiny
    ids = tok.encode("Hello there")

    def tokens() -> tuple[int, ...]:
        return [e for e in stream_generate(model, tok, ids, sampling=SamplingParams(temperature=0),
                                           max_tokens=4) if isinstance(e, Finished)][0].token_ids

    first = tokens()
    result: list = []

    def work() -> None:
        try:
            result.append(tokens())
        finally:
            release_thread_streams()  # as the server's worker does: MLX 0.32 aborts otherwise

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert result == [first]
