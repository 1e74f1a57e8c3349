"""Speculative decoding, exact (issue 10, item 5): cheap drafts, verified by one forward.

A drafter proposes the next few tokens; the model runs the pending token and the drafts
in one forward and keeps the longest prefix its own sampling agrees with, plus one token
of its own, so every forward yields at least one token. Rejected drafts leave the KV cache
by `KVCache.trim`. Exactness:

- greedy: a draft is kept only if it is the argmax, so the output is plain greedy output;
- temperature > 0: rejection sampling (Leviathan et al. 2023). A draft d drawn from q is
  kept with probability min(1, p(d) / q(d)); on a rejection the token is drawn from
  max(p - q, 0) renormalised. Every emitted token is then distributed exactly as p, the
  target's own distribution after temperature, top-k, top-p and min-p. Prompt lookup is a
  point mass q (d with probability 1): keep d with probability p(d), else draw from p
  without d.

Every emitted token still goes through `override` (the thinking budget's forced tokens)
and the caller's stop rules, one by one, exactly as in plain decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx

from qwen3_chat.engine.compiled import decoder_for
from qwen3_chat.engine.generate import (
    Override,
    TokenStream,
    cache_offset,
    generate_tokens,
    generation_stream,
    prefill,
    rewind,
)
from qwen3_chat.engine.sampling import (
    LogitsProcessor,
    SamplingParams,
    apply_processors,
    keep_min_p,
    keep_top_k,
    keep_top_p,
    make_sampler,
)
from qwen3_chat.models.cache import KVCache

METHODS = ("auto", "off", "lookup", "draft")
# --speculate auto drafts only from a prompt this long (new tokens): a pasted diff or file.
AUTO_MIN_PROMPT = 256
# Longest pause in drafting after repeated misses: long enough to cost little on text that
# never repeats, short enough to pick up a quote that starts later.
MAX_PAUSE = 16


class Drafter(Protocol):
    def extend(self, tokens: Sequence[int]) -> None: ...

    def draft(self, k: int) -> tuple[list[int], mx.array | None]: ...

    def ready(self) -> bool: ...


class SpeculationError(ValueError):
    """A --speculate / --draft combination that cannot work."""


def make_speculation(method: str, draft: str | None = None) -> Speculation | None:
    """The policy for --speculate METHOD [--draft MODEL]; None for plain decoding.

    auto is prompt lookup for prompts long enough to be quoted (code review, edits, pasted
    text): on a short prompt drafts rarely hold, and on a CPU a rejected draft costs more
    than the compiled plain step it replaces (bench/speed.py measures both)."""
    if method not in METHODS:
        raise SpeculationError(f"--speculate must be one of {', '.join(METHODS)}, not {method!r}")
    if draft is not None and method != "draft":
        raise SpeculationError("--draft needs --speculate draft")
    if method == "draft" and draft is None:
        raise SpeculationError("--speculate draft needs --draft MODEL")
    if method == "off":
        return None
    return Speculation("draft" if method == "draft" else "lookup", auto=method == "auto")


@dataclass
class SpecStats:
    """What speculation did over one or more replies (read by --json and /stats)."""

    method: str
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, kept
    steps: int = 0  # target forwards after the prefill
    tokens: int = 0  # tokens those forwards produced

    def to_dict(self) -> dict:
        return {"method": self.method, "drafted": self.drafted, "accepted": self.accepted}

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


class PromptLookup:
    """n-gram drafts: after the last n tokens, propose what followed their latest earlier
    occurrence in the prompt or the reply so far (longest n first).

    The index maps each n-gram to where its continuation starts and is extended as tokens
    arrive, so a proposal costs O(max_ngram), whatever the length of the conversation.
    """

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.ids: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            # n-grams ending at the current end now have a continuation (t): index them.
            end = len(self.ids)
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self._index[tuple(self.ids[end - n : end])] = end
            self.ids.append(t)

    def propose(self, k: int) -> list[int]:
        if k <= 0:
            return []
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(self.ids) < n:
                continue
            start = self._index.get(tuple(self.ids[-n:]))
            if start is not None:
                return self.ids[start : start + k]
        return []

    def draft(self, k: int) -> tuple[list[int], None]:
        """Drafts and their distributions: lookup's are certain (None)."""
        return self.propose(k), None

    def ready(self) -> bool:
        """Whether the text so far ends in an n-gram seen before."""
        return bool(self.propose(1))


