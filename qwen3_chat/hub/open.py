"""Opening a model by name: alias, Hugging Face repo id or folder -> a loaded, described model.

The CLI (`qwen3 chat`, the REPL's /model) and servers share this one path, so a model is
resolved, fetched, loaded and described the same way everywhere. MLX is imported only when
weights are actually loaded, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3_chat.engine.defaults import ALWAYS, HYBRID, NEVER
from qwen3_chat.errors import ModelLoadError, Qwen3ChatError
from qwen3_chat.files import read_json
from qwen3_chat.hub.fetch import Progress  # (stage, message): "verify", "download", "load"
from qwen3_chat.hub.registry import ModelEntry, generation_rank, load_registry
from qwen3_chat.models.config import DEFAULT_BITS, ORIGINAL_BITS, check_bits

# The share of the machine's memory a default model may need: the rest is for the KV cache,
# the system and other apps (macOS lets the GPU wire about 70% of it).
COMFORTABLE_SHARE = 0.6


@dataclass
class LoadedModel:
    """A model ready to chat with, and what the UI needs to know about it."""

    name: str  # as the user gave it (alias, repo id or folder)
    path: Path
    model: Any  # models.qwen3.Model (typed loosely: no MLX import here)
    tokenizer: Any  # chat.tokenizer.Tokenizer
    capability: str = HYBRID  # one of engine.defaults.CAPABILITIES
    context_length: int | None = None  # None: the model's max_position_embeddings
    mode_sampling: dict[str, dict[str, float]] | None = None  # per mode, from models.toml
    bits: int = ORIGINAL_BITS  # quantization of the weights in memory; 16 = unquantized
    notes: tuple[str, ...] = ()  # one-line remarks for the user (variant used, parts skipped)


@dataclass(frozen=True)
class DefaultChoice:
    name: str
    why: str | None = None  # set when chosen by memory: the UI says which model and why


def default_model_name() -> str:
    return choose_default().name


def choose_default(bits: int = DEFAULT_BITS, memory: int | None = None) -> DefaultChoice:
    """QWEN3_MODEL, else the user's models.toml default, else the model that suits this
    machine's memory (`memory` bytes; measured when None), else models.toml's default."""
    named = os.environ.get("QWEN3_MODEL", "").strip()
    if named:
        return DefaultChoice(named)
    registry = load_registry()
    memory = machine_memory() if memory is None else memory
    if registry.default_explicit or memory is None:
        return DefaultChoice(registry.default)
    entry = pick_by_memory(registry.entries.values(), memory, bits)
    if entry is None:
        return DefaultChoice(registry.default, f"{registry.default}: no recommended model fits "
                             f"comfortably in {memory / 1e9:.0f} GB of memory")  # fmt: skip
    return DefaultChoice(entry.alias, (
        f"{entry.alias}: the largest of the newest models that fits comfortably in "
        f"{memory / 1e9:.0f} GB of memory (needs about {entry.memory_gb[bits]:g} GB at "
        f"{bits}-bit; -m NAME or QWEN3_MODEL picks another)"))  # fmt: skip


def recommended(entry: ModelEntry, bits: int) -> bool:
    """A general chat model to default to: thinks or not on request (not an Instruct/Thinking
    or Coder variant), with a known memory need at these bits, and downloadable."""
    return entry.capability == HYBRID and entry.local is None and bits in entry.memory_gb


def pick_by_memory(entries: Iterable[ModelEntry], memory: int, bits: int = DEFAULT_BITS
                   ) -> ModelEntry | None:  # fmt: skip
    """Newest generation first, the largest recommended model needing at most
    COMFORTABLE_SHARE of `memory` bytes; None when none fits."""
    fits = [e for e in entries if recommended(e, bits)
            and e.memory_gb[bits] * 1e9 <= COMFORTABLE_SHARE * memory]  # fmt: skip
    return max(fits, key=lambda e: (generation_rank(e.generation), e.memory_gb[bits]),
               default=None)  # fmt: skip


def machine_memory() -> int | None:
    """Physical memory in bytes (Linux: sysconf; macOS: sysctl hw.memsize); None if unknown."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True,
                                 text=True, timeout=5, check=True).stdout  # fmt: skip
            return int(out.strip())
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return None


