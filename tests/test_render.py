"""Rendering a turn: what reaches a terminal (rich on a fixed-size fake terminal, read back
through the pyte emulator), the sanitizer, the finish wording and the tty helpers."""

from __future__ import annotations

import io
import os
import select
import signal
import termios

import pyte
import pytest

from qwen3_chat.cli import render
from qwen3_chat.cli.render import (
    LiveTurn,
    PlainTurn,
    block_end,
    reasoning_panel,
    stats_line,
    unfinished_thinking_line,
)
from qwen3_chat.cli.terminal import InterruptGuard, discard_typeahead, quiet_keyboard, sanitize
from qwen3_chat.engine.events import (
    AnswerText,
    Finished,
    GenerationStats,
    ReasoningText,
    ThinkingDone,
)

W, H = 50, 10
EVIL = "a\x1b]0;pwned\x07b\x1b[2Jc\x9b1md\x7f\x08e\rf"
LONG = "\n".join([
    "# Streaming", "",
    "A paragraph long enough to wrap over several lines of this narrow terminal, "
    "so that wrapping happens while it streams in. " * 3, "",
    *(f"- item {i}: something to say about it" for i in range(14)), "",
    "```python", *(f"x{i} = {i}  # a line of code" for i in range(16)), "", "y = 2", "```", "",
    *(f"{i}. numbered {i}" for i in range(1, 13)), "",
    "The end.",
])  # fmt: skip


def stats(reason: str = "stop", reasoning: int = 0, answer: int = 0) -> GenerationStats:
    return GenerationStats(prompt_tokens=5, prefill_tokens=5, reasoning_tokens=reasoning,
                           answer_tokens=answer, prefill_tps=100.0, decode_tps=50.0, ttft_s=0.1,
                           total_s=1.0, peak_memory_gb=0.1, finish_reason=reason,
                           budget_hit=False)  # fmt: skip


def fake_terminal(out: io.StringIO):
    """A colour terminal of W x H writing to `out`, with `lines()` to read back its screen."""
    from rich.console import Console

    console = Console(file=out, width=W, height=H, force_terminal=True, color_system="256",
                      highlight=False)  # fmt: skip

    def lines() -> list[str]:
        """Scrollback + screen after replaying everything written."""
        screen = pyte.HistoryScreen(W, H, history=10_000)
        pyte.Stream(screen).feed(out.getvalue().replace("\n", "\r\n"))  # a tty's onlcr
        rows = [*screen.history.top, *(screen.buffer[y] for y in range(H))]
        text = ["".join(r[x].data for x in range(W)).rstrip() for r in rows]
        while text and not text[-1]:
            text.pop()
        return text

    console.lines = lines  # type: ignore[attr-defined]
    console.raw = out  # type: ignore[attr-defined]
    return console


@pytest.fixture
def term():
    return fake_terminal(io.StringIO())


def static(markdown: str) -> list[str]:
    """The same Markdown printed in one go (the look streaming must match)."""
    from rich.console import Console
    from rich.markdown import Markdown

    out = io.StringIO()
    Console(file=out, width=W, height=H, force_terminal=False).print(Markdown(markdown))
    return [ln.rstrip() for ln in out.getvalue().rstrip("\n").split("\n")]


def stream(turn: LiveTurn, text: str, size: int = 3, cls: type = AnswerText) -> None:
    for i in range(0, len(text), size):
        turn.on_event(cls(text[i:i + size]))


def test_sanitize_keeps_text_and_drops_every_control():
    everything = "".join(map(chr, range(0xA1)))
    assert sanitize(everything) == "\t\n" + "".join(map(chr, range(0x20, 0x7F))) + "\xa0"
    assert sanitize(EVIL) == "a]0;pwnedb[2Jc1mdef"
    assert sanitize("x\r\ny é中🙂\u200d") == "x\ny é中🙂\u200d"
    assert "".join(sanitize(c) for c in EVIL) == sanitize(EVIL)  # safe piece by piece


def test_block_end_cuts_only_after_finished_blocks():
    assert block_end("para\n\nnext") == 6
    assert block_end("one line\nstill open") == 0
    assert block_end("```\ncode\n\nmore\n") == 0  # a blank line inside a fence is code
    assert block_end("```py\ncode\n\n```\nafter") == len("```py\ncode\n\n```\n")
    assert block_end("~~~~\n```\n~~~\n~~~~\n") == len("~~~~\n```\n~~~\n~~~~\n")
    assert block_end("a\n\nb\n\nc", 3) == 6