@dataclass
class DraftLength:
    """Adapt how many tokens to draft to how many were kept: grow while all are taken,
    fall back to just past the last kept one. A draft wholly rejected pauses drafting for
    a few steps (twice as many after each further miss), so text that does not repeat
    costs little more than plain decoding."""

    length: int = 4
    low: int = 1
    high: int = 10
    pause: int = 0  # steps left without drafting
    backoff: int = 1  # the next pause

    def next(self) -> int:
        """How many tokens to draft now (0 while paused); a paused step counts down."""
        if self.pause > 0:
            self.pause -= 1
            return 0
        return self.length

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == 0:
            self.pause, self.backoff = self.backoff, min(2 * self.backoff, MAX_PAUSE)
        else:
            self.backoff = 1
        if accepted == drafted:
            self.length = min(self.high, self.length + 2)
        else:
            self.length = max(self.low, accepted + 1)


@dataclass
class Verifier:
    """The target's choice at each verified position: greedy, or rejection sampling."""

    params: SamplingParams
    key: mx.array | None = None

    def __post_init__(self) -> None:
        if self.params.seed is not None and self.key is None:
            self.key = mx.random.key(self.params.seed)

    def next_key(self) -> mx.array | None:
        if self.key is None:
            return None  # MLX's global generator
        self.key, sub = mx.random.split(self.key)
        return sub

    def probs(self, logits: mx.array) -> mx.array:
        """The sampling distribution [n, V] for logits [n, V]: temperature, top-k, then
        top-p and min-p over the renormalised top-k (make_sampler's order)."""
        p = self.params
        lp = keep_top_k(logits.astype(mx.float32) / p.temperature, p.top_k)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        return mx.softmax(keep_min_p(keep_top_p(lp, p.top_p), p.min_p), axis=-1)

    def verify(
        self, logits: mx.array, drafts: Sequence[int], q: mx.array | None = None
    ) -> list[int]:
        """logits [len(drafts) + 1, V] (row i follows draft i - 1) -> the kept drafts and
        one more token. `q` [len(drafts), V]: the drafter's distributions (None: each
        draft was certain, as prompt lookup's are)."""
        k = len(drafts)
        if self.params.temperature <= 0:
            best = mx.argmax(logits, axis=-1).tolist()
            j = 0
            while j < k and best[j] == drafts[j]:
                j += 1
            return [*drafts[:j], best[j]]
        probs = self.probs(logits)
        j = k
        if k:
            d = mx.array(list(drafts), dtype=mx.int32)[:, None]
            ratio = mx.take_along_axis(probs[:k], d, axis=-1)[:, 0]
            if q is not None:
                ratio = ratio / mx.take_along_axis(q, d, axis=-1)[:, 0]
            kept = (mx.random.uniform(shape=(k,), key=self.next_key()) < ratio).tolist()
            j = kept.index(False) if False in kept else k
        row = probs[j]
        if j < k:  # the residual max(p - q, 0): what p has beyond the drafter's proposal
            drafted = q[j] if q is not None else (mx.arange(row.shape[-1]) == drafts[j])
            row = mx.maximum(row - drafted.astype(row.dtype), 0.0)
        token = mx.random.categorical(mx.log(row), key=self.next_key()).item()
        return [*drafts[:j], token]


