"""Prompt lookup: n-gram drafts from the conversation itself (engine/speculative.py)."""

from __future__ import annotations

from collections.abc import Sequence


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
