"""MTP drafting: the hybrid checkpoint's own multi-token-prediction head (models/mtp.py)
proposes the next few tokens from the target's hidden states.

The head's KV cache holds one entry per position j the target has settled: its hidden
state h_j paired with the token after it, ids[j + 1]. Every target forward hands its
hidden states on (`observe`); a row counts once its token is one the output kept (rows of
rejected drafts never match). Drafting feeds the entries now known, then chains k - 1
steps on the head's own output, and trims those speculative entries again, so the cache
follows exactly the ids the target kept. At temperature > 0 the drafts are sampled from
the head's distribution q, handed on for the verifier's rejection sampling.

Each request starts an empty head cache (as a draft model's): the head sees the prompt of
this turn, not the earlier conversation. RoPE is relative, so starting its positions at 0
changes nothing within what it sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx

from qwen3_chat.engine.generate import cache_offset, generation_stream
from qwen3_chat.engine.sampling import SamplingParams
from qwen3_chat.engine.speculative import SpeculationError
from qwen3_chat.engine.verify import Verifier
from qwen3_chat.models.mtp import mtp_head


@dataclass
class MTPDrafter:
    """Drafter with `extend(tokens)`, `observe(start, tokens, hidden)` and `draft(k)`."""

    model: Any  # the target: its hidden states, embedding and lm_head
    sampling: SamplingParams
    ids: list[int] = field(default_factory=list)  # the output so far (and the pending token)
    entries: int = 0  # head cache entries: entry j pairs h_j with ids[j + 1]
    # Target forwards not yet wholly fed to the head: (start, tokens fed, hidden [n, H]),
    # positions counted from this request's first prompt token.
    rows: list[tuple[int, list[int], mx.array]] = field(default_factory=list)

    def __post_init__(self) -> None:
        head = mtp_head(self.model)
        if head is None:
            raise SpeculationError("the model has no MTP head")
        self.head = head
        self.cache = head.make_cache()
        self.base: int | None = None  # the target's cache offset at ids[0]
        self.last: mx.array | None = None  # the head's output at the latest entry [1, 1, H]
        seed = self.sampling.seed
        # Its own random stream: drafting must not shift the target's draws.
        self.verifier = Verifier(replace(self.sampling, seed=None if seed is None else seed + 1))

    def extend(self, tokens: Sequence[int]) -> None:
        self.ids.extend(tokens)

    def ready(self) -> bool:
        return True

    def observe(self, start: int, tokens: Sequence[int], hidden: mx.array) -> None:
        """A target forward of `tokens` from cache offset `start`: hidden [n, H]. It
        supersedes what an earlier forward said from `start` on."""
        if self.base is None:
            self.base = start
        s = start - self.base
        self.rows = [(a, t[: s - a], h[: s - a]) for a, t, h in self.rows if a < s]
        self.rows.append((s, list(tokens), hidden))
        self._commit()

    def _commit(self) -> None:
        """Feed the head every entry now known: a kept position's row with the next id."""
        p = self.entries
        hs = []
        for start, fed, h in self.rows:
            i = p - start
            if i < 0:
                break  # a gap (cannot happen: forwards are contiguous)
            if i >= len(fed):
                continue
            n = 0  # this forward's rows from p on that the output kept, with a next id known
            while i + n < len(fed) and p + n + 1 < len(self.ids) and fed[i + n] == self.ids[p + n]:
                n += 1
            if n:
                hs.append(h[i : i + n])
                p += n
            if i + n < len(fed):
                break  # a rejected draft, or the next id is not known yet
        if not hs:
            return
        follow = mx.array([self.ids[self.entries + 1 : p + 1]], dtype=mx.int32)
        with mx.stream(generation_stream()):
            out = self.head(self.model.model.embed_tokens(follow),
                            mx.concatenate(hs)[None], self.cache)  # fmt: skip
        self.last = out[:, -1:]
        mx.async_eval(self.last, [c.state for c in self.cache])
        self.entries = p
        self.rows = [(a, t, h) for a, t, h in self.rows if a + len(t) > p]

    def draft(self, k: int) -> tuple[list[int], mx.array | None]:
        self._commit()
        # Only right after the pending token: a forced run's later tokens have no hidden
        # state yet (the next forward brings them).
        if k <= 0 or self.last is None or self.entries != len(self.ids) - 1:
            return [], None
        drafts: list[int] = []
        qs: list[mx.array] = []
        g = self.last
        with mx.stream(generation_stream()):
            for i in range(k):
                t = self.verifier.draw(self.model.project(g)[0], qs)
                drafts.append(t)
                if i + 1 < k:  # chain: the head's own output stands in for h
                    embed = self.model.model.embed_tokens(mx.array([[t]], dtype=mx.int32))
                    g = self.head(embed, g, self.cache)
        for c in self.cache:  # the chained entries were speculative
            c.trim(c.offset - self.entries)
        return drafts, (mx.stack(qs) if qs else None)


@dataclass
class Observed:
    """The target for a prefill whose hidden states a drafter reads: logits as the plain
    call returns them, each chunk's hidden states handed to `observe` (so generate.prefill,
    with its chunking and interrupt handling, serves MTP too)."""

    model: Any
    observe: Any

    def __call__(self, inputs: mx.array, cache: list, last_only: bool = False) -> mx.array:
        start = cache_offset(cache)
        logits, hidden = self.model(inputs, cache=cache, last_only=last_only, return_hidden=True)
        self.observe(start, inputs[0].tolist(), hidden[0])
        return logits
