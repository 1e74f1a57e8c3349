"""A spinner on stderr while a model is fetched or loaded, so a multi-GB load never looks hung.

Only on a terminal: piped or redirected stderr gets nothing (progress is not output).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.status import Status


class LoadStatus:
    """The `progress(stage, message)` callback (hub.fetch.Progress) for open_model and
    ensure_model, drawn with rich: a spinner for "verify" (hashing) and "load", a plain line
    for "download" (whose bars follow)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._status: Status | None = None

    def __call__(self, stage: str, message: str) -> None:
        if stage == "download":
            # Hugging Face draws its own per-file bars; a spinner would fight them.
            self.stop()
            self.console.print(f"{message} …", style="dim", highlight=False)
            return
        if self._status is None:
            self._status = self.console.status(f"{message} …", spinner="dots")
            self._status.start()
        else:
            self._status.update(f"{message} …")

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


@contextmanager
def terminal_status(console: Console) -> Iterator[LoadStatus | None]:
    """A LoadStatus when stderr is a terminal (None otherwise), stopped on the way out."""
    if not sys.stderr.isatty():
        yield None
        return
    status = LoadStatus(console)
    try:
        yield status
    finally:
        status.stop()  # transient: the spinner line disappears once the step is done


def open_with_status(name: str, *, bits: int | None = None) -> Any:
    """hub.open.open_model with a spinner on stderr when stderr is a terminal."""
    from qwen3_chat.hub.open import open_model

    console = Console(stderr=True, highlight=False)
    with terminal_status(console) as status:
        loaded = open_model(name, bits=bits, progress=status)
    for note in loaded.notes:  # e.g. which variant on disk was used; stderr, never stdout
        console.print(f"note: {note}", style="dim", markup=False)
    return loaded
