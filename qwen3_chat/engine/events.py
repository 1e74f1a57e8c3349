"""Typed generation events: plain dataclasses, no MLX, so UIs and servers import them cheaply.

The token layer yields ids; the event layer turns them into these; the UI renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Why a reply ended: an end-of-turn token, max_tokens answer tokens, the context was full,
# or the user stopped it (set by ChatSession, whose stream was cut off).
FinishReason = Literal["stop", "length", "context", "interrupted"]


@dataclass(frozen=True)
class ReasoningText:
    text: str


@dataclass(frozen=True)
class AnswerText:
    text: str


@dataclass(frozen=True)
class ThinkingDone:
    """Emitted once, when `</think>` is produced (or forced by the budget)."""

    tokens: int
    seconds: float
    budget_hit: bool


@dataclass(frozen=True)
class ContextTrimmed:
    """The session dropped its oldest turns to fit the context."""

    dropped_turns: int
    context_used: int
    context_length: int


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    prefill_tokens: int  # actually run through the model (after prompt-cache reuse)
    reasoning_tokens: int
    answer_tokens: int
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    total_s: float
    peak_memory_gb: float
    finish_reason: FinishReason
    budget_hit: bool
    # {"method", "drafted", "accepted"} when speculative decoding was asked for.
    speculation: dict | None = None


# ChatSession keeps `reasoning_tokens` on each assistant message under this key, so /history
# says what the stats line said (re-encoding the stripped reasoning counts differently).
REASONING_TOKENS = "reasoning_tokens"


@dataclass(frozen=True)
class Finished:
    stats: GenerationStats
    reasoning: str
    answer: str
    token_ids: tuple[int, ...] = field(default_factory=tuple)


Event = ReasoningText | AnswerText | ThinkingDone | ContextTrimmed | Finished
