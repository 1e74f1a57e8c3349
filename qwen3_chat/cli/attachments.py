"""Text files attached to a message (/file PATH in the REPL, `qwen3 chat -f FILE`).

Only UTF-8 text is accepted, and a file must fit in what is left of the context: a file the
model cannot see whole is refused with its size, never silently cut.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3_chat.errors import Qwen3ChatError

# Read no further than this before counting tokens: far beyond any Qwen3 context in text.
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass
class Attachment:
    name: str  # the file name only: the full path stays private
    text: str  # the block added to the message (header, fenced content)
    tokens: int


def _fence(content: str) -> str:
    """A backtick fence longer than any run of backticks inside the file."""
    longest = max((len(m) for m in re.findall(r"`+", content)), default=0)
    return "`" * max(3, longest + 1)


def read_attachment(path: str | Path, tokenizer: Any, room: int) -> Attachment:
    """Read a UTF-8 text file as an attachment of at most `room` tokens, or say why not."""
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            raise Qwen3ChatError(f"{path}: is a folder, not a file")
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise Qwen3ChatError(f"{path}: {size / 2**20:.0f} MB is too large to attach")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise Qwen3ChatError(f"{path}: no such file") from None
    except OSError as e:
        raise Qwen3ChatError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        if b"\0" in raw:
            raise UnicodeError
        content = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeError:
        raise Qwen3ChatError(f"{path}: not a UTF-8 text file; only text can be attached") from None
    fence = _fence(content)
    text = f"{p.name}:\n{fence}\n{content.rstrip(chr(10))}\n{fence}"
    tokens = len(tokenizer.encode(text))
    if tokens > room:
        raise Qwen3ChatError(f"{path}: {tokens} tokens, but only {max(room, 0)} tokens of "
                             "the context are left (/clear frees it)")  # fmt: skip
    return Attachment(p.name, text, tokens)


def with_attachments(message: str, files: Sequence[Attachment]) -> str:
    """The message the model sees: each file as a named, fenced block, then the text."""
    return "\n\n".join([*(f.text for f in files), message] if message else [f.text for f in files])


def read_attachments(
    paths: Sequence[str | Path], session: Any, pending: Sequence[Attachment] = ()
) -> list[Attachment]:
    """Files for the next message of `session`, each checked against the context that the
    conversation, the files already `pending` and the ones before it leave."""
    files: list[Attachment] = []
    for path in paths:
        taken = session.context_used + sum(f.tokens for f in (*pending, *files))
        files.append(read_attachment(path, session.tokenizer, session.context_length - taken))
    return files
