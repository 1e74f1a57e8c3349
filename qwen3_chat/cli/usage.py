"""Command-line usage errors: one line on stderr and exit status 2, the same for every command."""

from __future__ import annotations

import typer

from qwen3_chat.errors import Qwen3ChatError


def usage_exit(message: str) -> typer.Exit:
    """Bad input on the command line: one line on stderr, exit status 2 (raise the result)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def check_bits_option(bits: int | None) -> None:
    """--bits: 4, 8 or 16 (the original weights), by models.config's one rule."""
    if bits is None:
        return
    from qwen3_chat.models.config import check_bits

    try:
        check_bits(bits, what="--bits")
    except Qwen3ChatError as e:
        raise usage_exit(str(e)) from None
