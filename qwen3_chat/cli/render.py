"""Presenting one turn's event stream: rich live panels for a terminal, plain text for pipes.

Only the cli package prints. Events come from the MLX-free `engine.events`, so importing
render never pulls in MLX.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.segment import Segment, SegmentLines
from rich.text import Text

from qwen3_chat.cli.terminal import sanitize
from qwen3_chat.engine.events import (
    AnswerText,
    ContextTrimmed,
    Finished,
    ReasoningText,
    ThinkingDone,
)

THINK_TAIL_LINES = 6  # reasoning lines kept visible in the live thinking panel
REFRESH_S = 0.1  # redraw at most ~10 times a second: rendering Markdown costs decode time
# Why generation ended, where that is worth a word (one wording for the stats line and notes).
FINISH_NOTES = {
    "length": "stopped at --max-tokens",
    "context": "stopped: the context window is full",
}
# Reasoning that never reached </think>, by finish_reason.
UNFINISHED_THINKING = {
    "stop": "the model stopped while thinking, without an answer",
    "length": "thinking did not finish before --max-tokens",
    "context": "thinking did not finish: the context window is full",
}
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


def count_tokens(n: int) -> str:
    """"1 token", "2 tokens": the counts the user reads after a short think or a quick Ctrl-C."""
    return f"{n} token" if n == 1 else f"{n} tokens"


def thought_line(tokens: int, seconds: float, budget_hit: bool, *, expanded: bool) -> str:
    """The one line a finished reasoning block collapses to."""
    line = f"▸ Thought for {count_tokens(tokens)} ({seconds:.1f} s)"
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
    if stats.finish_reason in FINISH_NOTES:
        parts.append(FINISH_NOTES[stats.finish_reason])
    return " · ".join(parts)


def speculation_line(stats: Any) -> str | None:
    """/stats: how many drafts speculative decoding proposed and kept (None if it did not run)."""
    sp = getattr(stats, "speculation", None)
    if not sp:
        return None
    if sp.get("reason"):
        return f"speculation off: {sp['reason']}"
    drafted, accepted = sp["drafted"], sp["accepted"]
    rate = f" ({accepted / drafted:.0%})" if drafted else ""
    return f"speculation ({sp['method']}): {accepted} of {drafted} drafted tokens accepted{rate}"


def unfinished_thinking_line(finish_reason: str) -> str:
    """The note for a turn that ended inside its reasoning, worded by why it ended."""
    return "▸ " + UNFINISHED_THINKING.get(finish_reason, f"thinking ended ({finish_reason})")


def reasoning_panel(reasoning: str, title: str = "reasoning") -> Panel:
    return Panel(Text(sanitize(reasoning) or "(no reasoning)", style="dim"), title=title,
                 title_align="left", border_style="dim")  # fmt: skip


def block_end(text: str, start: int = 0) -> int:
    """Where the finished Markdown blocks of text[start:] end: after the last blank line or
    closing code fence that is not inside a fence; `start` when no block has finished.

    Text before that point renders the same whatever follows, so it can be printed for good.
    """
    cut, fence, pos = start, "", start
    while (nl := text.find("\n", pos)) >= 0:
        line, pos = text[pos:nl], nl + 1
        m = _FENCE.match(line)
        if fence:
            closing = m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence)
            if closing and not line[m.end():].strip():
                fence, cut = "", pos
        elif m:
            fence = m.group(1)
        elif not line.strip():
            cut = pos
    return cut


@dataclass
class TurnResult:
    """What a rendered turn produced, for the caller (the REPL keeps the stats)."""

    stats: Any = None
    interrupted: bool = False
    answer: str = ""


@dataclass
class MarkdownStream:
    """An answer streamed as Markdown with each line reaching the scrollback exactly once.

    Finished blocks are printed for good; only the open block is live, and once it is
    taller than the screen its top lines are printed for good as well. rich.Live re-prints
    a render taller than the screen on every refresh, which flooded the scrollback.
    """

    console: Console
    text: str = ""
    _done: int = 0  # text[:_done] is printed for good
    _shown: int = 0  # lines of the open block's render already printed for good
    _prev: str = ""  # the last finished block: rendered ahead of the open one, so the
    _prev_lines: int = 0  # gap between them and list numbering come out as in one piece
    _live: Live | None = None
    _drawn: float = 0.0  # when the live part was last redrawn

    def add(self, piece: str) -> None:
        self.text += sanitize(piece)
        now = time.monotonic()
        if now - self._drawn >= REFRESH_S:
            self._drawn = now
            self.refresh()

    def _lines(self, source: str) -> list[list[Segment]]:
        return self.console.render_lines(Markdown(source), self.console.options)

    def _render(self, end: int) -> list[list[Segment]]:
        """text[_done:end] as it renders after the finished blocks."""
        source = self.text[self._done:end]
        if not source.strip():
            return []
        return self._lines(self._prev + source)[self._prev_lines:]

    def _print(self, lines: list[list[Segment]]) -> None:
        if lines:
            self.console.print(SegmentLines(lines, new_lines=True))

    def _finish_blocks(self, cut: int) -> None:
        """Print text[_done:cut] (whole blocks) for good."""
        self._print(self._render(cut)[self._shown:])
        block = self.text[self._done:cut]
        if block.strip():
            self._prev, self._prev_lines = block, len(self._lines(block))
        self._done, self._shown = cut, 0

    def refresh(self) -> None:
        cut = block_end(self.text, self._done)
        if cut > self._done:
            self._finish_blocks(cut)
        lines = self._render(len(self.text))
        room = max(self.console.size.height - 1, 1)  # the live part must fit on the screen
        if len(lines) - self._shown > room:
            self._print(lines[self._shown:len(lines) - room])
            self._shown = len(lines) - room
        if self._live is None:
            self._live = Live(console=self.console, auto_refresh=False, transient=True)
            self._live.start()
        self._live.update(SegmentLines(lines[self._shown:], new_lines=True), refresh=True)

    def close(self) -> None:
        """Print what is still live (or not yet drawn) for good; nothing stays live."""
        if self._live is not None:
            self._live.stop()  # transient: erases the live part
            self._live = None
        self._finish_blocks(len(self.text))


@dataclass
class LiveTurn:
    """Renders one reply in a terminal: a transient thinking panel, then streamed Markdown.

    Model text is sanitized on arrival, so nothing it contains can drive the terminal.
    """

    console: Console
    show_thinking: bool = False
    budget: int | None = None
    reasoning: list[str] = field(default_factory=list)
    think_tokens: int = 0
    _stream: MarkdownStream | None = None
    _live: Live | None = None  # the thinking panel
    _drawn: float = 0.0
    _phase: str = ""  # "", "thinking", "thought", "answer", "done"

    @property
    def answer(self) -> str:
        return self._stream.text if self._stream is not None else ""

    def _thinking_view(self) -> Panel:
        text = "".join(self.reasoning)
        width = max(self.console.width - 4, 20)
        # Tail of the reasoning: the last few wrapped lines only, so the panel never scrolls.
        lines = Text(text, style="dim").wrap(self.console, width)
        tail = Text("\n").join(lines[-THINK_TAIL_LINES:])
        counter = f"thinking · {count_tokens(self.think_tokens)}"
        if self.budget is not None:
            counter += f" · budget {self.budget}"
        return Panel(tail, title=counter, title_align="left", border_style="dim", style="dim")

    def _close(self) -> None:
        """End whatever is live: the thinking panel vanishes, the answer stays, once."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._stream is not None:
            self._stream.close()

    def _on_reasoning(self, text: str) -> None:
        if self._phase != "thinking":
            self._close()
            self._phase = "thinking"
            if not self.show_thinking:
                self._live = Live(self._thinking_view(), console=self.console, transient=True,
                                  auto_refresh=False)  # fmt: skip
                self._live.start(refresh=True)
        self.reasoning.append(text)
        self.think_tokens += 1
        if self.show_thinking:
            self.console.print(Text(text, style="dim italic"), end="")
        elif self._live is not None and time.monotonic() - self._drawn >= REFRESH_S:
            self._drawn = time.monotonic()
            self._live.update(self._thinking_view(), refresh=True)

    def on_event(self, ev: Any) -> TurnResult | None:
        if isinstance(ev, ReasoningText):
            self._on_reasoning(sanitize(ev.text))
        elif isinstance(ev, ThinkingDone):
            if self._phase in ("thought", "answer"):
                return None  # a stray </think> inside the answer: the block already closed
            self._close()
            if self.show_thinking:
                self.console.print()
            self.console.print(Text(thought_line(ev.tokens, ev.seconds, ev.budget_hit,
                                                 expanded=self.show_thinking), style="dim"))
            self._phase = "thought"
        elif isinstance(ev, AnswerText):
            if self._phase != "answer":
                self._close()
                self._phase, self._stream = "answer", MarkdownStream(self.console)
            self._stream.add(ev.text)
        elif isinstance(ev, ContextTrimmed):
            self._close()
            self._phase = ""
            self.console.print(Text(
                f"⚠ context nearly full: dropped the {ev.dropped_turns} oldest exchange(s); "
                f"now {ev.context_used} of {ev.context_length} tokens", style="yellow"))
        elif isinstance(ev, Finished):
            self._close()
            if self._phase == "thinking":
                if self.show_thinking:
                    self.console.print()
                self.console.print(Text(unfinished_thinking_line(ev.stats.finish_reason),
                                        style="dim"))
            self._phase = "done"
            self.console.print(Text(stats_line(ev.stats), style="dim"))
            return TurnResult(ev.stats, False, ev.answer)
        return None

    def interrupt(self) -> TurnResult:
        """Ctrl-C: keep what was shown (printed once), marked interrupted."""
        self._close()
        if self._phase == "thinking":
            if self.show_thinking:
                self.console.print()
            self.console.print(Text(f"▸ Thinking interrupted after "
                                    f"{count_tokens(self.think_tokens)}", style="dim"))
        if self._phase != "done":  # a Ctrl-C just after the last event stops nothing
            self.console.print(Text("[interrupted]", style="bold yellow"))
        self._phase = "done"
        return TurnResult(None, True, self.answer)


