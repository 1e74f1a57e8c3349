"""A draft model for speculative decoding: a small model sharing the target's tokenizer
(Qwen3-0.6B or 1.7B for the 8B–32B dense models) proposes the next few tokens.

At temperature 0 it drafts its argmax; at temperature > 0 it samples from its own
distribution q under the same settings and hands q on, so the verifier's rejection
sampling keeps the output distributed exactly as the target's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx

from qwen3_chat.engine.compiled import decoder_for
from qwen3_chat.engine.generate import cache_offset, generation_stream, prefill, rewind
from qwen3_chat.engine.sampling import SamplingParams
from qwen3_chat.engine.speculative import SpeculationError
from qwen3_chat.engine.verify import Verifier
from qwen3_chat.models.cache import KVCache


def check_compatible(draft_model, draft_tokenizer, target_model, target_tokenizer) -> None:
    """Drafts are token ids: both models must read them the same way."""
    dv = getattr(draft_model.config, "vocab_size", None)
    tv = getattr(target_model.config, "vocab_size", None)
    if draft_tokenizer.vocab_size != target_tokenizer.vocab_size or dv != tv:
        raise SpeculationError(
            f"the draft model's vocabulary ({draft_tokenizer.vocab_size} tokens, embedding "
            f"{dv}) differs from the target's ({target_tokenizer.vocab_size}, {tv})"
        )
    if not all(type(c) is KVCache for c in draft_model.make_cache()):
        raise SpeculationError("the draft model's recurrent layers cannot drop rejected drafts")


@dataclass
class DraftModel:
    """Drafter with `extend(tokens)` and `draft(k) -> (ids, q or None)`; its own KV cache
    follows the ids the target kept (trimmed back where a draft was rejected)."""

    model: Any
    sampling: SamplingParams
    ids: list[int] = field(default_factory=list)  # what the target holds, and pending
    _held: list[int] = field(default_factory=list)  # what this model's cache holds

    def __post_init__(self) -> None:
        self.cache = self.model.make_cache()
        self.decode = decoder_for(self.model)
        seed = self.sampling.seed
        # Its own random stream: drafting must not shift the target's draws.
        self.verifier = Verifier(replace(self.sampling, seed=None if seed is None else seed + 1))

    def extend(self, tokens) -> None:
        self.ids.extend(tokens)

    def ready(self) -> bool:
        """A model can always draft."""
        return True

    def _sync(self) -> mx.array:
        """Feed the ids the cache lacks (at least the last one); returns its next logits."""
        keep = 0
        n = min(len(self._held), len(self.ids) - 1)
        while keep < n and self._held[keep] == self.ids[keep]:
            keep += 1
        rewind(self.cache, keep)
        self._held = list(self.ids)
        return prefill(self.model, self.ids[cache_offset(self.cache) :], self.cache)

    def draft(self, k: int) -> tuple[list[int], mx.array | None]:
        if k <= 0 or not self.ids:
            return [], None
        drafts: list[int] = []
        qs: list[mx.array] = []
        with mx.stream(generation_stream()):
            logits = self._sync()
            for i in range(k):
                t = self.verifier.draw(logits, qs)
                drafts.append(t)
                if i + 1 < k:
                    logits = self.decode(self.model, [t], self.cache)
                    self._held.append(t)
        return drafts, (mx.stack(qs) if qs else None)
