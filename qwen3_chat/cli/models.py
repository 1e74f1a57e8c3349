"""`qwen3 download`, `qwen3 models`, `qwen3 rm`, `qwen3 convert` (MLX is imported lazily)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from qwen3_chat.cli.usage import BITS_HELP
from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.files import missing_folder
from qwen3_chat.models.config import DEFAULT_BITS, QUANT_BITS, check_bits


def human_size(n: float) -> str:
    """Bytes in the largest unit below 1024 of it (qwen3 models, /stats)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def default_model(bits: int | None) -> str:
    """The model when no -m is given; one stderr line says which and why when the machine's
    memory chose it."""
    from qwen3_chat.hub.open import choose_default

    choice = choose_default(DEFAULT_BITS if bits is None else bits)
    if choice.why:
        typer.echo(f"using {choice.why}", err=True)
    return choice.name


def download(
    model: str = typer.Argument(..., help="An alias from `qwen3 models` or a repo id."),
    bits: int = typer.Option(DEFAULT_BITS, "--bits", help=f"{BITS_HELP}."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit."),
    mtp: bool = typer.Option(False, "--mtp", help="Also fetch a Qwen3-Next/3.5 model's MTP "
                             "head (for --speculate mtp) from its original repo when the "
                             "folder lacks it, as MLX-community ones do."),
) -> None:
    """Download a model into the Hugging Face cache and verify it."""
    from qwen3_chat.hub import download as hub

    check_bits(bits, what="--bits")
    if model.startswith((".", "/", "~")) or Path(model).expanduser().exists():
        raise Qwen3ChatError(f"{model} is a path: download takes an alias or a repo id")
    from rich.console import Console

    from qwen3_chat.cli.progress import terminal_status

    with terminal_status(Console(stderr=True, highlight=False)) as status:  # hashing shows too
        path = hub.ensure_model(model, bits=bits, revision=revision,
                                progress=sys.stderr.isatty(), status=status)  # fmt: skip
    if mtp:  # before "ready": a head that cannot be had is then the one line said
        from qwen3_chat.cli.speculation import prefetch_mtp_head

        typer.echo(prefetch_mtp_head(Path(path), model), err=True)
    typer.echo(f"{model}: ready at {path}", err=True)
    if not sys.stdout.isatty():
        typer.echo(str(path))


def _on_disk(row: Any) -> str:
    if row.built_in:
        return f"built in ({human_size(row.copies[0].size)})"
    return ", ".join(f"{c.bits}-bit {human_size(c.size)} at {c.path}" for c in row.copies) or "-"


def models() -> None:
    """List the known models by generation (newest first), their size and whether each is
    downloaded."""
    from qwen3_chat.hub.inventory import by_generation, model_rows

    header = ("alias", "kind", f"{DEFAULT_BITS}-bit", "thinking", "context", "downloaded")
    groups = [(generation, [_columns(row) for row in rows])
              for generation, rows in by_generation(model_rows())]  # fmt: skip
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*header, box=None, pad_edge=False)
        for generation, lines in groups:
            table.add_row(generation, style="bold")
            for line in lines:
                table.add_row(*line)
        Console(soft_wrap=True).print(table)
        return
    # Piped: plain aligned columns, nothing cut to a terminal width (paths stay whole); each
    # group under a [generation] line, so every model row still starts with its alias.
    every = [header, *(line for _, lines in groups for line in lines)]
    widths = [max(len(r[i]) for r in every) for i in range(len(header))]

    def echo(r: tuple[str, ...]) -> None:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())

    echo(header)
    for generation, lines in groups:
        typer.echo(f"\n[{generation}]")
        for line in lines:
            echo(line)


def _columns(row: Any) -> tuple[str, ...]:
    name = f"{row.alias} (default)" if row.default else row.alias
    gb = f"{row.download_gb:g} GB" if row.download_gb else "-"
    context = f"{row.context_length // 1024}K" if row.context_length else "-"
    return (name, row.kind, gb, row.capability, context, _on_disk(row))


def rm(
    model: str = typer.Argument(..., help="An alias or repo id to delete from the cache."),
    bits: int | None = typer.Option(None, "--bits", help=f"Only this variant: {BITS_HELP}."),
) -> None:
    """Delete a downloaded model from the cache."""
    from qwen3_chat.hub import download as hub

    for what in hub.remove(model, bits=bits):
        typer.echo(f"removed {what}", err=True)


def convert(
    src: Path = typer.Argument(..., help="A local original (unquantized) Qwen3 folder."),
    bits: int = typer.Option(..., "--bits", help=f"One of {', '.join(map(str, QUANT_BITS))}."),
    out: Path = typer.Option(..., "--out", help="The folder to create."),
) -> None:
    """Quantize an original checkpoint into an MLX-community-compatible folder."""
    from qwen3_chat.weights.convert import convert as run

    if not src.is_dir():
        raise Qwen3ChatError(f"{src}: not a model folder")
    missing = missing_folder(out)  # made, as /save does, and said
    path = run(src, out, bits)
    made = f" (created the folder {missing})" if missing else ""
    typer.echo(f"wrote {bits}-bit model to {path}{made}", err=True)


def register(app: typer.Typer) -> None:
    app.command()(download)
    app.command()(models)
    app.command()(rm)
    app.command()(convert)
