"""A bounded LRU of KV caches keyed by the token ids they hold, for reuse across requests.

A client resends the whole conversation each turn; the entry sharing the longest prefix
with the new prompt is taken out, trimmed to where they diverge, and only the rest is
prefilled. Entries are capped in number and in bytes. Only the worker thread touches it;
the lock lets /health read the numbers from the event loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen3_chat.chat.prompt_cache import common_prefix
from qwen3_chat.engine.generate import cache_offset, rewind
from qwen3_chat.models.cache import can_trim


def cache_bytes(cache: Sequence[Any]) -> int:
    return sum(getattr(c, "nbytes", 0) for c in cache)


@dataclass
class PromptCache:
    make_cache: Callable[[], list]
    max_entries: int = 8
    max_bytes: int = 4 << 30
    hits: int = 0
    misses: int = 0
    _entries: OrderedDict[int, tuple[list[int], list]] = field(default_factory=OrderedDict)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, ids: Sequence[int]) -> tuple[list, int]:
        """A cache for `ids` and how many of its tokens it already holds (at most len-1,
        so there is always a token to prefill for the next-token logits)."""
        with self._lock:
            best, best_n = None, 0
            for key, (held, _) in self._entries.items():
                n = common_prefix(held, ids)
                if n > best_n:
                    best, best_n = key, n
            keep = min(best_n, len(ids) - 1)
            cache = self._entries[best][1] if best is not None else []
            # Recurrent (hybrid) layers cannot rewind to an arbitrary token: start afresh.
            if best is None or keep <= 0 or not can_trim(cache, cache_offset(cache) - keep):
                self.misses += 1
                return self.make_cache(), 0
            del self._entries[best]
            self.hits += 1
        rewind(cache, keep)
        return cache, keep

    def put(self, ids: Sequence[int], cache: list) -> None:
        """Keep `cache`, which holds the keys/values of `ids`; evict the least recently used."""
        held = list(ids[: cache_offset(cache)])
        # A cache may run past the ids we know (a token fed last); drop it if it cannot rewind.
        if not can_trim(cache, cache_offset(cache) - len(held)):
            return
        rewind(cache, len(held))
        if not held or cache_bytes(cache) > self.max_bytes or self.max_entries < 1:
            return
        with self._lock:
            self._entries[self._next] = (held, cache)
            self._next += 1
            while len(self._entries) > self.max_entries or self._bytes() > self.max_bytes:
                self._entries.popitem(last=False)

    def _bytes(self) -> int:
        return sum(cache_bytes(c) for _, c in self._entries.values())

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries), "bytes": self._bytes(),
                "tokens": sum(len(ids) for ids, _ in self._entries.values()),
                "max_entries": self.max_entries, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses,
            }  # fmt: skip
