"""ChatSession: the state of one conversation, separate from any presentation.

It renders the whole conversation with the model's template every turn, and reuses the
KV cache up to where the new prompt diverges from what the cache holds (the template
drops earlier reasoning, so that is usually inside the previous assistant turn).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import mlx.core as mx

from qwen3_chat.engine.events import (
    AnswerText,
    ContextTrimmed,
    Event,
    Finished,
    GenerationStats,
    ReasoningText,
    ThinkingDone,
)
from qwen3_chat.engine.generate import DEFAULT_MAX_TOKENS, stream_generate
from qwen3_chat.engine.sampling import SamplingParams
from qwen3_chat.errors import Qwen3ChatError

CAPABILITIES = ("hybrid", "never", "always")
SAVE_VERSION = 1


def soft_switch(text: str) -> bool | None:
    """Qwen3's soft switch: a message ending in /think or /no_think sets that turn's mode."""
    tail = text.rstrip()
    if tail.endswith("/no_think") or tail.endswith("/nothink"):
        return False
    if tail.endswith("/think"):
        return True
    return None


def _check_settings(kw: dict[str, Any]) -> None:
    """Types of saved settings: a hand-edited file must fail here, not mid-generation."""
    for name in ("budget", "context_length"):
        if kw[name] is not None and (not isinstance(kw[name], int) or kw[name] < 0):
            raise ValueError(f"{name} must be a non-negative integer or null")
    if kw["system"] is not None and not isinstance(kw["system"], str):
        raise ValueError("system must be a string or null")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: str | None = None,
        thinking: bool = True,
        budget: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        sampling: SamplingParams | None = None,
        capability: str = "hybrid",
        context_length: int | None = None,
        sampling_overrides: dict[str, Any] | None = None,
        mode_sampling: dict[str, dict[str, Any]] | None = None,
    ):
        if capability not in CAPABILITIES:
            raise Qwen3ChatError(f"capability must be one of {', '.join(CAPABILITIES)}")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.thinking = thinking and capability != "never"
        self.budget = budget
        self.max_tokens = max_tokens
        self.sampling = sampling  # None: Qwen's recommended settings for each turn's mode
        # The user's knobs (e.g. only a seed) on top of each mode's defaults, and the
        # defaults themselves per mode ("thinking" / "non_thinking", e.g. from models.toml).
        self.sampling_overrides = dict(sampling_overrides or {})
        self.mode_sampling = {k: dict(v) for k, v in (mode_sampling or {}).items()}
        for mode in (True, False):
            self.sampling_for(mode)  # fail now, by name, on a bad setting
        self.capability = capability
        self._context_arg = context_length  # saved as given; None follows the model
        self.context_length = context_length or model.config.max_position_embeddings
        self.messages: list[dict[str, Any]] = []
        self.last_stats: GenerationStats | None = None
        self._cache = None
        self._cache_ids: list[int] = []  # the token ids whose keys/values the cache holds
        self._pending: dict[str, Any] | None = None  # the turn being generated

    # -- state -------------------------------------------------------------------------
    def sampling_for(self, thinking: bool) -> SamplingParams:
        """The sampling of a turn: fixed settings, else the mode's defaults plus overrides."""
        if self.sampling is not None:
            return self.sampling
        base = SamplingParams.for_mode(thinking)
        mode = self.mode_sampling.get("thinking" if thinking else "non_thinking", {})
        try:
            return base.replace(**mode).replace(**self.sampling_overrides)
        except TypeError as e:
            raise Qwen3ChatError(f"bad sampling setting: {e}") from None

    @property
    def can_think(self) -> bool:
        return self.capability != "never"

    def _thinking_for(self, text: str) -> bool:
        if self.capability != "hybrid":
            return self.capability == "always"
        switch = soft_switch(text)
        if switch is not None:
            return switch
        return self.thinking and self.budget != 0  # a zero budget means non-thinking mode

    def _conversation(self, messages: Sequence[dict]) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [
            {k: v for k, v in m.items() if k in ("role", "content", "reasoning_content")}
            for m in messages
        ]

    def render(self, thinking: bool, messages: Sequence[dict] | None = None) -> list[int]:
        """Token ids of the conversation plus the assistant header for the next reply."""
        conv = self._conversation(self.messages if messages is None else messages)
        text = self.tokenizer.apply_chat_template(
            conv, add_generation_prompt=True, enable_thinking=thinking
        )
        return self.tokenizer.encode(text)

    @property
    def context_used(self) -> int:
        if not self.messages and not self.system:
            return 0
        conv = self._conversation(self.messages)
        if not conv:
            return 0
        text = self.tokenizer.apply_chat_template(conv, add_generation_prompt=False)
        return len(self.tokenizer.encode(text))

    # -- turns -------------------------------------------------------------------------
    def send(self, text: str) -> Iterator[Event]:
        """Add a user message and stream the reply."""
        self.abort()  # a reply abandoned half-way is kept as interrupted
        self.messages.append({"role": "user", "content": text})
        return self._respond(self._thinking_for(text))

    def retry(self) -> Iterator[Event]:
        """Drop the last reply (if any) and answer the last user message again."""
        self.abort()
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            raise Qwen3ChatError("nothing to retry yet")
        return self._respond(self._thinking_for(self.messages[-1]["content"]))

    def undo(self) -> bool:
        """Remove the last exchange (reply and question); False when there is none."""
        self.abort()
        if not self.messages:
            return False
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
        return True

    def clear(self) -> None:
        self.abort()
        self.messages.clear()

    def _fit_context(self, thinking: bool) -> tuple[list[int], int]:
        """Render, dropping the oldest exchanges while the prompt leaves too little room.

        A message too long even on its own is rejected before any history is dropped.
        """
        alone = self.render(thinking, self.messages[-1:])
        if len(alone) >= self.context_length:
            self.messages.pop()
            raise Qwen3ChatError(
                f"the prompt is {len(alone)} tokens, longer than the model's context "
                f"of {self.context_length}"
            )
        reserve = min(
            self.max_tokens + ((self.budget or 0) if thinking else 0), self.context_length // 4
        )
        dropped = 0
        ids = self.render(thinking)
        while len(ids) + reserve > self.context_length and self._drop_oldest_turn():
            dropped += 1
            ids = self.render(thinking)
        return ids, dropped

    def _drop_oldest_turn(self) -> bool:
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if len(users) < 2:
            return False
        del self.messages[: users[1]]
        return True

    def _reuse_cache(self, ids: list[int]) -> int:
        """Trim the cache back to where `ids` diverges from it; returns tokens reused."""
        if self._cache is None:
            self._cache, self._cache_ids = self.model.make_cache(), []
        keep = min(common_prefix(self._cache_ids, ids), len(ids) - 1)
        for c in self._cache:
            c.trim(c.offset - keep)
        self._cache_ids = ids[:keep]
        return keep

    def _respond(self, thinking: bool) -> Iterator[Event]:
        ids, dropped = self._fit_context(thinking)
        if dropped:
            yield ContextTrimmed(dropped, len(ids), self.context_length)
        reused = self._reuse_cache(ids)
        self._pending = {
            "ids": ids, "reused": reused, "reasoning": [], "answer": [],
            "start": time.perf_counter(), "budget_hit": False,
        }  # fmt: skip
        sampling = self.sampling_for(thinking)
        for ev in stream_generate(
            self.model,
            self.tokenizer,
            ids[reused:],
            cache=self._cache,
            sampling=sampling,
            max_tokens=self.max_tokens,
            thinking_budget=self.budget if thinking else None,
            prompt_tokens=len(ids),
            context_length=self.context_length,
        ):
            if isinstance(ev, ThinkingDone):
                self._pending["budget_hit"] = ev.budget_hit
            elif isinstance(ev, ReasoningText):
                self._pending["reasoning"].append(ev.text)
            elif isinstance(ev, AnswerText):
                self._pending["answer"].append(ev.text)
            elif isinstance(ev, Finished):
                self._finish(ids, ev)
            yield ev

    def _finish(self, ids: list[int], ev: Finished) -> None:
        msg: dict[str, Any] = {"role": "assistant", "content": ev.answer}
        if ev.reasoning:
            msg["reasoning_content"] = ev.reasoning
        if ev.stats.finish_reason == "length":
            msg["truncated"] = True
        self.messages.append(msg)
        offset = min(c.offset for c in self._cache)
        self._cache_ids = (ids + list(ev.token_ids))[:offset]
        self.last_stats = ev.stats
        self._pending = None

    def abort(self) -> None:
        """After an interrupted reply: keep what was said, marked, and resync the cache."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        reasoning = "".join(pending["reasoning"]).strip()
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(pending["answer"]).strip()}
        if reasoning:
            msg["reasoning_content"] = reasoning
        msg["interrupted"] = True
        self.messages.append(msg)
        self.last_stats = self._interrupted_stats(pending, reasoning, msg["content"])
        # Which generated tokens reached the cache is unknown: keep only the prompt part.
        keep = min([len(pending["ids"]), *(c.offset for c in self._cache)])
        for c in self._cache:
            c.trim(c.offset - keep)
        self._cache_ids = pending["ids"][:keep]

    def _interrupted_stats(
        self, pending: dict[str, Any], reasoning: str, answer: str
    ) -> GenerationStats:
        """Stats for a reply cut short; token counts re-encoded from the text shown."""
        total = time.perf_counter() - pending["start"]
        return GenerationStats(
            prompt_tokens=len(pending["ids"]),
            prefill_tokens=len(pending["ids"]) - pending["reused"],
            reasoning_tokens=len(self.tokenizer.encode(reasoning)) if reasoning else 0,
            answer_tokens=len(self.tokenizer.encode(answer)) if answer else 0,
            prefill_tps=0.0, decode_tps=0.0, ttft_s=0.0, total_s=total,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason="interrupted",
            budget_hit=pending["budget_hit"],
        )  # fmt: skip

    # -- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self.abort()
        return {
            "version": SAVE_VERSION,
            "system": self.system,
            "thinking": self.thinking,
            "budget": self.budget,
            "max_tokens": self.max_tokens,
            "sampling": asdict(self.sampling) if self.sampling else None,
            "capability": self.capability,
            "context_length": self._context_arg,
            "sampling_overrides": dict(self.sampling_overrides),
            "mode_sampling": {k: dict(v) for k, v in self.mode_sampling.items()},
            "messages": [dict(m) for m in self.messages],
        }

    @classmethod
    def from_dict(cls, model, tokenizer, d: dict[str, Any], **overrides) -> ChatSession:
        try:
            if d.get("version") != SAVE_VERSION:
                raise ValueError(f"unknown save version {d.get('version')!r}")
            messages = d["messages"]
            for m in messages:
                if (
                    m.get("role") not in ("user", "assistant")
                    or not isinstance(m.get("content"), str)
                    or not isinstance(m.get("reasoning_content", ""), str)
                ):
                    raise ValueError(f"bad message {str(m)[:60]!r}")
            sampling = SamplingParams(**d["sampling"]) if d.get("sampling") else None
            kwargs = dict(
                system=d.get("system"),
                thinking=bool(d.get("thinking", True)),
                budget=d.get("budget"),
                max_tokens=int(d.get("max_tokens", DEFAULT_MAX_TOKENS)),
                sampling=sampling,
                capability=d.get("capability", "hybrid"),
                context_length=d.get("context_length"),
                sampling_overrides=dict(d.get("sampling_overrides") or {}),
                mode_sampling={k: dict(v) for k, v in (d.get("mode_sampling") or {}).items()},
            )
            _check_settings(kwargs)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise Qwen3ChatError(f"not a saved qwen3-chat conversation: {e}") from None
        kwargs.update(overrides)
        session = cls(model, tokenizer, **kwargs)
        session.messages = [dict(m) for m in messages]
        return session
