"""Streaming generation, in layers: prefill/decode → token ids → typed events with stats.

The decode loop queues step n+1 with `mx.async_eval` before it hands token n on, so the
GPU (or CPU) works while Python handles the previous token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import mlx.core as mx

from qwen3_chat.engine.budget import CLOSING_TEXT, DEFAULT_GRACE, ThinkingBudget
from qwen3_chat.engine.compiled import Decoder, decoder_for, eager_decode
from qwen3_chat.engine.defaults import DEFAULT_MAX_TOKENS
from qwen3_chat.engine.events import (
    AnswerText,
    Event,
    Finished,
    FinishReason,
    GenerationStats,
    ReasoningText,
    ThinkingDone,
)
from qwen3_chat.engine.phase import Kind, ThinkPhase
from qwen3_chat.engine.sampling import (
    LogitsProcessor,
    Penalties,
    SamplingParams,
    apply_processors,
    has_penalties,
    make_logits_processors,
    make_sampler,
)
from qwen3_chat.errors import Qwen3ChatError, SettingsError
from qwen3_chat.models.cache import KVCache

if TYPE_CHECKING:  # speculative builds on this module's token layer
    from qwen3_chat.engine.speculative import Speculation

__all__ = [
    "DEFAULT_MAX_TOKENS", "DEFAULT_PREFILL_STEP", "prefill", "release_thread_streams",
    "stream_generate",
]  # fmt: skip

# Ctrl-C reaches Python only between evaluations, so a chunk's compute time is how long an
# interrupt waits. 512 keeps that short at no measurable cost in prefill speed.
DEFAULT_PREFILL_STEP = 512

_streams = threading.local()  # MLX streams belong to the thread that made them


def generation_stream() -> mx.Stream:
    """A dedicated stream (one per thread) so generation overlaps with whatever else is queued."""
    stream = getattr(_streams, "stream", None)
    if stream is None:
        stream = _streams.stream = mx.new_stream(mx.default_device())
    return stream


def release_thread_streams() -> None:
    """Call last on a worker thread that ran MLX: MLX (0.32+) frees a thread's streams and
    compile cache only when asked, and freeing them later, at interpreter exit, aborts."""
    _streams.stream = None
    if hasattr(mx, "clear_streams"):  # older MLX cleans up by itself
        mx.synchronize()
        mx.clear_streams()


def cache_offset(cache: Sequence[KVCache]) -> int:
    """Tokens every layer holds (layers can differ after an interrupt mid-forward)."""
    return min((c.offset for c in cache), default=0)


def rewind(cache: Sequence[KVCache], offset: int) -> None:
    """Forget everything past `offset` in every layer."""
    for c in cache:
        c.trim(c.offset - offset)


def prefill(
    model, ids: Sequence[int], cache: list[KVCache], step: int = DEFAULT_PREFILL_STEP
) -> mx.array:
    """Run `ids` through the model in chunks; returns the next-token logits [1, V].

    Each chunk but the last is evaluated before the next is queued, so an interrupt lands
    between chunks; the cache is then rewound to the last whole chunk, so its offset says
    exactly how much of the prompt was prefilled.
    """
    ids = list(ids)
    chunks = [ids[i : i + step] for i in range(0, len(ids), step)]
    done = cache_offset(cache)
    try:
        for chunk in chunks[:-1]:
            model(mx.array([chunk], dtype=mx.int32), cache=cache, last_only=True)
            mx.eval([c.state for c in cache])
            done += len(chunk)
        return model(mx.array([chunks[-1]], dtype=mx.int32), cache=cache, last_only=True)[:, -1]
    except BaseException:
        rewind(cache, done)
        raise


# Feed one token (or a forced run of tokens); returns the next-token logits [1, V].
decode_one_token: Decoder = eager_decode


@dataclass
class TokenStream:
    """Timing of the token layer, read by the event layer for stats."""

    start: float = 0.0
    first_token: float = 0.0
    prefill_tokens: int = 0


# override(token) -> None to keep a sampled token, or the ids to feed in its place.
Override = Callable[[int], "list[int] | None"]


def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    cache: list[KVCache],
    sampler,
    processors: Sequence[LogitsProcessor],
    override: Override | None = None,
    prefill_step: int = DEFAULT_PREFILL_STEP,
    timing: TokenStream | None = None,
    decoder: Decoder = decode_one_token,
    penalties: Penalties | None = None,
) -> Iterator[tuple[int, bool]]:
    """The token layer: yield (token id, forced) pairs, endlessly; the caller stops it.
    `decoder` runs one step (engine.compiled has a faster one than the eager forward).
    `penalties` (running counts) apply before `processors`, which see the ids generated."""
    timing = timing or TokenStream()
    # What was generated so far stays lazy: the step for token n+1 is queued before token
    # n is read back, and its penalties must already include token n. The id array is
    # only kept for `processors` (it is re-concatenated every token).
    history = mx.zeros((0,), dtype=mx.int32)

    def pick(logits: mx.array) -> mx.array:
        if penalties is not None:
            logits = penalties(logits)
        return sampler(apply_processors(processors, history, logits))

    def step(fed: mx.array) -> mx.array:
        nonlocal history
        if penalties is not None:
            penalties.add(fed)
        if processors:
            history = mx.concatenate([history, fed.reshape(-1).astype(mx.int32)])
        with mx.stream(generation_stream()):
            return pick(decoder(model, fed, cache))

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
        rewind(cache, cache_offset(cache) - 1)
        if penalties is not None:
            penalties.add(y, -1)
        if processors:
            history = history[:-1]
        for t in forced:
            yield t, t != token
        y = step(mx.array(forced, dtype=mx.int32))
        mx.async_eval(y)


@dataclass
class TurnText:
    """The event layer: token ids in, text events out, split by the one phase tracker."""

    tokenizer: object
    phase: ThinkPhase
    counts: dict[Kind, int] = field(default_factory=lambda: {Kind.REASONING: 0, Kind.ANSWER: 0})
    texts: dict[Kind, list[str]] = field(
        default_factory=lambda: {Kind.REASONING: [], Kind.ANSWER: []}
    )
    think_started: float | None = None
    thinking_done: bool = False

    def __post_init__(self) -> None:
        self.detok = self.tokenizer.detokenizer()

    def _emit(self, text: str, kind: Kind) -> Event | None:
        if not self.texts[kind]:
            text = text.lstrip("\n")  # the template puts newlines after <think> / </think>
        if not text:
            return None
        self.texts[kind].append(text)
        return ReasoningText(text) if kind is Kind.REASONING else AnswerText(text)

    def on_token(self, token: int, budget_hit: bool, first_token: float) -> Iterator[Event]:
        kind = self.phase.feed(token)
        if kind in (Kind.OPEN, Kind.CLOSE):
            before = Kind.ANSWER if kind is Kind.OPEN else Kind.REASONING
            if (ev := self._emit(self.detok.flush(), before)) is not None:
                yield ev
            if kind is Kind.OPEN:
                self.think_started = self.think_started or time.perf_counter()
            elif not self.thinking_done:  # one ThinkingDone per turn, at the first close
                self.thinking_done = True
                began = self.think_started or first_token
                n = self.counts[Kind.REASONING]
                yield ThinkingDone(n, time.perf_counter() - began, budget_hit)
            return
        # A stray marker (</think> in the answer, <think> inside a think block) is no
        # text, but it counts, so a model looping on one still stops.
        self.counts[kind] += 1
        if not self.phase.is_marker(token):
            if (ev := self._emit(self.detok.add(token), kind)) is not None:
                yield ev

    def flush(self) -> Event | None:
        kind = Kind.REASONING if self.phase.inside else Kind.ANSWER
        return self._emit(self.detok.flush(), kind)

    def text(self, kind: Kind) -> str:
        return "".join(self.texts[kind]).strip()


def _check_request(
    model,
    prompt_ids: list[int],
    held: int,
    context: int | None,
    max_tokens: int,
    thinking_budget: int | None,
    grace: int,
    prefill_step: int,
) -> None:
    """Reject bad requests with a named problem instead of an error from inside MLX."""
    for name, value, low in (("max_tokens", max_tokens, 1), ("grace", grace, 0),
                             ("prefill_step", prefill_step, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SettingsError(f"{name} must be an integer >= {low}, not {value!r}")
    if thinking_budget is not None and (
        isinstance(thinking_budget, bool) or not isinstance(thinking_budget, int)
        or thinking_budget < 0
    ):  # fmt: skip
        raise SettingsError(f"the thinking budget must be an integer >= 0, not {thinking_budget!r}")
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
    prefill_step: int = DEFAULT_PREFILL_STEP,
    prompt_tokens: int | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    context_length: int | None = None,
    in_think: bool | None = None,
    decoder: Decoder | None = None,
    speculation: Speculation | None = None,
) -> Iterator[Event]:
    """Generate a reply to `prompt_ids`, yielding reasoning/answer text and a final Finished.

    `max_tokens` bounds the answer tokens after thinking ("length"); reasoning is bounded
    by `thinking_budget` (plus grace and the forced closing), or only by the context
    ("context") when it is None. With `cache`, `prompt_ids` are only the tokens not yet in
    it, `prompt_tokens` the whole prompt's length (for stats), and `in_think` whether the
    whole prompt ends inside an open <think> (None: judged from `prompt_ids`, which only
    works when the cached part cannot matter). `context_length` defaults to the model's
    max_position_embeddings. `decoder` defaults to the model's compiled step where it has
    one; `speculation` (engine.speculative) drafts tokens and verifies them exactly.
    """
    prompt_ids = list(prompt_ids)
    cache = cache if cache is not None else model.make_cache()
    held = cache_offset(cache)  # tokens already in the cache
    context = context_length or getattr(model.config, "max_position_embeddings", None)
    _check_request(model, prompt_ids, held, context, max_tokens, thinking_budget, grace,
                   prefill_step)  # fmt: skip
    sampling = sampling or SamplingParams.for_mode(True)
    start_id, end_id = tokenizer.think_start_id, tokenizer.think_end_id
    if in_think is None:
        in_think = ThinkPhase.ends_inside(prompt_ids, start_id, end_id)
    phase = ThinkPhase(start_id, end_id, in_think)
    budget = None
    if thinking_budget is not None and end_id is not None:
        budget = ThinkingBudget(thinking_budget, tokenizer.encode(CLOSING_TEXT), grace)

    def override(token: int) -> list[int] | None:
        # Only the model's own reasoning tokens spend the budget; the phase says which.
        if budget is None or phase.peek(token) is not Kind.REASONING:
            return None
        return budget.on_reasoning_token(token, tokenizer.decode([token]))

    timing = TokenStream()
    mx.reset_peak_memory()
    if speculation is not None and speculation.applies(model, cache):
        # Speculation verifies drafts against processors over the ids (penalties included).
        processors = [*make_logits_processors(sampling), *logits_processors]

        def answer_left() -> int | None:
            # max_tokens bounds the answer only: while reasoning, nothing caps the drafts.
            return None if phase.inside else max_tokens - text.counts[Kind.ANSWER]

        tokens = speculation.tokens(
            model, prompt_ids, cache, sampling, processors, override, prefill_step, timing,
            limit=context, left=answer_left,
        )  # fmt: skip
    else:
        penalties = Penalties(sampling) if has_penalties(sampling) else None
        tokens = generate_tokens(
            model, prompt_ids, cache, make_sampler(sampling), logits_processors, override,
            prefill_step, timing, decoder or decoder_for(model), penalties,
        )  # fmt: skip
    text = TurnText(tokenizer, phase)
    generated: list[int] = []
    room = context - held - len(prompt_ids) if context else None  # tokens left to generate
    finish: FinishReason | None = None
    try:
        for token, _forced in tokens:
            generated.append(token)
            if token in tokenizer.eos_ids:
                finish = "stop"
                break
            yield from text.on_token(token, bool(budget and budget.hit), timing.first_token)
            if text.counts[Kind.ANSWER] >= max_tokens:
                finish = "length"
            elif room is not None and len(generated) >= room:
                finish = "context"
            if finish:
                break
    finally:
        tokens.close()
    if (ev := text.flush()) is not None:
        yield ev
    stats = _stats(timing, generated, text, budget, finish or "stop",
                   prompt_tokens if prompt_tokens is not None else held + len(prompt_ids))
    if speculation is not None:
        stats = replace(stats, speculation=speculation.report())
    yield Finished(stats, text.text(Kind.REASONING), text.text(Kind.ANSWER), tuple(generated))


def _stats(
    timing: TokenStream,
    generated: list[int],
    text: TurnText,
    budget: ThinkingBudget | None,
    finish: FinishReason,
    prompt_tokens: int,
) -> GenerationStats:
    end = time.perf_counter()
    first = timing.first_token or end
    prefill_s = max(first - timing.start, 1e-9)
    n = len(generated)
    return GenerationStats(
        prompt_tokens=prompt_tokens,
        prefill_tokens=timing.prefill_tokens,
        reasoning_tokens=text.counts[Kind.REASONING],
        answer_tokens=text.counts[Kind.ANSWER],
        prefill_tps=timing.prefill_tokens / prefill_s,
        decode_tps=(n - 1) / (end - first) if n > 1 and end > first else 0.0,
        ttft_s=prefill_s,
        total_s=end - timing.start,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
        budget_hit=bool(budget and budget.hit),
    )
