"""The REPL's input history: a file under the state folder, private, never fatal.

An unusable folder (read-only, a file in its place) or a failed write turns history off
with one warning; chatting goes on.
"""

from __future__ import annotations

import os
from pathlib import Path

from prompt_toolkit.history import FileHistory, History, InMemoryHistory

from qwen3_chat.cli.conversations import PRIVATE_FILE, private_dir, state_dir


def history_path() -> Path:
    return state_dir() / "history"


class PrivateHistory(FileHistory):
    """prompt-toolkit's file history, created 0600; a failed append turns history off."""

    def __init__(self, path: Path) -> None:
        private_dir(path.parent)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE))
        os.chmod(path, PRIVATE_FILE)
        super().__init__(str(path))
        self.failure: str | None = None  # why history stopped being written, once

    def store_string(self, string: str) -> None:
        if self.failure is not None:
            return
        try:
            super().store_string(string)
        except OSError as e:
            self.failure = f"cannot write history to {self.filename}: {e.strerror or e}"


def open_history() -> tuple[History, str | None]:
    """The input history, or an in-memory one plus a warning when the folder is unusable."""
    path = history_path()
    try:
        return PrivateHistory(path), None
    except OSError as e:
        return InMemoryHistory(), (f"warning: cannot keep history in {path.parent} "
                                   f"({e.strerror or e}); going on without it")  # fmt: skip
