"""`qwen3 download`, `qwen3 models`, `qwen3 rm`, `qwen3 convert` (MLX is imported lazily)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from qwen3_chat.errors import Qwen3ChatError


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def download(
    model: str = typer.Argument(..., help="An alias from `qwen3 models` or a repo id."),
    bits: int = typer.Option(4, "--bits", help="4 or 8 (MLX quantized) or 16 (original)."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit."),
) -> None:
    """Download a model into the Hugging Face cache and verify it."""
    from qwen3_chat.hub import download as hub

    if bits not in (4, 8, 16):
        raise Qwen3ChatError(f"--bits must be 4, 8 or 16, not {bits}")
    if model.startswith((".", "/", "~")) or Path(model).expanduser().exists():
        raise Qwen3ChatError(f"{model} is a path: download takes an alias or a repo id")
    path = hub.ensure_model(model, bits=bits, revision=revision, progress=sys.stderr.isatty())
    typer.echo(f"{model}: ready at {path}", err=True)
    if not sys.stdout.isatty():
        typer.echo(str(path))


def models() -> None:
    """List the known models, their size and whether each is downloaded."""
    from rich.console import Console
    from rich.table import Table

    from qwen3_chat.hub import download as hub
    from qwen3_chat.hub.registry import load_registry

    registry = load_registry()
    cached = hub.cached_repos()
    table = Table(box=None, pad_edge=False)
    table.add_column("alias", no_wrap=True)
    for col in ("kind", "4-bit", "thinking", "context", "downloaded"):
        table.add_column(col)
    for alias, e in registry.entries.items():
        if e.local is not None:
            on_disk = f"built in ({_size(sum(p.stat().st_size for p in e.local.iterdir()))})"
        else:
            have = [(bits, cached[r]) for bits, r in sorted(e.mlx.items()) if r in cached]
            if e.repo in cached:
                have.append((16, cached[e.repo]))
            on_disk = ", ".join(f"{b}-bit {_size(size)} at {path}" for b, (path, size) in have)
        name = f"{alias} (default)" if alias == registry.default else alias
        gb = e.download_gb.get(4)
        table.add_row(name, e.kind, f"{gb:g} GB" if gb else "-", e.capability,
                      f"{e.context_length // 1024}K", on_disk or "-")  # fmt: skip
    Console(no_color=None, soft_wrap=True).print(table)


def rm(
    model: str = typer.Argument(..., help="An alias or repo id to delete from the cache."),
    bits: int | None = typer.Option(None, "--bits", help="Only this variant (4, 8 or 16)."),
) -> None:
    """Delete a downloaded model from the cache."""
    from qwen3_chat.hub import download as hub

    for what in hub.remove(model, bits=bits):
        typer.echo(f"removed {what}", err=True)


def convert(
    src: Path = typer.Argument(..., help="A local original (unquantized) Qwen3 folder."),
    bits: int = typer.Option(..., "--bits", help="4 or 8."),
    out: Path = typer.Option(..., "--out", help="The folder to create."),
) -> None:
    """Quantize an original checkpoint into an MLX-community-compatible folder."""
    from qwen3_chat.weights.convert import convert as run

    if not src.is_dir():
        raise Qwen3ChatError(f"{src}: not a model folder")
    path = run(src, out, bits)
    typer.echo(f"wrote {bits}-bit model to {path}", err=True)


def register(app: typer.Typer) -> None:
    app.command()(download)
    app.command()(models)
    app.command()(rm)
    app.command()(convert)
