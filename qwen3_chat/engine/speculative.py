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
from collections.abc import Callable, Generator, Iterator, Sequence
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
)
from qwen3_chat.engine.lookup import PromptLookup
from qwen3_chat.engine.sampling import (
    LogitsProcessor,
    SamplingParams,
    apply_processors,
    make_sampler,
)
from qwen3_chat.engine.verify import DraftLength, Verifier
from qwen3_chat.models.cache import KVCache, LinearCache

METHODS = ("auto", "off", "lookup", "draft", "mtp")
# --speculate auto drafts only from a prompt this long (new tokens): a pasted diff or file.
AUTO_MIN_PROMPT = 256


class Drafter(Protocol):
    """extend() hears every token the output kept; draft(k) proposes (ids, q or None).
    A drafter that also has observe(start, tokens, hidden) (MTP) gets every target
    forward's final hidden states, so each step then runs the full forward."""

    def extend(self, tokens: Sequence[int]) -> None: ...

    def draft(self, k: int) -> tuple[list[int], mx.array | None]: ...

    def ready(self) -> bool: ...


class SpeculationError(ValueError):
    """A --speculate / --draft combination that cannot work."""


def make_speculation(method: str, draft: str | None = None) -> Speculation | None:
    """The policy for --speculate METHOD [--draft MODEL]; None for plain decoding.

    auto is the model's own MTP head when it has one (trained to draft, exact either way),
    else prompt lookup for prompts long enough to be quoted (code review, edits, pasted
    text): on a short prompt drafts rarely hold, and on a CPU a rejected draft costs more
    than the compiled plain step it replaces (bench/speed.py measures both). draft with no
    MODEL: the caller picks one (hub.drafts), and auto may become a draft model there."""
    if method not in METHODS:
        raise SpeculationError(f"--speculate must be one of {', '.join(METHODS)}, not {method!r}")
    if draft is not None and method != "draft":
        raise SpeculationError("--draft needs --speculate draft")
    if method == "off":
        return None
    return Speculation("lookup" if method == "auto" else method, auto=method == "auto")


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


