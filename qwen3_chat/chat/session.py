"""ChatSession: the state of one conversation, separate from any presentation.

It renders the whole conversation with the model's template every turn, and reuses the
KV cache up to where the new prompt diverges from what the cache holds (the template
drops earlier reasoning, so that is usually inside the previous assistant turn). The
conversation changes only through its methods, so it stays consistent: turns alternate,
and a reply cut off is kept, marked, or undone when nothing of it was said.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

from qwen3_chat.chat.prompt_cache import PromptCache
from qwen3_chat.chat.settings import SessionSettings, check_capability, check_thinking, soft_switch
from qwen3_chat.chat.turn import Turn, check_int, check_message, check_text
from qwen3_chat.engine.defaults import ALWAYS, DEFAULT_MAX_TOKENS, HYBRID
from qwen3_chat.engine.events import (
    REASONING_TOKENS,
    AnswerText,
    ContextTrimmed,
    Event,
    Finished,
    GenerationStats,
    ReasoningText,
    ThinkingDone,
)
from qwen3_chat.engine.generate import stream_generate
from qwen3_chat.engine.phase import ThinkPhase
from qwen3_chat.engine.sampling import SamplingParams
from qwen3_chat.errors import Qwen3ChatError, SettingsError
from qwen3_chat.models.cache import Snapshots

SAVE_VERSION = 1
# soft_switch lives in chat/settings.py; it is imported from here too.
__all__ = ["SAVE_VERSION", "ChatSession", "soft_switch"]


class ChatSession(SessionSettings):
    """One conversation; its validated settings (thinking, budget, ...) are SessionSettings'."""

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
        capability: str = HYBRID,
        context_length: int | None = None,
        sampling_overrides: dict[str, Any] | None = None,
        mode_sampling: dict[str, dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ):
        check_capability(capability)
        check_thinking(thinking)
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise SettingsError("sampling must be a SamplingParams or None")
        self.model, self.tokenizer = model, tokenizer
        self.capability = capability
        # A conversation moved to a model of another capability takes the mode it allows.
        self._thinking = thinking if capability == HYBRID else capability == ALWAYS
        self.system = system
        self.budget = budget
        self.max_tokens = max_tokens
        self._context_arg = check_int("context_length", context_length, 1, optional=True)
        self.context_length: int = context_length or model.config.max_position_embeddings
        self.sampling = sampling
        self.sampling_overrides = dict(sampling_overrides or {})
        self.mode_sampling = {k: dict(v) for k, v in (mode_sampling or {}).items()}
        self.template_kwargs = template_kwargs  # switches such as preserve_thinking
        for mode in (True, False):
            self.sampling_for(mode)  # fail now, by name, on a bad setting
        self._messages: list[dict[str, Any]] = []
        self.last_stats: GenerationStats | None = None
        self._cache = PromptCache(model.make_cache, getattr(tokenizer, "im_end_id", None))
        self._turn: Turn | None = None
        # The REPL asks for context_used after every reply: answered from the last count
        # while the conversation is unchanged.
        self._context_memo: tuple[tuple, int] = ((), 0)
        # engine.speculative policy (None: plain decoding), set by the CLI.
        self.speculation = None

    @property
    def snapshots(self) -> Snapshots:
        """A hybrid model's rewind points (none for attention-only models), for /stats."""
        return self._cache.snapshots

    # -- the conversation --------------------------------------------------------------
    @property
    def messages(self) -> tuple[dict[str, Any], ...]:
        """A copy: change the conversation through the methods, which keep it consistent."""
        return tuple(dict(m) for m in self._messages)

    def load_messages(self, messages: Sequence[dict[str, Any]]) -> None:
        """Replace the conversation (e.g. a saved one); each message is checked."""
        checked = [check_message(m) for m in messages]
        self.abort()
        self._messages = checked

    def _conversation(self, messages: Sequence[dict]) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [
            {k: v for k, v in m.items() if k in ("role", "content", "reasoning_content")}
            for m in messages
        ]

    def render(self, thinking: bool, messages: Sequence[dict] | None = None) -> list[int]:
        """Token ids of the conversation plus the assistant header for the next reply."""
        conv = self._conversation(self._messages if messages is None else messages)
        text = self.tokenizer.apply_chat_template(
            conv, add_generation_prompt=True, enable_thinking=thinking, **self._template_kwargs
        )
        return self.tokenizer.encode_chat(text)  # turn N encodes only its new messages

    @property
    def context_used(self) -> int:
        conv = self._conversation(self._messages)
        if not conv:
            return 0
        key = tuple((m["role"], m["content"], m.get("reasoning_content")) for m in conv)
        key += tuple(sorted(self._template_kwargs.items()))
        if key != self._context_memo[0]:
            text = self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=False, **self._template_kwargs
            )
            self._context_memo = (key, len(self.tokenizer.encode_chat(text)))
        return self._context_memo[1]

    # -- turns -------------------------------------------------------------------------
    def send(self, text: str) -> Iterator[Event]:
        """Add a user message and stream the reply."""
        check_text("the message", text)
        self.abort()  # a reply abandoned half-way is kept as interrupted
        self._messages.append({"role": "user", "content": text})
        return self._start(Turn(added_user=True))

    def retry(self) -> Iterator[Event]:
        """Drop the last reply (if any) and answer the last user message again."""
        self.abort()
        if not self._messages:
            raise Qwen3ChatError("nothing to retry yet")
        replaced = self._messages.pop() if self._messages[-1]["role"] == "assistant" else None
        if not self._messages:  # a conversation that starts with a reply: nothing to ask
            self._messages.append(replaced)
            raise Qwen3ChatError("nothing to retry yet")
        return self._start(Turn(added_user=False, replaced=replaced))

    def undo(self) -> bool:
        """Remove the last exchange (reply and question); False when there is none."""
        self.abort()
        if not self._messages:
            return False
        if self._messages[-1]["role"] == "assistant":
            self._messages.pop()
        if self._messages and self._messages[-1]["role"] == "user":
            self._messages.pop()
        return True

    def clear(self) -> None:
        """Start afresh (the settings and the system prompt stay)."""
        self.abort()
        self._messages.clear()

    def abort(self) -> None:
        """After a reply was cut off (Ctrl-C, the stream closed): keep what was said,
        marked interrupted; a reply stopped before its first word is undone instead, so
        the conversation is as before the send() or retry(). Safe to call any time."""
        turn, self._turn = self._turn, None
        if turn is None:
            return
        prefilled = self._cache.interrupted(turn.ids) if turn.ids else turn.reused
        reasoning, answer = turn.text()
        self.last_stats = turn.interrupted_stats(self.tokenizer, prefilled)
        if not (reasoning or answer):
            self._cancel(turn)
            return
        msg: dict[str, Any] = {"role": "assistant", "content": answer}
        if reasoning:
            msg["reasoning_content"] = reasoning
            msg[REASONING_TOKENS] = self.last_stats.reasoning_tokens
        msg["interrupted"] = True
        self._messages.append(msg)

    def _cancel(self, turn: Turn) -> None:
        """Undo what starting `turn` changed: its question, or the reply it replaced."""
        if turn.added_user and self._messages and self._messages[-1]["role"] == "user":
            self._messages.pop()
        if turn.replaced is not None:
            self._messages.append(turn.replaced)

    def _fit_context(self, thinking: bool) -> tuple[list[int], int]:
        """Render, dropping the oldest exchanges while the prompt leaves too little room.

        A message too long even on its own is rejected before any history is dropped.
        """
        alone = self.render(thinking, self._messages[-1:])
        if len(alone) >= self.context_length:
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
        users = [i for i, m in enumerate(self._messages) if m["role"] == "user"]
        if len(users) < 2:
            return False
        del self._messages[: users[1]]
        return True

    def _start(self, turn: Turn) -> Iterator[Event]:
        # The turn is in flight from now, not from the first next(): a stream never read
        # is abandoned like one cut off, and abort() undoes it.
        self._turn = turn
        return self._respond(turn)

    def _respond(self, turn: Turn) -> Iterator[Event]:
        try:
            yield from self._generate(turn)
        except Qwen3ChatError:
            if turn.ids:
                self.abort()
            else:  # rejected before anything ran: as if never asked, last_stats unchanged
                self._turn = None
                self._cancel(turn)
            raise

    def _generate(self, turn: Turn) -> Iterator[Event]:
        thinking = self.thinking_for(self._messages[-1]["content"])
        ids, dropped = self._fit_context(thinking)
        turn.reused = self._cache.prepare(ids)
        turn.ids = ids
        if self.speculation is not None:  # lookup may quote the cached turns too
            self.speculation.context = ids[: turn.reused]
        if dropped:
            yield ContextTrimmed(dropped, len(ids), self.context_length)
        tok = self.tokenizer
        for ev in stream_generate(
            self.model,
            tok,
            ids[turn.reused :],
            cache=self._cache.layers,
            sampling=self.sampling_for(thinking),
            max_tokens=self.max_tokens,
            thinking_budget=self.budget if thinking else None,
            prompt_tokens=len(ids),
            context_length=self.context_length,
            # From the whole prompt: with a prompt cache, a <think> the template opened
            # (Thinking-2507) may be in the cached part that is never decoded again.
            in_think=ThinkPhase.ends_inside(ids, tok.think_start_id, tok.think_end_id),
            speculation=self.speculation,
        ):
            if isinstance(ev, ThinkingDone):
                turn.budget_hit = ev.budget_hit
            elif isinstance(ev, ReasoningText):
                turn.reasoning.append(ev.text)
            elif isinstance(ev, AnswerText):
                turn.answer.append(ev.text)
            elif isinstance(ev, Finished):
                self._finish(turn, ev)
            yield ev

    def _finish(self, turn: Turn, ev: Finished) -> None:
        msg: dict[str, Any] = {"role": "assistant", "content": ev.answer}
        if ev.reasoning:
            msg["reasoning_content"] = ev.reasoning
            msg[REASONING_TOKENS] = ev.stats.reasoning_tokens
        if ev.stats.finish_reason in ("length", "context"):
            msg["truncated"] = True
        self._messages.append(msg)
        self._cache.finished(turn.ids, ev.token_ids)
        self.last_stats = ev.stats
        self._turn = None

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
            "template_kwargs": self.template_kwargs,
            "messages": [dict(m) for m in self._messages],
        }

    @classmethod
    def from_dict(cls, model, tokenizer, d: dict[str, Any], **overrides) -> ChatSession:
        """A saved conversation; anything malformed is one Qwen3ChatError naming it."""
        try:
            if d.get("version") != SAVE_VERSION:
                raise SettingsError(f"unknown save version {d.get('version')!r}")
            sampling = SamplingParams(**d["sampling"]) if d.get("sampling") else None
            kwargs = dict(
                system=d.get("system"),
                thinking=d.get("thinking", True),
                budget=d.get("budget"),
                max_tokens=d.get("max_tokens", DEFAULT_MAX_TOKENS),
                sampling=sampling,
                capability=d.get("capability", HYBRID),
                context_length=d.get("context_length"),
                sampling_overrides=dict(d.get("sampling_overrides") or {}),
                mode_sampling={k: dict(v) for k, v in (d.get("mode_sampling") or {}).items()},
                template_kwargs=d.get("template_kwargs"),
            )
            messages = d["messages"]
            if not isinstance(messages, list):
                raise SettingsError("messages must be a list")
            session = cls(model, tokenizer, **{**kwargs, **overrides})
            session.load_messages(messages)
        except (KeyError, TypeError, ValueError, AttributeError, SettingsError) as e:
            raise Qwen3ChatError(f"not a saved qwen3-chat conversation: {e}") from None
        return session