@dataclass
class PlainTurn:
    """One-shot output: the answer as plain text on stdout, everything else on stderr."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    show_thinking: bool = False
    echo_answer: bool = True  # False for --json, which prints once at the end
    _reasoning_open: bool = False  # reasoning written to stderr without its newline yet
    _thinking: bool = False  # inside a reasoning block that has not closed

    def on_event(self, ev: Any) -> TurnResult | None:
        if isinstance(ev, ReasoningText):
            self._thinking = True
            if self.show_thinking:
                self.err.write(sanitize(ev.text))
                self.err.flush()
                self._reasoning_open = True
        elif isinstance(ev, ThinkingDone):
            self._thinking = False
            if self.show_thinking:
                self._end_reasoning()
                self.err.write(thought_line(ev.tokens, ev.seconds, ev.budget_hit, expanded=True))
                self.err.write("\n")
                self.err.flush()
        elif isinstance(ev, AnswerText) and self.echo_answer:
            self.out.write(sanitize(ev.text))
            self.out.flush()
        elif isinstance(ev, ContextTrimmed):
            self.err.write(f"warning: dropped {ev.dropped_turns} oldest exchange(s) to fit "
                           f"the context of {ev.context_length} tokens\n")
        elif isinstance(ev, Finished):
            if self.echo_answer and ev.answer:
                self.out.write("\n")
                self.out.flush()
            if self._thinking and not ev.answer:  # says why stdout is empty
                self._end_reasoning()
                why = UNFINISHED_THINKING.get(ev.stats.finish_reason, "no answer")
                self.err.write(f"warning: {why}\n")
                self.err.flush()
            return TurnResult(ev.stats, False, ev.answer)
        return None

    def _end_reasoning(self) -> None:
        if self._reasoning_open:
            self.err.write("\n")
            self._reasoning_open = False


def make_console(file: TextIO | None = None, **kwargs: Any) -> Console:
    """A console that honours NO_COLOR and plain (non-TTY) outputs; rich does both itself."""
    return Console(file=file, highlight=False, **kwargs)


__all__ = ["FINISH_NOTES", "Group", "LiveTurn", "MarkdownStream", "PlainTurn", "TurnResult",
           "block_end", "make_console", "reasoning_panel", "stats_line", "thought_line",
           "unfinished_thinking_line"]