@dataclass
class Speculation:
    """The policy stream_generate takes: which drafter, and what it did (`stats`)."""

    method: str = "lookup"
    max_ngram: int = 4
    draft_model: Any = None  # for "draft": a model sharing the tokenizer (engine.draft)
    auto: bool = False  # MTP head if any, else the draft model set, else lookup (long prompts)
    # The ids already in the cache before `prompt_ids` (ChatSession sets them each turn):
    # what earlier turns said can be quoted too.
    context: Sequence[int] = ()
    stats: SpecStats = field(init=False)  # the latest request's
    reason: str | None = None  # why the latest request ran without speculation

    def __post_init__(self) -> None:
        if self.method not in ("lookup", "draft", "mtp"):
            raise ValueError(f"unknown speculation method {self.method!r}")
        self.stats = SpecStats(self.method)

    def use_draft(self, draft_model, draft_tokenizer, model, tokenizer) -> None:
        """Draft with `draft_model`, once it is known to read the target's token ids."""
        from qwen3_chat.engine.draft import check_compatible

        check_compatible(draft_model, draft_tokenizer, model, tokenizer)
        self.draft_model = draft_model

    def check_mtp(self, model) -> None:
        """--speculate mtp needs the checkpoint's own head (`mtp.*` tensors); building it
        here says at once (ModelLoadError) when its tensors do not fit."""
        from qwen3_chat.models.mtp import has_mtp, mtp_head

        if not has_mtp(model):
            raise SpeculationError(
                "--speculate mtp: this model has no MTP head (no mtp.* tensors in its folder)"
            )
        mtp_head(model)

    def report(self) -> dict:
        """For GenerationStats: what the latest request drafted and kept."""
        if self.reason is not None:
            return {"method": "off", "drafted": 0, "accepted": 0, "reason": self.reason}
        return self.stats.to_dict()

    def applies(self, model, cache: Sequence) -> bool:
        """KV layers drop rejected drafts by trimming, linear (Gated DeltaNet) layers by
        going back to a state kept inside the verifying forward (see _keep_states)."""
        from qwen3_chat.models.mtp import has_mtp

        if not all(type(c) in (KVCache, LinearCache) for c in cache):
            self.reason = "the model's cache cannot drop rejected drafts"
            return False
        if self.method == "draft" and self.draft_model is None:
            self.reason = "no draft model was given"
            return False
        if self.method == "mtp" and not has_mtp(model):
            self.reason = "the model has no MTP head"
            return False
        if (self.method == "mtp" or self.auto) and has_mtp(model):
            from qwen3_chat.errors import ModelLoadError
            from qwen3_chat.models.mtp import mtp_head

            try:
                mtp_head(model)
            except ModelLoadError as e:  # a head that does not load: decode plainly, say why
                self.reason = str(e)
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
        left: Callable[[], int | None] | None = None,
    ) -> Iterator[tuple[int, bool]]:
        """The token layer of stream_generate, speculating: yields (token id, forced).
        `limit` is the context; `left()` how many more tokens the reply can show (None:
        unbounded for now), so drafts never run past what would be shown."""
        from qwen3_chat.models.mtp import has_mtp

        method = "mtp" if self.auto and has_mtp(model) else self.method
        self.stats = SpecStats(method)
        if (
            method == "lookup"
            and self.auto
            and (len(self.context) + len(prompt_ids) < AUTO_MIN_PROMPT)
        ):
            self.reason = f"auto: a prompt under {AUTO_MIN_PROMPT} tokens has little to quote"
            return generate_tokens(
                model, prompt_ids, cache, make_sampler(sampling), processors, override,
                prefill_step, timing, decoder_for(model),
            )  # fmt: skip
        drafter: Drafter
        if method == "mtp":
            from qwen3_chat.engine.mtp import MTPDrafter

            drafter = MTPDrafter(model, sampling)
            drafter.extend(prompt_ids)  # its head's cache starts empty: only what it sees now
        elif method == "draft":
            from qwen3_chat.engine.draft import DraftModel

            drafter = DraftModel(self.draft_model, sampling)
            drafter.extend(prompt_ids)  # its own cache starts empty: only what it prefills
        else:
            drafter = PromptLookup(self.max_ngram)
            drafter.extend([*self.context, *prompt_ids])  # the whole conversation
        return _speculate(
            model, prompt_ids, cache, Verifier(sampling), list(processors), override, drafter,
            self.stats, prefill_step, timing, limit, left,
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


def _keep_states(cache: Sequence, offsets: Sequence[int]) -> None:
    """Have each linear layer keep its state after each of `offsets` tokens in the next
    forward. The Gated DeltaNet state folds every token in and cannot be trimmed; keeping
    the states inside the verifying forward (the scan splits there, `snapshot_at`) costs no
    second forward, only k + 1 states held until the step is settled. Re-feeding the kept
    tokens from a snapshot instead would cost a forward of them through every layer."""
    for c in cache:
        if isinstance(c, LinearCache):
            c.snapshot_at = (*c.snapshot_at, *offsets)


def _drop_states(cache: Sequence, offsets: Sequence[int]) -> None:
    """Forget the states _keep_states asked for (the session's own requests stay)."""
    if not offsets:
        return
    gone = set(offsets)
    for c in cache:
        if isinstance(c, LinearCache):
            c.snapshot_at = tuple(o for o in c.snapshot_at if o not in gone)
            for o in gone:
                c.marked.pop(o, None)


def _rewind(cache: Sequence, offset: int) -> None:
    """Every layer back to `offset` tokens: KV layers trim; a linear layer restores the
    state kept there (_keep_states) or undoes its last update (a plain step)."""
    for c in cache:
        if isinstance(c, LinearCache) and c.offset != offset and offset in c.marked:
            c.restore(c.marked[offset])
        else:
            c.trim(c.offset - offset)


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
    left: Callable[[], int | None] | None = None,
) -> Iterator[tuple[int, bool]]:
    decode = decoder_for(model)
    sample = make_sampler(verifier.params)  # plain steps: the same distribution, lazily
    length = DraftLength()
    # A drafter reading the target's hidden states (MTP) sees every forward's, so every
    # token goes through a full forward (never the hidden-less compiled plain step).
    observe = getattr(drafter, "observe", None)
    history: list[int] = []  # tokens fed since the prompt (what the penalties see)
    marks: list[int] = []  # offsets whose linear-layer states the last forward kept
    timing.start = time.perf_counter()
    timing.prefill_tokens = len(prompt_ids)
    with mx.stream(generation_stream()):
        if observe is not None:
            from qwen3_chat.engine.mtp import Observed

            model_or_observed = Observed(model, observe)
        else:
            model_or_observed = model
        logits = prefill(model_or_observed, prompt_ids, cache, prefill_step)
    y = verifier.verify(_rows(processors, [], [], logits), [])[0]
    held = cache_offset(cache)  # tokens the cache holds that the output agrees with

    def hand_on(feed: list[int], replaced: int) -> Iterator[tuple[int, bool]]:
        """The fed tokens go out (forced ones marked); the penalties see them from now."""
        nonlocal held
        if not timing.first_token:
            timing.first_token = time.perf_counter()
        for t in feed:
            held += 1
            yield t, t != replaced
        history.extend(feed)

    def keep(t: int) -> Generator[tuple[int, bool], None, list[int] | None]:
        """Hand on `t`, already in the cache, unless the budget forces a run in its place:
        then `t` (and what follows it) leaves the cache and the run is returned."""
        nonlocal held
        forced = override(t) if override is not None else None
        if forced is not None:
            _rewind(cache, held)
            return list(forced)
        held += 1
        yield t, False
        history.append(t)
        drafter.extend([t])
        return None

    try:
        feed: list[int] | None = None  # tokens to feed next (forced ones, or the pending y)
        replaced = y  # the token `feed` stands for (a forced run replaces it)
        while True:
            _drop_states(cache, marks)
            marks = []
            if feed is None:  # the pending token, or what the budget forces in its place
                forced = override(y) if override is not None else None
                feed, replaced = ([y] if forced is None else list(forced)), y
            drafter.extend(feed)
            room = (limit - held - len(feed) - 1) if limit else length.high
            if left is not None and (shown := left()) is not None:
                room = min(room, shown - len(feed))  # the fed tokens are shown first
            drafts, q = drafter.draft(min(length.next(), room))
            if not drafts and not processors and observe is None:
                # Nothing to verify: plain steps, each queued before the token it follows
                # is read (as in generate_tokens), until the drafter has something again.
                with mx.stream(generation_stream()):
                    nxt = sample(decode(model, feed, cache))
                mx.async_eval(nxt)
                yield from hand_on(feed, replaced)
                feed = None
                while feed is None:
                    with mx.stream(generation_stream()):
                        after = sample(decode(model, nxt, cache))  # feeds nxt, unread yet
                    mx.async_eval(after)
                    y = nxt.item()
                    stats.steps, stats.tokens = stats.steps + 1, stats.tokens + 1
                    forced = yield from keep(y)
                    if forced is not None:  # y is replaced: it left the cache again
                        feed, replaced = forced, y
                        break
                    if length.next() and drafter.ready():
                        y = after.item()  # the pending token; drafts follow it
                        stats.steps, stats.tokens = stats.steps + 1, stats.tokens + 1
                        break
                    nxt = after
                continue  # to the top: y pending, or a forced run to feed
            fed = [*feed, *drafts]
            if drafts:  # where a rejection may send the linear layers back to
                marks = [held + len(feed) + j for j in range(len(drafts))]
                _keep_states(cache, marks)
            with mx.stream(generation_stream()):
                x = mx.array([fed], dtype=mx.int32)
                if observe is not None:
                    out, hidden = model(x, cache=cache, return_hidden=True)
                    observe(held, fed, hidden[0])
                    logits = out[0, len(feed) - 1 :]
                elif drafts:
                    logits = model(x, cache=cache)[0, len(feed) - 1 :]
                else:  # nothing to verify: the compiled one-token step
                    logits = decode(model, feed, cache)
                rows = _rows(processors, history, fed, logits)
            # Queued first, handed on after: the caller's work on these tokens (detokenizing,
            # drawing) overlaps the forward, as in plain decoding.
            mx.async_eval(rows)
            yield from hand_on(feed, replaced)
            emitted = verifier.verify(rows, drafts, q)
            kept = len(emitted) - 1
            _rewind(cache, held + kept)  # then one more per kept draft, as it is handed on
            stats.drafted, stats.accepted = stats.drafted + len(drafts), stats.accepted + kept
            stats.steps, stats.tokens = stats.steps + 1, stats.tokens + len(emitted)
            length.update(len(drafts), kept)
            feed = None
            for d in emitted[:-1]:  # kept drafts, already in the cache
                forced = yield from keep(d)
                if forced is not None:  # the budget replaces d: d and later drafts go
                    feed, replaced = forced, d
                    break
            if feed is None:
                y = emitted[-1]
    finally:
        # Stopped (or interrupted) mid-way: keep only what the output agrees with.
        if cache_offset(cache) > held:
            _rewind(cache, held)
        _drop_states(cache, marks)
