"""The terminal while a reply streams: safe model text, a quiet keyboard, clean Ctrl-C.

Model output is untrusted: `sanitize` is the one place that decides what of it may reach a
terminal. The rest keeps the keyboard from garbling the screen during generation (echoed
keys and ^C) and keeps Ctrl-C from cutting a redraw in half.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

try:
    import termios
except ImportError:  # Windows: no tty modes to change
    termios = None  # type: ignore[assignment]

# C0 controls except tab and newline (ESC starts CSI/OSC sequences; CR overwrites a line;
# BEL, BS, FF...), DEL, and the C1 range (0x9b is a one-character CSI on some terminals).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitize(text: str) -> str:
    """Model text made safe to display: every control character but newline and tab removed.

    Character by character, so streamed pieces can be sanitized one at a time; CRLF
    becomes LF. Saved conversations and --json keep the raw text.
    """
    return _CONTROLS.sub("", text)


def _tty_fd(stream: TextIO | None) -> int | None:
    stream = sys.stdin if stream is None else stream
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # replaced by a test or closed: nothing to configure
    return fd if termios is not None and stream.isatty() else None


@contextmanager
def quiet_keyboard(stream: TextIO | None = None) -> Iterator[None]:
    """While generating: typed keys are not echoed into the output (no ^C, no type-ahead),
    and Ctrl-C does not flush the output queue (which cut escape sequences in half).

    Keys still queue up for the next prompt. Only when `stream` (stdin) is a terminal;
    the previous mode is restored however the block ends.
    """
    fd = _tty_fd(stream)
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] = (quiet[3] & ~termios.ECHO) | termios.NOFLSH  # lflags
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def discard_typeahead(stream: TextIO | None = None) -> None:
    """After Ctrl-C: drop what was typed during the stopped reply, as the tty driver would."""
    fd = _tty_fd(stream)
    if fd is not None:
        termios.tcflush(fd, termios.TCIFLUSH)


@dataclass
class InterruptGuard:
    """SIGINT raises KeyboardInterrupt at once (so a long prefill stops promptly), except
    inside `hold()`, where a screen update runs: there it waits for the block's end, so a
    redraw is never left half-written on screen with the renderer's state out of step.

    A no-op outside the main thread, where signal handlers cannot be set.
    """

    _depth: int = 0
    _pending: bool = False
    _previous: Any = None
    _active: bool = False

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._previous)
            self._active = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def hold(self, *, defer: bool = True) -> Iterator[None]:
        """Ctrl-C inside the block is raised at its end (`defer`) or dropped (cleanup that
        must finish, e.g. after a first Ctrl-C)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:  # an inner block leaves a pending Ctrl-C to the outer one
                pending, self._pending = self._pending, False
                if pending and defer:
                    raise KeyboardInterrupt


__all__ = ["InterruptGuard", "discard_typeahead", "quiet_keyboard", "sanitize"]