def test_long_answer_reaches_the_scrollback_once_and_looks_like_markdown(term, monkeypatch):
    monkeypatch.setattr(render, "REFRESH_S", 0)  # redraw on every piece: the worst case
    turn = LiveTurn(term)
    stream(turn, LONG)
    turn.on_event(Finished(stats(answer=400), "", LONG))
    shown = term.lines()
    stats_at = next(i for i, ln in enumerate(shown) if ln.startswith("5 prompt · 400 answer"))
    assert shown[:stats_at] == static(LONG)  # every line once, in order, as Markdown renders it


def test_ctrl_c_mid_answer_keeps_the_partial_answer_once(term, monkeypatch):
    monkeypatch.setattr(render, "REFRESH_S", 0)
    partial = LONG[:1200]
    turn = LiveTurn(term)
    stream(turn, partial)
    result = turn.interrupt()
    assert result.interrupted and result.answer == partial
    shown = term.lines()
    assert shown[-1] == "[interrupted]"
    assert shown[:-1] == static(partial)


def test_ctrl_c_while_thinking_leaves_no_panel(term, monkeypatch):
    monkeypatch.setattr(render, "REFRESH_S", 0)
    turn = LiveTurn(term, budget=100)
    stream(turn, "Let me think about this at some length. " * 20, cls=ReasoningText)
    assert "thinking · " in term.raw.getvalue()  # the panel was up
    turn.interrupt()
    assert term.lines() == [f"▸ Thinking interrupted after {turn.think_tokens} tokens",
                            "[interrupted]"]  # fmt: skip


@pytest.mark.parametrize("show_thinking", [False, True])
def test_model_text_cannot_drive_the_terminal(term, monkeypatch, show_thinking):
    monkeypatch.setattr(render, "REFRESH_S", 0)
    turn = LiveTurn(term, show_thinking=show_thinking)
    stream(turn, EVIL, size=2, cls=ReasoningText)
    turn.on_event(ThinkingDone(3, 0.1, False))
    stream(turn, EVIL, size=2)
    turn.on_event(Finished(stats(reasoning=3, answer=5), EVIL, EVIL))
    term.print(reasoning_panel(EVIL))
    raw = term.raw.getvalue()
    for seq in ("\x1b]", "\x07", "\x1b[2J", "\x9b", "\x7f", "\x08"):  # (rich sends CRs)
        assert seq not in raw, f"{seq!r} reached the terminal"
    shown = "\n".join(term.lines())
    assert shown.count(sanitize(EVIL)) == (3 if show_thinking else 2)


def test_plain_output_is_sanitized_and_json_keeps_raw_text():
    out, err = io.StringIO(), io.StringIO()
    turn = PlainTurn(out=out, err=err, show_thinking=True)
    for ev in (ReasoningText(EVIL), ThinkingDone(1, 0.1, False), AnswerText(EVIL),
               Finished(stats(reasoning=1, answer=1), EVIL, EVIL)):  # fmt: skip
        result = turn.on_event(ev)
    assert out.getvalue() == sanitize(EVIL) + "\n"
    assert err.getvalue().startswith(sanitize(EVIL) + "\n▸ Thought for 1 token (")  # not "1 tokens"
    assert result.answer == EVIL  # the caller (--json, saving) gets the raw text


@pytest.mark.parametrize("reason, said", [
    ("stop", "the model stopped while thinking, without an answer"),
    ("length", "thinking did not finish before --max-tokens"),
    ("context", "thinking did not finish: the context window is full"),
])  # fmt: skip
def test_unfinished_thinking_is_worded_by_why_it_ended(term, reason, said):
    turn = LiveTurn(term)
    turn.on_event(ReasoningText("hmm"))
    turn.on_event(Finished(stats(reason, reasoning=1), "hmm", ""))
    assert " ".join(term.lines()).startswith("▸ " + said)
    assert unfinished_thinking_line(reason) == "▸ " + said
    err = io.StringIO()
    plain = PlainTurn(out=io.StringIO(), err=err)
    plain.on_event(ReasoningText("hmm"))
    plain.on_event(Finished(stats(reason, reasoning=1), "hmm", ""))
    assert err.getvalue() == f"warning: {said}\n"


def test_stats_line_names_the_real_finish_reason():
    assert stats_line(stats("stop")).endswith("total 1.0 s")
    assert stats_line(stats("length")).endswith("stopped at --max-tokens")
    line = stats_line(stats("context"))
    assert line.endswith("stopped: the context window is full") and "max-tokens" not in line
    assert stats_line(stats("interrupted")).endswith("total 1.0 s")