@dataclass
class Speculation:
    """The policy stream_generate takes: which drafter, and what it did (`stats`)."""

    method: str = "lookup"
    max_ngram: int = 4
    draft_model: Any = None  # for "draft": a model sharing the tokenizer (engine.draft)
    auto: bool = False  # lookup only for prompts of at least AUTO_MIN_PROMPT tokens
    # The ids already in the cache before `prompt_ids` (ChatSession sets them each turn):
    # what earlier turns said can be quoted too.
    context: Sequence[int] = ()
    stats: SpecStats = field(init=False)  # the latest request's
    reason: str | None = None  # why the latest request ran without speculation

    def __post_init__(self) -> None:
        if self.method not in ("lookup", "draft"):
            raise ValueError(f"unknown speculation method {self.method!r}")
        self.stats = SpecStats(self.method)

    def use_draft(self, draft_model, draft_tokenizer, model, tokenizer) -> None:
        """Draft with `draft_model`, once it is known to read the target's token ids."""
        from qwen3_chat.engine.draft import check_compatible

        check_compatible(draft_model, draft_tokenizer, model, tokenizer)
        self.draft_model = draft_model

    def report(self) -> dict:
        """For GenerationStats: what the latest request drafted and kept."""
        if self.reason is not None:
            return {"method": "off", "drafted": 0, "accepted": 0, "reason": self.reason}
        return self.stats.to_dict()

    def applies(self, model, cache: Sequence) -> bool:
        """Rejected drafts leave the cache by trimming: only plain KV caches can do that."""
        if not all(type(c) is KVCache for c in cache):
            self.reason = "the model's recurrent layers cannot drop rejected drafts"
            return False
        if self.method == "draft" and self.draft_model is None:
            self.reason = "no draft model was given"
            return False
        self.reason = None
        return True

    def tokens(
        self,
        model,
        prompt_ids: Sequence[int],
        cache: list[KVCache],
        sampling: SamplingParams,
        processors: Sequence[LogitsProcessor],
        override: Override | None,
        prefill_step: int,
        timing: TokenStream,
        limit: int | None = None,
    ) -> Iterator[tuple[int, bool]]:
        """The token layer of stream_generate, speculating: yields (token id, forced)."""
        self.stats = SpecStats(self.method)
        if self.auto and len(self.context) + len(prompt_ids) < AUTO_MIN_PROMPT:
            self.reason = f"auto: a prompt under {AUTO_MIN_PROMPT} tokens has little to quote"
            return generate_tokens(
                model, prompt_ids, cache, make_sampler(sampling), processors, override,
                prefill_step, timing, decoder_for(model),
            )  # fmt: skip
        if self.method == "draft":
            from qwen3_chat.engine.draft import DraftModel

            drafter: Drafter = DraftModel(self.draft_model, sampling)
            drafter.extend(prompt_ids)  # its own cache starts empty: only what it prefills
        else:
            drafter = PromptLookup(self.max_ngram)
            drafter.extend([*self.context, *prompt_ids])  # the whole conversation
        return _speculate(
            model, prompt_ids, cache, Verifier(sampling), list(processors), override, drafter,
            self.stats, prefill_step, timing, limit,
        )  # fmt: skip


def _rows(
    processors: Sequence[LogitsProcessor], history: list[int], fed: list[int], logits: mx.array
) -> mx.array:
    """Apply the penalties row by row: row i follows history + fed[: i + 1] (as if the
    tokens had been decoded one at a time)."""
    if not processors:
        return logits
    first = len(fed) - logits.shape[0]  # the rows start at the last forced/pending token
    return mx.concatenate([
        apply_processors(processors, [*history, *fed[: first + i + 1]], logits[i : i + 1])
        for i in range(logits.shape[0])
    ])  # fmt: skip


