"""Streaming generation, in layers: prefill/decode → token ids → typed events with stats.

The decode loop queues step n+1 with `mx.async_eval` before it hands token n on, so the
GPU (or CPU) works while Python handles the previous token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from qwen3_chat.engine.budget import CLOSING_TEXT, DEFAULT_GRACE, ThinkingBudget
from qwen3_chat.engine.events import (
    AnswerText,
    Event,
    Finished,
    GenerationStats,
    ReasoningText,
    ThinkingDone,
)
from qwen3_chat.engine.sampling import (
    LogitsProcessor,
    SamplingParams,
    apply_processors,
    make_logits_processors,
    make_sampler,
)
from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.models.cache import KVCache

DEFAULT_MAX_TOKENS = 8192


_stream: mx.Stream | None = None


def generation_stream() -> mx.Stream:
    """A dedicated stream so generation work overlaps with whatever else is queued."""
    global _stream
    if _stream is None:
        _stream = mx.new_stream(mx.default_device())
    return _stream


def prefill(model, ids: Sequence[int], cache: list[KVCache], step: int = 2048) -> mx.array:
    """Run `ids` through the model in chunks; returns the next-token logits [1, V]."""
    ids = list(ids)
    for start in range(0, len(ids) - step, step):
        model(mx.array([ids[start : start + step]], dtype=mx.int32), cache=cache, last_only=True)
        mx.eval([c.state for c in cache])
    tail = ids[(max(len(ids) - 1, 0) // step) * step :]
    return model(mx.array([tail], dtype=mx.int32), cache=cache, last_only=True)[:, -1, :]


def decode_one_token(model, tokens: Sequence[int] | mx.array, cache: list[KVCache]) -> mx.array:
    """Feed one token (or a forced run of tokens); returns the next-token logits [1, V]."""
    x = tokens if isinstance(tokens, mx.array) else mx.array(list(tokens), dtype=mx.int32)
    return model(x.reshape(1, -1), cache=cache, last_only=True)[:, -1, :]


@dataclass
class TokenStream:
    """Timing of the token layer, read by the event layer for stats."""

    start: float = 0.0
    first_token: float = 0.0
    prefill_tokens: int = 0


def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    cache: list[KVCache],
    sampler,
    processors: Sequence[LogitsProcessor],
    override=None,
    prefill_step: int = 2048,
    timing: TokenStream | None = None,
) -> Iterator[tuple[int, bool]]:
    """Yield (token id, forced) pairs. `override(id) -> ids | None` may replace a token."""
    timing = timing or TokenStream()
    # Generated tokens so far, kept as a lazy array: the step for token n+1 is queued
    # before token n is read back, and its penalties must already include token n.
    history = mx.zeros((0,), dtype=mx.int32)

    def pick(logits: mx.array) -> mx.array:
        return sampler(apply_processors(processors, history, logits))

    def step(fed: mx.array) -> mx.array:
        nonlocal history
        if processors:
            history = mx.concatenate([history, fed.reshape(-1).astype(mx.int32)])
        with mx.stream(generation_stream()):
            return pick(decode_one_token(model, fed, cache))

    timing.start = time.perf_counter()
    timing.prefill_tokens = len(prompt_ids)
    with mx.stream(generation_stream()):
        y = pick(prefill(model, prompt_ids, cache, prefill_step))
    mx.async_eval(y)
    while True:
        next_y = step(y)  # speculatively queue the next step before looking at this token
        mx.async_eval(next_y)
        token = y.item()
        if not timing.first_token:
            timing.first_token = time.perf_counter()
        forced = override(token) if override is not None else None
        if forced is None:
            yield token, False
            y = next_y
            continue
        # Replace the token: undo the speculative step and feed the forced run instead.
        for c in cache:
            c.trim(1)
        if processors:
            history = history[:-1]
        for t in forced:
            yield t, t != token
        y = step(mx.array(forced, dtype=mx.int32))
        mx.async_eval(y)


def _initial_reasoning(prompt_ids: Sequence[int], start_id: int | None, end_id: int | None) -> bool:
    """True when the prompt ends inside an open <think> (Thinking-2507 templates do this)."""
    if start_id is None:
        return False
    for t in reversed(prompt_ids):
        if t == end_id:
            return False
        if t == start_id:
            return True
    return False


def _check_request(
    model,
    prompt_ids: list[int],
    held: int,
    context: int | None,
    max_tokens: int,
    thinking_budget: int | None,
    grace: int,
) -> None:
    """Reject bad requests with a named problem instead of an error from inside MLX."""
    if not prompt_ids:
        raise Qwen3ChatError("the prompt is empty: at least one new token is needed")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and not all(0 <= t < vocab for t in prompt_ids):
        bad = next(t for t in prompt_ids if not 0 <= t < vocab)
        raise Qwen3ChatError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
    if context is not None and held + len(prompt_ids) >= context:
        raise Qwen3ChatError(
            f"the prompt is {held + len(prompt_ids)} tokens, longer than the model's context "
            f"of {context}"
        )
    if max_tokens < 1:
        raise Qwen3ChatError(f"max_tokens must be at least 1, not {max_tokens}")
    if thinking_budget is not None and thinking_budget < 0:
        raise Qwen3ChatError(f"the thinking budget must be >= 0, not {thinking_budget}")
    if grace < 0:
        raise Qwen3ChatError(f"the grace window must be >= 0, not {grace}")


def stream_generate(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    *,
    cache: list[KVCache] | None = None,
    sampling: SamplingParams | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    thinking_budget: int | None = None,
    grace: int = DEFAULT_GRACE,
    prefill_step: int = 2048,
    prompt_tokens: int | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    context_length: int | None = None,
) -> Iterator[Event]:
    """Generate a reply to `prompt_ids`, yielding reasoning/answer text and a final Finished.

    `max_tokens` bounds the answer tokens after thinking; reasoning is bounded by
    `thinking_budget` (plus grace and the forced closing), or only by the context when it
    is None. With `cache`, `prompt_ids` are only the tokens not yet in it and
    `prompt_tokens` the whole prompt's length (for stats). `context_length` defaults to
    the model's max_position_embeddings; generation stops ("length") when it is full.
    """
    prompt_ids = list(prompt_ids)
    cache = cache if cache is not None else model.make_cache()
    held = min((c.offset for c in cache), default=0)  # tokens already in the cache
    context = context_length or getattr(model.config, "max_position_embeddings", None)
    _check_request(model, prompt_ids, held, context, max_tokens, thinking_budget, grace)
    sampling = sampling or SamplingParams.for_mode(True)
    start_id, end_id = tokenizer.think_start_id, tokenizer.think_end_id
    reasoning = _initial_reasoning(prompt_ids, start_id, end_id)
    budget = None
    if thinking_budget is not None and end_id is not None:
        closing = tokenizer.encode(CLOSING_TEXT)
        budget = ThinkingBudget(thinking_budget, closing, start_id, end_id, grace, reasoning)
    override = (lambda t: budget.on_token(t, tokenizer.decode([t]))) if budget else None
    processors = [*make_logits_processors(sampling), *logits_processors]
    timing = TokenStream()
    mx.reset_peak_memory()
    tokens = generate_tokens(
        model, prompt_ids, cache, make_sampler(sampling), processors, override,
        prefill_step, timing,
    )  # fmt: skip

    detok = tokenizer.detokenizer()
    texts: dict[bool, list[str]] = {True: [], False: []}  # reasoning / answer pieces
    counts = {True: 0, False: 0}
    generated: list[int] = []
    think_started: float | None = None
    thinking_done = False
    finish = "length"
    room = context - held - len(prompt_ids) if context else None  # tokens left to generate

    def emit(text: str, is_reasoning: bool):
        if not text:
            return None
        if not texts[is_reasoning]:
            text = text.lstrip("\n")  # the template puts newlines after <think> / </think>
            if not text:
                return None
        texts[is_reasoning].append(text)
        return ReasoningText(text) if is_reasoning else AnswerText(text)

    try:
        for token, _forced in tokens:
            generated.append(token)
            if token in tokenizer.eos_ids:
                finish = "stop"
                break
            if token == start_id and not reasoning:
                if (ev := emit(detok.flush(), reasoning)) is not None:
                    yield ev
                reasoning, think_started = True, think_started or time.perf_counter()
            elif token == end_id and reasoning:
                if (ev := emit(detok.flush(), True)) is not None:
                    yield ev
                reasoning = False
                if not thinking_done:  # one ThinkingDone per turn, at the first close
                    thinking_done = True
                    began = think_started or timing.first_token
                    hit = bool(budget and budget.hit)
                    yield ThinkingDone(counts[True], time.perf_counter() - began, hit)
            else:
                # A stray marker (</think> in the answer, <think> inside a think block)
                # is no text, but it counts, so a model looping on one still stops.
                counts[reasoning] += 1
                if token not in (start_id, end_id):
                    if (ev := emit(detok.add(token), reasoning)) is not None:
                        yield ev
            if counts[False] >= max_tokens or (room is not None and len(generated) >= room):
                break
    finally:
        tokens.close()
    if (ev := emit(detok.flush(), reasoning)) is not None:
        yield ev
    end = time.perf_counter()
    first = timing.first_token or end
    prefill_s = max(first - timing.start, 1e-9)
    n = len(generated)
    stats = GenerationStats(
        prompt_tokens=prompt_tokens if prompt_tokens is not None else held + len(prompt_ids),
        prefill_tokens=timing.prefill_tokens,
        reasoning_tokens=counts[True],
        answer_tokens=counts[False],
        prefill_tps=timing.prefill_tokens / prefill_s,
        decode_tps=(n - 1) / (end - first) if n > 1 and end > first else 0.0,
        ttft_s=prefill_s,
        total_s=end - timing.start,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
        budget_hit=bool(budget and budget.hit),
    )
    yield Finished(stats, "".join(texts[True]).strip(), "".join(texts[False]).strip(),
                   tuple(generated))  # fmt: skip
