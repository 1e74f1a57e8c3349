"""What the chat keeps on disk (saved conversations, input history), private to the user.

Everything lives under $XDG_STATE_HOME/qwen3-chat (default ~/.local/state/qwen3-chat), in
0700 folders and 0600 files: prompts and answers are as private as the user's own notes.
Conversations are saved atomically after every turn, one JSON file per conversation, so a
crash or Ctrl-C leaves the last complete state, never half a file.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.files import read_json, write_json

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
ID_PATTERN = re.compile(r"\d{8}-\d{6}-[0-9a-f]{4}")  # 20261123-181500-ab12
TITLE_CHARS = 60
LATEST = "latest"  # `--resume` with no id


def state_dir() -> Path:
    """$XDG_STATE_HOME/qwen3-chat (default ~/.local/state/qwen3-chat)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "qwen3-chat"


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it 0700, also when an older version made it 0755."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    os.chmod(path, PRIVATE_DIR)
    return path


def write_private_json(path: Path, data: dict[str, Any]) -> Path:
    """Atomically write `data` as a 0600 JSON file."""
    return write_json(path, data, mode=PRIVATE_FILE)


@dataclass
class ConversationInfo:
    id: str
    updated: float  # seconds since the epoch
    model: str
    messages: int
    title: str  # the first question, shortened


class ConversationStore:
    """One JSON file per conversation under state_dir()/conversations."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir() / "conversations"

    @staticmethod
    def new_id() -> str:
        return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)

    def path(self, conv_id: str) -> Path:
        # IDs come from the command line: only our own shape, never a path.
        if not ID_PATTERN.fullmatch(conv_id):
            raise Qwen3ChatError(f"{conv_id!r} is not a conversation id "
                                 "(`qwen3 conversations` lists them)")  # fmt: skip
        return self.root / f"{conv_id}.json"

    def save(self, conv_id: str, data: dict[str, Any]) -> Path:
        private_dir(self.root)
        return write_private_json(self.path(conv_id), {**data, "id": conv_id})

    def delete(self, conv_id: str) -> None:
        self.path(conv_id).unlink(missing_ok=True)

    def load(self, conv_id: str) -> dict[str, Any]:
        path = self.path(conv_id)
        if not path.exists():
            raise Qwen3ChatError(f"no saved conversation {conv_id} "
                                 "(`qwen3 conversations` lists them)")  # fmt: skip
        return read_json(path)  # "not valid JSON (...)"; the REPL's restore checks the rest

    def latest(self) -> str:
        found = self.list()
        if not found:
            raise Qwen3ChatError("no saved conversations yet")
        return found[0].id

    def list(self) -> list[ConversationInfo]:
        """Saved conversations, the most recent first; unreadable files are skipped."""
        found = []
        for path in self.root.glob("*.json") if self.root.is_dir() else ():
            if not ID_PATTERN.fullmatch(path.stem):
                continue
            try:
                data = read_json(path)
                messages = data["messages"]
                title = next((m["content"] for m in messages if m["role"] == "user"), "")
                title = " ".join(str(title).split())[:TITLE_CHARS]
                found.append(ConversationInfo(path.stem, path.stat().st_mtime,
                                              str(data.get("model", "?")), len(messages), title))
            except (Qwen3ChatError, OSError, KeyError, TypeError, AttributeError):
                continue
        return sorted(found, key=lambda c: (c.updated, c.id), reverse=True)


def conversations() -> None:
    """List saved conversations, the most recent first (resume with `qwen3 chat --resume ID`)."""
    from qwen3_chat.cli.terminal import sanitize

    found = ConversationStore().list()
    if not found:
        typer.echo("no saved conversations yet", err=True)
        return
    for c in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
        typer.echo(f"{c.id}  {when}  {c.messages:>3} messages  {sanitize(c.model)}  "
                   f"{sanitize(c.title)}")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("conversations")(conversations)


def saved_model(resume: str, store: ConversationStore | None = None) -> str | None:
    """The model the conversation `--resume` names was held with, or None when unknown: a
    bare `qwen3 chat --resume` continues with that model rather than the default one."""
    store = store or ConversationStore()
    try:
        data = store.load(store.latest() if resume == LATEST else resume)
    except Qwen3ChatError:
        return None  # the REPL's resume says what is wrong with it
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model.strip() else None


def resume_args(args: list[str]) -> list[str]:
    """A bare `--resume` (no id after it) becomes `--resume latest`.

    click options cannot take an optional value, so the id is recognised by its shape: what
    follows `--resume` is its value only when it looks like an id (or is `latest`)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--":
            return out + args[i + 1 :]
        if arg == "--resume":
            nxt = args[i + 1] if i + 1 < len(args) else ""
            if nxt != LATEST and not ID_PATTERN.fullmatch(nxt):
                out.append(LATEST)
    return out


class ChatCommand(TyperCommand):
    """`qwen3 chat`, taking `--resume` with or without an id."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, resume_args(args))