def registry_entry(name: str) -> ModelEntry | None:
    """The models.toml entry for an alias (None for a repo id or a folder)."""
    if Path(name).expanduser().is_dir():
        return None  # a folder of the user's wins over an alias of the same name
    return load_registry().get(name)


def read_config(path: Path) -> dict[str, Any]:
    """A folder's config.json as a dict; {} when absent or unreadable (the loader says why)."""
    try:
        data = read_json(Path(path) / "config.json")
    except Qwen3ChatError:
        return {}
    return data if isinstance(data, dict) else {}


def stored_bits(config: dict[str, Any]) -> int | None:
    """The bits of a pre-quantized folder (MLX `quantization` block), None when unquantized."""
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and isinstance(quant.get("bits"), int):
        return quant["bits"]
    return None


def guess_capability(tokenizer: Any) -> str:
    """Thinking capability from the chat template, for models that models.toml does not list.

    A template that ignores `enable_thinking` cannot toggle: it either always opens a
    `<think>` block (Thinking-2507) or never does (Instruct-2507)."""
    probe = [{"role": "user", "content": "x"}]
    on = tokenizer.apply_chat_template(probe, enable_thinking=True)
    off = tokenizer.apply_chat_template(probe, enable_thinking=False)
    if on != off:
        return HYBRID
    return ALWAYS if on.rstrip().endswith("<think>") else NEVER


def locate(
    name: str, *, bits: int | None = None, progress: Progress | None = None
) -> tuple[Path, str | None]:
    """A verified local folder for `name`, downloading (or converting) it when needed, and
    the note to show when no --bits was given and a non-default copy on disk is used."""
    from qwen3_chat.hub import download as hub

    found = hub.find_local(name, bits=bits, status=progress)
    if found is not None:
        return Path(found.path), hub.variant_note(name, found, bits)
    # The download says "download" when bytes start to arrive and "verify" while it hashes.
    return Path(hub.ensure_model(name, bits=bits, progress=progress is not None,
                                 status=progress)), None  # fmt: skip


def _load_bits(path: Path, name: str, bits: int | None) -> tuple[int | None, int]:
    """(bits to quantize to on load, bits of the result) for a folder and the bits asked."""
    have = stored_bits(read_config(path))
    if have is None:  # original weights: 4/8 quantize on load, 16 or nothing keeps them
        return (bits if bits not in (None, ORIGINAL_BITS) else None,
                bits or ORIGINAL_BITS)  # fmt: skip
    if bits is not None and bits != have:
        raise ModelLoadError(f"{name} is already quantized to {have} bits; "
                             f"it cannot be loaded at {bits} (drop --bits)")  # fmt: skip
    return None, have


def open_model(name: str, *, bits: int | None = None,
               progress: Progress | None = None) -> LoadedModel:  # fmt: skip
    """Resolve, fetch if needed, and load `name` with its tokenizer.

    `bits` is 4 or 8 (quantized) or 16 (original weights); a local original folder is
    quantized on load. `progress(stage, message)` hears about slow steps; the library
    itself never prints."""
    if bits is not None:
        check_bits(bits)
    path, variant = locate(name, bits=bits, progress=progress)
    quantize, loaded_bits = _load_bits(path, name, bits)
    if progress is not None:
        progress("load", f"loading {name}")
    from qwen3_chat.weights.loader import load

    model, tokenizer = load(path, bits=quantize)
    entry = registry_entry(name)
    capability = entry.capability if entry is not None else guess_capability(tokenizer)
    return LoadedModel(
        name=name, path=path, model=model, tokenizer=tokenizer, capability=capability,
        context_length=entry.context_length if entry is not None else None,
        mode_sampling=(entry.sampling or None) if entry is not None else None,
        bits=loaded_bits,
        notes=tuple(n for n in (variant, *getattr(model, "load_notes", ())) if n),
    )  # fmt: skip
