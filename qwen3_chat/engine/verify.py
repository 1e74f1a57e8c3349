"""Speculation's target side: the exact verifier (greedy, or rejection sampling with the
residual max(p - q, 0)) and the adaptive draft length (see engine/speculative.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from qwen3_chat.engine.sampling import SamplingParams, keep_min_p, keep_top_k, keep_top_p

# Longest pause in drafting after repeated misses: long enough to cost little on text that
# never repeats, short enough to pick up a quote that starts later.
MAX_PAUSE = 16


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

    def draw(self, logits: mx.array, qs: list[mx.array]) -> int:
        """A drafter's own choice from logits [1, V]: the argmax when greedy, else a sample
        from its distribution q, appended to `qs` for the verifier's rejection sampling."""
        if self.params.temperature <= 0:
            return int(mx.argmax(logits, axis=-1).item())
        q = self.probs(logits)[0]
        qs.append(q)
        return int(mx.random.categorical(mx.log(q), key=self.next_key()).item())

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
