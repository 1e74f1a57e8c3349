"""Copying text to the user's clipboard: the terminal's OSC 52, and a local clipboard tool.

OSC 52 reaches the clipboard of the machine the terminal runs on, also over ssh; a tool
(pbcopy, wl-copy, xclip, xsel) covers terminals that ignore OSC 52. Tools run with an
argument list and the text on stdin: no shell ever sees the text.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from typing import TextIO

# Many terminals drop OSC 52 payloads beyond ~100 kB (xterm's default limit is near that).
OSC52_MAX = 100_000
TOOL_TIMEOUT_S = 5
OSC52_NAME = "terminal (OSC 52)"
# (program, arguments, the environment variable its display server needs, if any)
TOOLS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("pbcopy", (), None),
    ("wl-copy", (), "WAYLAND_DISPLAY"),
    ("xclip", ("-selection", "clipboard"), "DISPLAY"),
    ("xsel", ("--clipboard", "--input"), "DISPLAY"),
)


def osc52(text: str) -> str | None:
    """The OSC 52 "set clipboard" sequence for `text`, None when it is too long to send."""
    payload = base64.b64encode(text.encode("utf-8")).decode("ascii")
    return None if len(payload) > OSC52_MAX else f"\x1b]52;c;{payload}\x07"


def copy_with_tool(text: str) -> str | None:
    """Copy with the first clipboard tool that is installed and works; its name, or None."""
    for program, args, needs in TOOLS:
        exe = shutil.which(program)
        if exe is None or (needs and not os.environ.get(needs)):
            continue
        try:
            subprocess.run([exe, *args], input=text.encode("utf-8"), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=TOOL_TIMEOUT_S)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        return program
    return None


def copy(text: str, out: TextIO) -> list[str]:
    """Copy `text` every way available; the ways used (OSC52_NAME, tool names)."""
    used = []
    term = os.environ.get("TERM", "")
    if out.isatty() and term not in ("", "dumb"):
        seq = osc52(text)
        if seq is not None:
            out.write(seq)
            out.flush()
            used.append(OSC52_NAME)
    tool = copy_with_tool(text)
    if tool:
        used.append(tool)
    return used
