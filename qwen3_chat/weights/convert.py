"""Quantize an original checkpoint into an MLX-community-compatible folder."""

from __future__ import annotations

import json
from pathlib import Path

from qwen3_chat.errors import Qwen3ChatError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "generation_config.json", "chat_template.jinja", "special_tokens_map.json",
)  # fmt: skip


def convert(src: str | Path, out: str | Path, bits: int) -> Path:
    """Load `src`, quantize to `bits`, and write config (with `quantization`), safetensors
    and tokenizer files to `out` atomically."""
    from qwen3_chat.weights.loader import load_model, save_model

    src, out = Path(src), Path(out)
    if bits not in (4, 8):
        raise Qwen3ChatError(f"bits must be 4 or 8, not {bits}")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization"):
        raise Qwen3ChatError(f"{src} is already quantized")
    model = load_model(src, bits=bits)
    extra = [src / name for name in TOKENIZER_FILES if (src / name).exists()]
    return save_model(model, config, out, extra_files=extra)