# -- the tty helpers, on a real pseudo-terminal --------------------------------------------
@pytest.fixture
def pty():
    master, slave = os.openpty()
    tty = os.fdopen(slave, "r")
    yield master, tty
    tty.close()
    os.close(master)


def test_quiet_keyboard_turns_echo_off_and_always_restores(pty):
    master, tty = pty
    before = termios.tcgetattr(tty)
    assert before[3] & termios.ECHO
    with pytest.raises(RuntimeError), quiet_keyboard(tty):
        lflag = termios.tcgetattr(tty)[3]
        assert not lflag & termios.ECHO and lflag & termios.NOFLSH
        raise RuntimeError("an error mid-turn")
    assert termios.tcgetattr(tty) == before
    with quiet_keyboard(io.StringIO()):  # not a terminal: nothing to do, no error
        pass


def test_discard_typeahead_drops_what_was_typed(pty):
    master, tty = pty
    os.write(master, b"typed ahead\n")
    assert select.select([tty], [], [], 5)[0]
    discard_typeahead(tty)
    assert not select.select([tty], [], [], 0)[0]
    discard_typeahead(io.StringIO())  # not a terminal: ignored


def test_interrupt_guard_defers_ctrl_c_to_the_end_of_a_redraw():
    previous = signal.getsignal(signal.SIGINT)
    with InterruptGuard() as guard:
        done = []
        with pytest.raises(KeyboardInterrupt), guard.hold():
            signal.raise_signal(signal.SIGINT)
            done.append("the redraw finished")
        assert done == ["the redraw finished"]
        with guard.hold(defer=False):  # cleanup: a second Ctrl-C is dropped
            signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # elsewhere (prefill): at once
            signal.raise_signal(signal.SIGINT)
            done.append("never")
        assert done == ["the redraw finished"]
    assert signal.getsignal(signal.SIGINT) is previous



# -- Ctrl-C landing anywhere in a REPL turn (a real session on the tiny real-vocab model) ----
class CtrlCInRedraw(io.StringIO):
    """A terminal where Ctrl-C arrives in the middle of the `at`-th write (a redraw)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.writes = at, 0

    def write(self, text: str) -> int:
        done = super().write(text)
        self.writes += 1
        if self.writes == self.at:  # written, but the renderer has not taken note yet
            signal.raise_signal(signal.SIGINT)  # (the handler runs at once)
        return done


def repl_turn(tiny, console, stop_after: int | None):
    """One REPL turn; with `stop_after`, Ctrl-C lands inside the engine after that many
    events (0: before the first, i.e. in the prefill)."""
    from qwen3_chat import ChatSession
    from qwen3_chat.cli.repl import Repl

    model, tok = tiny
    session = ChatSession(model, tok, thinking=False, max_tokens=60,
                          sampling_overrides={"seed": 0})  # fmt: skip
    repl = Repl(session, loaded=None, open_model=None, console=console)

    def start():
        events = session.send("hello")
        if stop_after == 0:
            events.throw(KeyboardInterrupt)
        for i, ev in enumerate(events, 1):
            yield ev
            if i == stop_after:
                events.throw(KeyboardInterrupt)  # raised where the engine is suspended

    repl.generate(start)
    return session


@pytest.mark.parametrize("stop_after", [0, 1, 25])
def test_ctrl_c_anywhere_in_the_engine_leaves_screen_and_conversation_sound(tiny, term,
                                                                           stop_after):
    session = repl_turn(tiny, term, stop_after)
    shown = term.lines()
    assert shown[-1] == "[interrupted]"
    messages = session.messages
    if stop_after == 0:  # no word yet: the question is taken back
        assert messages == () and shown == ["[interrupted]"]
    else:
        user, reply = messages
        assert reply["interrupted"] and reply["content"]
        assert shown[:-1] == static(reply["content"])  # the partial answer, once


@pytest.mark.parametrize("at", range(2, 12))
def test_ctrl_c_in_the_middle_of_a_redraw_waits_for_it(tiny, monkeypatch, at):
    monkeypatch.setattr(render, "REFRESH_S", 0)
    out = CtrlCInRedraw(at)
    console = fake_terminal(out)
    session = repl_turn(tiny, console, None)
    assert out.writes > at  # it went on to clean up after the Ctrl-C
    shown = console.lines()
    assert shown[-1] == "[interrupted]"
    user, reply = session.messages
    assert reply["interrupted"] and reply["content"]
    assert shown[:-1] == static(reply["content"])