def _speculate(
    model,
    prompt_ids: Sequence[int],
    cache: list[KVCache],
    verifier: Verifier,
    processors: list[LogitsProcessor],
    override: Override | None,
    drafter: Drafter,
    stats: SpecStats,
    prefill_step: int,
    timing: TokenStream,
    limit: int | None,
) -> Iterator[tuple[int, bool]]:
    decode = decoder_for(model)
    sample = make_sampler(verifier.params)  # plain steps: the same distribution, lazily
    length = DraftLength()
    history: list[int] = []  # tokens fed since the prompt (what the penalties see)
    timing.start = time.perf_counter()
    timing.prefill_tokens = len(prompt_ids)
    with mx.stream(generation_stream()):
        logits = prefill(model, prompt_ids, cache, prefill_step)
    y = verifier.verify(_rows(processors, [], [], logits), [])[0]
    held = cache_offset(cache)  # tokens the cache holds that the output agrees with
    try:
        feed: list[int] | None = None  # tokens to feed next (forced ones, or the pending y)
        replaced = y  # the token `feed` stands for (a forced run replaces it)
        while True:
            if feed is None:  # the pending token, or what the budget forces in its place
                forced = override(y) if override is not None else None
                feed, replaced = ([y] if forced is None else list(forced)), y
            drafter.extend(feed)
            room = (limit - held - len(feed) - 1) if limit else length.high
            drafts, q = drafter.draft(min(length.next(), room))
            if not drafts and not processors:
                # Nothing to verify: plain steps, each queued before the token it follows
                # is read (as in generate_tokens), until the drafter has something again.
                with mx.stream(generation_stream()):
                    nxt = sample(decode(model, feed, cache))
                mx.async_eval(nxt)
                if not timing.first_token:
                    timing.first_token = time.perf_counter()
                for t in feed:
                    held += 1
                    yield t, t != replaced
                history += feed
                feed = None
                while feed is None:
                    with mx.stream(generation_stream()):
                        after = sample(decode(model, nxt, cache))  # feeds nxt, unread yet
                    mx.async_eval(after)
                    y = nxt.item()
                    stats.steps, stats.tokens = stats.steps + 1, stats.tokens + 1
                    forced = override(y) if override is not None else None
                    if forced is not None:  # y is replaced: it leaves the cache again
                        rewind(cache, held)
                        feed, replaced = list(forced), y
                        break
                    held += 1
                    yield y, False
                    history.append(y)
                    drafter.extend([y])
                    if length.next() and drafter.ready():
                        y = after.item()  # the pending token; drafts follow it
                        stats.steps, stats.tokens = stats.steps + 1, stats.tokens + 1
                        break
                    nxt = after
                continue  # to the top: y pending, or a forced run to feed
            fed = [*feed, *drafts]
            with mx.stream(generation_stream()):
                if drafts:
                    out = model(mx.array([fed], dtype=mx.int32), cache=cache)
                    logits = out[0, len(feed) - 1 :]
                else:  # nothing to verify: the compiled one-token step
                    logits = decode(model, feed, cache)
                rows = _rows(processors, history, fed, logits)
            # Queued first, handed on after: the caller's work on these tokens (detokenizing,
            # drawing) overlaps the forward, as in plain decoding.
            mx.async_eval(rows)
            if not timing.first_token:
                timing.first_token = time.perf_counter()
            for t in feed:
                held += 1
                yield t, t != replaced
            history += feed
            emitted = verifier.verify(rows, drafts, q)
            kept = len(emitted) - 1
            rewind(cache, held + kept)  # then one more per kept draft, as it is handed on
            stats.drafted, stats.accepted = stats.drafted + len(drafts), stats.accepted + kept
            stats.steps, stats.tokens = stats.steps + 1, stats.tokens + len(emitted)
            length.update(len(drafts), kept)
            feed = None
            for d in emitted[:-1]:  # kept drafts, already in the cache
                forced = override(d) if override is not None else None
                if forced is not None:  # the budget replaces d: d and later drafts go
                    rewind(cache, held)
                    feed, replaced = list(forced), d
                    break
                held += 1
                yield d, False
                history.append(d)
                drafter.extend([d])
            if feed is None:
                y = emitted[-1]
    finally:
        # Stopped (or interrupted) mid-way: keep only what the output agrees with.
        if cache_offset(cache) > held:
            rewind(cache, held)
