"""`qwen3 show MODEL`: architecture, thinking, context, quantization, size and memory needed."""

from __future__ import annotations

import json

import typer

from qwen3_chat.cli.models import human_size as size
from qwen3_chat.cli.usage import BITS_HELP, check_bits_option, usage_exit
from qwen3_chat.errors import Qwen3ChatError


def _count(n: int) -> str:
    """Parameters the way model cards say them: 596M, 4.0B, 30.5B."""
    if n >= 10**9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.1f}M" if n < 10**8 else f"{n / 1e6:.0f}M"


def _lines(info) -> list[tuple[str, str]]:
    rows = [("model", info.name), ("path", info.path),
            ("architecture", f"{info.architecture} ({info.kind})"),
            ("layers", str(info.layers)),
            ("hidden size", f"{info.hidden_size} · FFN {info.ffn_size}"
             + (" per expert" if info.experts else "")),
            ("attention", f"{info.attention_heads} query heads, {info.kv_heads} key/value heads, "
                          f"head dim {info.head_dim}")]  # fmt: skip
    if info.experts:
        rows.append(("experts", f"{info.experts}, {info.experts_per_token} active per token"))
    q = info.quantization
    params = _count(info.parameters)
    if info.active_parameters != info.parameters:
        params += f" ({_count(info.active_parameters)} active per token)"
    rows += [("vocabulary", f"{info.vocab_size:,} tokens"),
             ("thinking", info.capability),
             ("context", f"{info.context_length:,} tokens"),
             ("quantization", f"{q['bits']}-bit, group size {q['group_size']}" if q
              else f"none ({info.stored_dtype or 'float'} weights)"),
             ("parameters", params),
             ("on disk", size(info.disk_bytes)),
             ("memory", f"~{size(info.memory_bytes)}: weights {size(info.weights_bytes)} + KV "
                        f"cache {size(info.kv_cache_bytes)} at {info.context_length:,} tokens "
                        f"({info.compute_dtype})")]  # fmt: skip
    return rows


def _check_folder_bits(model: str, path, bits: int | None) -> None:
    """A folder (demo, a path, a local registry entry) has the bits it was saved with; other
    --bits would describe weights that are not there, so they are refused, not ignored."""
    from qwen3_chat.hub.download import resolve
    from qwen3_chat.hub.open import read_config, stored_bits
    from qwen3_chat.models.config import ORIGINAL_BITS

    if bits is None or resolve(model, bits)[1] is None:  # not a folder: bits chose the variant
        return
    have = stored_bits(read_config(path))
    if bits != (have or ORIGINAL_BITS):
        what = f"{have}-bit" if have else "unquantized"
        raise usage_exit(f"--bits {bits} does not apply: {model} is a folder of {what} weights, "
                         f"shown as it is (`qwen3 chat -m {model} --bits {bits}` quantizes it "
                         "as it loads)")  # fmt: skip


def show(
    model: str = typer.Argument(..., help="An alias, a downloaded repo id, or a folder."),
    bits: int | None = typer.Option(None, "--bits", help=f"Which downloaded variant: {BITS_HELP}."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object."),
) -> None:
    """Describe a model without loading it: architecture, thinking, context, size, memory."""
    from qwen3_chat.hub import download as hub
    from qwen3_chat.hub.info import describe

    check_bits_option(bits)
    path = hub.resolve_local(model, bits=bits)
    if path is None:
        from qwen3_chat.hub.open import registry_entry
        from qwen3_chat.models.config import DEFAULT_BITS

        entry = registry_entry(model)
        gb = entry.download_gb.get(bits or DEFAULT_BITS) if entry is not None else None
        size_note = f" (about {gb:g} GB)" if gb else ""
        flag = f" --bits {bits}" if bits else ""
        raise Qwen3ChatError(f"{model} is not downloaded; `qwen3 download {model}{flag}` "
                             f"fetches it{size_note}")  # fmt: skip
    _check_folder_bits(model, path, bits)
    info = describe(model, path)
    if as_json:
        typer.echo(json.dumps(info.to_dict(), ensure_ascii=False))
        return
    rows = _lines(info)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def register(app: typer.Typer) -> None:
    app.command()(show)
