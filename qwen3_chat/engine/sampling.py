"""Sampling and penalties as small composable policies over logits."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import mlx.core as mx

from qwen3_chat.engine.defaults import (
    PRESENCE_PENALTY_MAX,
    PRESENCE_PENALTY_MIN,
    QWEN_SAMPLING,
    SEED_MAX,
    THINKING,
    mode_name,
)
from qwen3_chat.errors import SettingsError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


_QWEN = QWEN_SAMPLING[THINKING]


@dataclass(frozen=True)
class SamplingParams:
    """Defaults: Qwen's thinking-mode settings (see `for_mode` for either mode)."""

    temperature: float = _QWEN["temperature"]
    top_p: float = _QWEN["top_p"]
    top_k: int = int(_QWEN["top_k"])
    min_p: float = _QWEN["min_p"]
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Caught here, by name, rather than as NaNs or an MLX error mid-generation.
        penalty_range = f"must be in [{PRESENCE_PENALTY_MIN:g}, {PRESENCE_PENALTY_MAX:g}]"
        checks = [
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 = off)"),
            (0 <= self.min_p < 1, "min_p", "must be in [0, 1)"),
            (PRESENCE_PENALTY_MIN <= self.presence_penalty <= PRESENCE_PENALTY_MAX,
             "presence_penalty", penalty_range),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                   and 0 <= self.seed <= SEED_MAX),
             "seed", "must be a whole number from 0 to 2**64-1"),
        ]  # fmt: skip
        for ok, name, rule in checks:
            if not ok:
                raise SettingsError(f"bad sampling setting: {name} {rule}", param=name)

    @classmethod
    def for_mode(cls, thinking: bool) -> SamplingParams:
        """Qwen's recommended settings for the mode (`defaults.QWEN_SAMPLING`)."""
        return cls(**QWEN_SAMPLING[mode_name(thinking)])

    def replace(self, **changes) -> SamplingParams:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


def keep_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Mask all but the k most likely tokens."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k][..., None]
    return mx.where(logprobs >= kth, logprobs, -mx.inf)


def keep_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(sorted_lp)
    before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep_sorted = before < p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def keep_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Drop tokens less likely than min_p times the most likely one."""
    if min_p <= 0.0:
        return logprobs
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)  # a Python float
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def make_sampler(params: SamplingParams) -> Sampler:
    """logits [B, V] -> token ids [B]; greedy at temperature 0, seeded when asked.

    Order as in transformers: temperature, top-k, then top-p and min-p over the top-k
    renormalised. With top-k on (Qwen's defaults: 20) everything after it works on k
    candidates picked by argpartition, not on two full sorts of a 152k vocabulary.
    """
    if params.temperature <= 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    key = [mx.random.key(params.seed)] if params.seed is not None else None

    def sample(logits: mx.array) -> mx.array:
        lp = logits.astype(mx.float32) / params.temperature
        k = params.top_k
        idx = None
        if 0 < k < lp.shape[-1]:
            idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[..., :k]
            lp = mx.take_along_axis(lp, idx, axis=-1)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        lp = keep_min_p(keep_top_p(lp, params.top_p), params.min_p)
        if key is None:
            choice = mx.random.categorical(lp, axis=-1)
        else:
            key[0], sub = mx.random.split(key[0])
            choice = mx.random.categorical(lp, axis=-1, key=sub)
        if idx is None:
            return choice
        return mx.take_along_axis(idx, choice[..., None], axis=-1).squeeze(-1)

    return sample


def penalize(logits: mx.array, seen: mx.array, params: SamplingParams) -> mx.array:
    """The penalties on the tokens `seen` (a bool mask over the vocabulary): presence first
    (subtract once), then repetition (divide positive, multiply negative logits)."""
    if params.presence_penalty:
        logits = logits - params.presence_penalty * seen.astype(logits.dtype)
    if params.repetition_penalty != 1.0:
        r = params.repetition_penalty
        logits = mx.where(seen, mx.where(logits > 0, logits / r, logits * r), logits)
    return logits


def has_penalties(params: SamplingParams) -> bool:
    return bool(params.presence_penalty) or params.repetition_penalty != 1.0


class Penalties:
    """The penalties over a running count of the tokens generated so far, so each step costs
    the same however long the reply grows (no history re-scanned or re-concatenated).

    Counts, not a mask: a token fed speculatively and then replaced is taken back with
    `add(token, -1)` even when it had been generated before.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        self.counts: mx.array | None = None  # [V] int32, sized by the first logits seen

    def __call__(self, logits: mx.array) -> mx.array:
        if self.counts is None:
            self.counts = mx.zeros((logits.shape[-1],), dtype=mx.int32)
        return penalize(logits, self.counts > 0, self.params)

    def add(self, tokens: mx.array, n: int = 1) -> None:
        """Count `tokens` (n=-1 takes them back); called after the first logits were seen."""
        self.counts = self.counts.at[tokens.reshape(-1)].add(n)


def _history_penalty(params: SamplingParams) -> LogitsProcessor:
    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        seen = mx.zeros((logits.shape[-1],), dtype=mx.bool_)
        seen[tokens] = True
        return penalize(logits, seen, params)

    return apply


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The penalties `params` asks for as `(generated_ids, logits) -> logits` processors,
    for one-off use; generation keeps a running `Penalties` instead."""
    processors: list[LogitsProcessor] = []
    if params.presence_penalty:
        processors.append(_history_penalty(replace(params, repetition_penalty=1.0)))
    if params.repetition_penalty != 1.0:
        processors.append(_history_penalty(replace(params, presence_penalty=0.0)))
    return processors


def apply_processors(
    processors: Sequence[LogitsProcessor], history: mx.array | Sequence[int], logits: mx.array
) -> mx.array:
    """Run the processors in order over `logits`, given the generated ids so far."""
    if not processors:
        return logits
    tokens = history if isinstance(history, mx.array) else mx.array(list(history), mx.int32)
    for p in processors:
        logits = p(tokens, logits)
    return logits
