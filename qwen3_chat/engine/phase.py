"""Where a token stream is: inside or outside a `<think>` block, told by token ids only.

One tracker per turn. It starts from the prompt (Thinking-2507 templates end the prompt
inside an open `<think>`, and with a prompt cache those tokens are never decoded), and is
fed every token that enters the stream, forced ones included; the budget and the event
layer both read it, so they can never disagree about the phase. MLX-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum


class Kind(Enum):
    OPEN = "open"  # <think> that starts a block
    CLOSE = "close"  # </think> that ends one
    REASONING = "reasoning"  # a token inside a block (a repeated <think> too: it counts)
    ANSWER = "answer"  # a token outside (a stray </think> too)


class ThinkPhase:
    def __init__(self, start_id: int | None, end_id: int | None, inside: bool = False):
        self.start_id, self.end_id = start_id, end_id
        self.inside = inside and start_id is not None

    @staticmethod
    def ends_inside(ids: Sequence[int], start_id: int | None, end_id: int | None) -> bool:
        """True when `ids` end inside an open think block (the last marker is `<think>`)."""
        if start_id is None:
            return False
        for t in reversed(ids):
            if t == end_id:
                return False
            if t == start_id:
                return True
        return False

    @classmethod
    def after(cls, ids: Sequence[int], start_id: int | None, end_id: int | None) -> ThinkPhase:
        return cls(start_id, end_id, cls.ends_inside(ids, start_id, end_id))

    def is_marker(self, token: int) -> bool:
        return token in (self.start_id, self.end_id)

    def peek(self, token: int) -> Kind:
        """What `token` would be if it came next (the phase does not change)."""
        if token == self.start_id and not self.inside:
            return Kind.OPEN
        if token == self.end_id and self.inside:
            return Kind.CLOSE
        return Kind.REASONING if self.inside else Kind.ANSWER

    def feed(self, token: int) -> Kind:
        """Classify `token` and move past it."""
        kind = self.peek(token)
        if kind is Kind.OPEN:
            self.inside = True
        elif kind is Kind.CLOSE:
            self.inside = False
        return kind
