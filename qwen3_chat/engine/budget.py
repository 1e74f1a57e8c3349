"""The thinking budget: a policy that caps the reasoning tokens of one turn.

Qwen's recipe: once the budget is spent, stop thinking and feed a closing sentence plus
`</think>` so the model answers from what it has. We add a short grace window so the cut
lands at the end of a line (or at least between words), never mid-word.

The budget does not track the phase: the caller's `ThinkPhase` decides which tokens are
reasoning and hands only those over.
"""

from __future__ import annotations

from collections.abc import Sequence

CLOSING_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the "
    "thinking directly now.\n</think>\n\n"
)
DEFAULT_GRACE = 32
# In the last few tokens of the grace window a word boundary is good enough: cut there
# rather than risk running out of window in the middle of a word.
WORD_TAIL = 8


class ThinkingBudget:
    """Counts every reasoning token of the turn (all think blocks) and forces the close.

    `on_reasoning_token(id, text)` is called for each sampled reasoning token; it returns
    None to keep it, or the token ids to feed instead (the kept token, if any, then the
    closing). Reasoning never exceeds `budget + grace` of the model's own tokens: within
    the grace window the cut comes after the first token holding a newline, or, near the
    window's end, before a token that starts a new word; at the window's end it comes
    regardless.
    """

    def __init__(self, budget: int, closing_ids: Sequence[int], grace: int = DEFAULT_GRACE):
        self.budget = max(0, budget)
        self.grace = max(0, grace)
        self.closing_ids = list(closing_ids)
        self.used = 0  # the model's own reasoning tokens kept so far
        self.hit = False

    def on_reasoning_token(self, token: int, text: str) -> list[int] | None:
        over = self.used + 1 - self.budget  # >0: this token is past the budget
        if over <= 0:
            self.used += 1
            return None
        if over > self.grace:
            return self._close(keep=None)  # the window is spent: this token never happens
        if "\n" in text:
            return self._close(keep=token)  # the line is finished: cut right after it
        if text.startswith(" ") and over > self.grace - min(WORD_TAIL, self.grace):
            return self._close(keep=None)  # a new word would start here: cut before it
        self.used += 1
        return None

    def _close(self, keep: int | None) -> list[int]:
        self.hit = True
        if keep is None:
            return list(self.closing_ids)
        self.used += 1
        return [keep, *self.closing_ids]
