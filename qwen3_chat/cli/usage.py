"""Command-line usage errors: one line on stderr and exit status 2, the same for every command."""

from __future__ import annotations

import typer

from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.models.config import ORIGINAL_BITS, QUANT_BITS

# The help of every --bits option, from models.config's constants (one list of allowed bits).
BITS_HELP = (f"{' or '.join(map(str, QUANT_BITS))} (quantized) or {ORIGINAL_BITS} "
             "(the original weights)")  # fmt: skip


def usage_exit(message: str) -> typer.Exit:
    """Bad input on the command line: one line on stderr, exit status 2 (raise the result)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def check_bits_option(bits: int | None) -> None:
    """--bits, by models.config's one rule (BITS_HELP says which)."""
    if bits is None:
        return
    from qwen3_chat.models.config import check_bits

    try:
        check_bits(bits, what="--bits")
    except Qwen3ChatError as e:
        raise usage_exit(str(e)) from None
