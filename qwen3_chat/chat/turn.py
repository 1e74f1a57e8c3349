"""What ChatSession checks at its boundary, and the state of the reply in flight."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from qwen3_chat.engine.events import REASONING_TOKENS, GenerationStats
from qwen3_chat.errors import SettingsError

ROLES = ("user", "assistant")


def check_int(name: str, value: Any, low: int, optional: bool = False) -> int | None:
    """`value` as a setting: an int (not a bool) >= low, or None when optional."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        allowed = f"an integer >= {low}" + (" or None" if optional else "")
        raise SettingsError(f"{name} must be {allowed}, not {value!r}")
    return value


def check_text(name: str, value: Any, optional: bool = False) -> str | None:
    if (optional and value is None) or isinstance(value, str):
        return value
    raise SettingsError(f"{name} must be a string{' or None' if optional else ''}, "
                        f"not {type(value).__name__}")  # fmt: skip


def check_message(m: Any) -> dict[str, Any]:
    """A copy of one saved or given message, checked: a bad one fails here, not mid-turn."""
    if (
        not isinstance(m, dict)
        or m.get("role") not in ROLES
        or not isinstance(m.get("content"), str)
        or not isinstance(m.get("reasoning_content", ""), str)
        or type(m.get(REASONING_TOKENS, 0)) is not int
        or m.get(REASONING_TOKENS, 0) < 0
    ):
        raise SettingsError(f"bad message {str(m)[:60]!r}")
    return dict(m)


@dataclass
class Turn:
    """The reply in flight: what is needed to keep it, or undo it, if it stops early."""

    added_user: bool  # send() added the question; retry() answers one already there
    replaced: dict[str, Any] | None = None  # the reply retry() dropped
    started: float = field(default_factory=time.perf_counter)
    ids: list[int] = field(default_factory=list)  # the whole prompt, once rendered
    reused: int = 0  # prompt tokens already in the cache
    reasoning: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    budget_hit: bool = False

    def text(self) -> tuple[str, str]:
        """(reasoning, answer) shown so far."""
        return "".join(self.reasoning).strip(), "".join(self.answer).strip()

    def interrupted_stats(self, tokenizer: Any, prefilled: int) -> GenerationStats:
        """Stats for a reply cut short; token counts re-encoded from the text shown, and
        `prefilled` the prompt tokens the cache really holds."""
        reasoning, answer = self.text()
        return GenerationStats(
            prompt_tokens=len(self.ids),
            prefill_tokens=max(0, prefilled - self.reused),
            reasoning_tokens=len(tokenizer.encode(reasoning)) if reasoning else 0,
            answer_tokens=len(tokenizer.encode(answer)) if answer else 0,
            prefill_tps=0.0, decode_tps=0.0, ttft_s=0.0,
            total_s=time.perf_counter() - self.started,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason="interrupted",
            budget_hit=self.budget_hit,
        )  # fmt: skip
