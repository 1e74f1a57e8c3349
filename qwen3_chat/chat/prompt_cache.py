"""The KV cache a conversation keeps across turns, and the token ids it holds.

Every reuse decision of ChatSession is made here: how far a new prompt can reuse the
cache, and what the cache holds after a reply finished or was cut off. A model whose
cache cannot be trimmed (recurrent layers) needs only another way to rewind here
(snapshots at turn boundaries), not changes across the session.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qwen3_chat.engine.generate import cache_offset
from qwen3_chat.models.cache import Snapshots


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the shared start of two id lists (one vectorised compare, not a loop)."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(differ[0]) if differ.size else n


class PromptCache:
    def __init__(self, make_cache: Callable[[], list[Any]], boundary_token: int | None = None):
        self._make_cache = make_cache
        # The token that ends a message (<|im_end|>): the next turn re-renders everything up
        # to the last one unchanged, so a snapshot just after it is always reusable.
        self.boundary_token = boundary_token
        self.layers: list[Any] | None = None  # created on first use
        self.ids: list[int] = []  # the token ids whose keys/values the layers hold
        # Where the layers can go back to besides trimming: a hybrid model's linear layers
        # fold every token into their state, so they return to snapshots instead.
        self.snapshots = Snapshots()

    def prepare(self, ids: Sequence[int]) -> int:
        """Rewind to where `ids` diverges from what is held; returns the tokens reused.

        At least the last token of `ids` is always left to feed: its logits start the reply.
        """
        if self.layers is None:
            self.layers, self.ids = self._make_cache(), []
        self.snapshots.collect(self.layers)
        keep = min(common_prefix(self.ids, ids), len(ids) - 1)
        keep = self.snapshots.rewind(self.layers, keep)  # may land before, at a snapshot
        self.ids = list(ids[:keep])
        # Points to come back to: here, after the last message, and before the prompt's last
        # token (/retry and a resend resume there: the last token's logits start the reply).
        self.snapshots.add(self.layers)
        ends = [i + 1 for i, t in enumerate(ids) if t == self.boundary_token]
        self.snapshots.request(self.layers, [*ends[-1:], len(ids) - 1])
        return keep

    def finished(self, prompt: Sequence[int], generated: Sequence[int]) -> None:
        """After a complete reply the layers hold the prompt and every token fed back."""
        self.snapshots.collect(self.layers or [])
        held = cache_offset(self.layers or [])
        self.ids = [*prompt, *generated][:held]

    def interrupted(self, prompt: Sequence[int]) -> int:
        """After a reply cut off: which generated tokens reached the layers is unknown, so
        keep only the part of the prompt surely there; returns how much that is."""
        if self.layers is None:
            return 0
        self.snapshots.collect(self.layers)
        keep = self.snapshots.rewind(self.layers, min(len(prompt), cache_offset(self.layers)))
        self.ids = list(prompt[:keep])
        return keep
