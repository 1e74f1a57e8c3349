"""Quantize an original checkpoint into an MLX-community-compatible folder."""

from __future__ import annotations

from pathlib import Path

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.files import read_json
from qwen3_chat.models import config_from_dict
from qwen3_chat.models.config import QUANT_BITS, check_bits

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "generation_config.json", "chat_template.jinja", "special_tokens_map.json",
)  # fmt: skip


def convert(src: str | Path, out: str | Path, bits: int) -> Path:
    """Load `src`, quantize to `bits`, and write config (with `quantization`), safetensors
    and tokenizer files to `out` atomically. The output is recorded so `qwen3 models`
    lists it while it exists."""
    from qwen3_chat.hub.state import record_converted
    from qwen3_chat.weights.loader import load_model, save_model

    src, out = Path(src), Path(out)
    check_bits(bits, QUANT_BITS)
    if not src.is_dir():
        raise ModelLoadError(f"{src}: not a model folder")
    # Checked before any weight is read: a missing, broken or quantized config fails fast.
    if config_from_dict(read_json(src / "config.json", error=ModelLoadError)).quantization:
        raise ModelLoadError(f"{src} is already quantized")
    model = load_model(src, bits=bits)
    extra = [src / name for name in TOKENIZER_FILES if (src / name).exists()]
    path = save_model(model, None, out, extra_files=extra)
    record_converted(path, src, bits)
    return path
