"""Presenting one turn's event stream: rich live panels for a terminal, plain text for pipes.

Only the cli package prints. Events come from the MLX-free `engine.events`, so importing
render never pulls in MLX.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.text import Text

from qwen3_chat.engine.events import (
    AnswerText,
    ContextTrimmed,
    Finished,
    ReasoningText,
    ThinkingDone,
)

THINK_TAIL_LINES = 6  # reasoning lines kept visible in the live thinking panel


def thought_line(tokens: int, seconds: float, budget_hit: bool, *, expanded: bool) -> str:
    """The one line a finished reasoning block collapses to."""
    line = f"▸ Thought for {tokens} tokens ({seconds:.1f} s)"
    if budget_hit:
        line += " · stopped by the thinking budget"
    if not expanded:
        line += " · /show to expand"
    return line


def stats_line(stats: Any) -> str:
    """A short summary of GenerationStats: tokens, decode speed, time to first token."""
    parts = [f"{stats.prompt_tokens} prompt"]
    if stats.reasoning_tokens:
        parts.append(f"{stats.reasoning_tokens} thinking")
    parts.append(f"{stats.answer_tokens} answer tokens")
    parts.append(f"{stats.decode_tps:.1f} tok/s")
    parts.append(f"first token {stats.ttft_s:.2f} s")
    parts.append(f"total {stats.total_s:.1f} s")
    if stats.finish_reason == "length":
        parts.append("stopped at --max-tokens")
    return " · ".join(parts)


def reasoning_panel(reasoning: str, title: str = "reasoning") -> Panel:
    return Panel(Text(reasoning or "(no reasoning)", style="dim"), title=title,
                 title_align="left", border_style="dim")  # fmt: skip


@dataclass
class TurnResult:
    """What a rendered turn produced, for the caller (the REPL keeps the stats)."""

    stats: Any = None
    interrupted: bool = False
    answer: str = ""


@dataclass
class LiveTurn:
    """Renders one reply in a terminal: a transient thinking panel, then live Markdown."""

    console: Console
    show_thinking: bool = False
    budget: int | None = None
    reasoning: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    think_tokens: int = 0
    _live: Live | None = None
    _phase: str = ""  # "", "thinking", "answer"

    def _thinking_view(self) -> Panel:
        text = "".join(self.reasoning)
        width = max(self.console.width - 4, 20)
        # Tail of the reasoning: the last few wrapped lines only, so the panel never scrolls.
        lines = Text(text, style="dim").wrap(self.console, width)
        tail = Text("\n").join(lines[-THINK_TAIL_LINES:])
        counter = f"thinking · {self.think_tokens} tokens"
        if self.budget is not None:
            counter += f" · budget {self.budget}"
        return Panel(tail, title=counter, title_align="left", border_style="dim", style="dim")

    def _answer_view(self) -> Markdown:
        return Markdown("".join(self.answer))

    def _switch(self, phase: str) -> None:
        if self._phase == phase:
            return
        self._stop_live()
        self._phase = phase
        if phase == "thinking" and not self.show_thinking:
            self._live = Live(self._thinking_view(), console=self.console, transient=True,
                              refresh_per_second=8)  # fmt: skip
        elif phase == "answer":
            self._live = Live(self._answer_view(), console=self.console, refresh_per_second=8,
                              vertical_overflow="visible")  # fmt: skip
        if self._live is not None:
            self._live.start()

    def _stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def on_event(self, ev: Any) -> TurnResult | None:
        if isinstance(ev, ReasoningText):
            self._switch("thinking")
            self.reasoning.append(ev.text)
            self.think_tokens += 1
            if self.show_thinking:
                self.console.print(Text(ev.text, style="dim italic"), end="")
            elif self._live is not None:
                self._live.update(self._thinking_view())
        elif isinstance(ev, ThinkingDone):
            if self._phase in ("thought", "answer"):
                return None  # a stray </think> inside the answer: the block already closed
            self._stop_live()
            if self.show_thinking:
                self.console.print()
            self.console.print(Text(thought_line(ev.tokens, ev.seconds, ev.budget_hit,
                                                 expanded=self.show_thinking), style="dim"))
            self._phase = "thought"
        elif isinstance(ev, AnswerText):
            self._switch("answer")
            self.answer.append(ev.text)
            if self._live is not None:
                self._live.update(self._answer_view())
        elif isinstance(ev, ContextTrimmed):
            self._stop_live()
            self._phase = ""
            self.console.print(Text(
                f"⚠ context nearly full: dropped the {ev.dropped_turns} oldest exchange(s); "
                f"now {ev.context_used} of {ev.context_length} tokens", style="yellow"))
        elif isinstance(ev, Finished):
            self._stop_live()
            if self._phase == "thinking" and self.show_thinking:
                self.console.print()
            if ev.stats.reasoning_tokens and not ev.answer and self._phase == "thinking":
                self.console.print(Text("▸ Thinking did not finish before --max-tokens",
                                        style="dim"))
            self.console.print(Text(stats_line(ev.stats), style="dim"))
            return TurnResult(ev.stats, False, ev.answer)
        return None

    def interrupt(self) -> TurnResult:
        """Ctrl-C: freeze what was shown and mark it interrupted."""
        self._stop_live()
        if self._phase == "thinking":
            self.console.print(Text(f"▸ Thinking interrupted after {self.think_tokens} tokens",
                                    style="dim"))
        self.console.print(Text("[interrupted]", style="bold yellow"))
        return TurnResult(None, True, "".join(self.answer))


@dataclass
class PlainTurn:
    """One-shot output: the answer as plain text on stdout, everything else on stderr."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    show_thinking: bool = False
    echo_answer: bool = True  # False for --json, which prints once at the end
    _reasoning_open: bool = False

    def on_event(self, ev: Any) -> TurnResult | None:
        if isinstance(ev, ReasoningText) and self.show_thinking:
            self.err.write(ev.text)
            self.err.flush()
            self._reasoning_open = True
        elif isinstance(ev, ThinkingDone) and self.show_thinking:
            self.err.write("\n" if self._reasoning_open else "")
            self.err.write(thought_line(ev.tokens, ev.seconds, ev.budget_hit, expanded=True))
            self.err.write("\n")
            self.err.flush()
        elif isinstance(ev, AnswerText) and self.echo_answer:
            self.out.write(ev.text)
            self.out.flush()
        elif isinstance(ev, ContextTrimmed):
            self.err.write(f"warning: dropped {ev.dropped_turns} oldest exchange(s) to fit "
                           f"the context of {ev.context_length} tokens\n")
        elif isinstance(ev, Finished):
            if self.echo_answer and ev.answer:
                self.out.write("\n")
                self.out.flush()
            return TurnResult(ev.stats, False, ev.answer)
        return None


def make_console(file: TextIO | None = None, **kwargs: Any) -> Console:
    """A console that honours NO_COLOR and plain (non-TTY) outputs; rich does both itself."""
    return Console(file=file, highlight=False, **kwargs)


__all__ = ["Group", "LiveTurn", "PlainTurn", "TurnResult", "make_console", "reasoning_panel",
           "stats_line", "thought_line"]
