"""qwen3-chat: Qwen3 on MLX. The library never prints.

Heavy modules (MLX) are imported lazily so that `qwen3 --help` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "qwen3_chat.weights.loader",
    "ModelConfig": "qwen3_chat.models.config",
    "Tokenizer": "qwen3_chat.chat.tokenizer",
    "stream_generate": "qwen3_chat.engine.generate",
    "SamplingParams": "qwen3_chat.engine.sampling",
    "ChatSession": "qwen3_chat.chat.session",
    "ModelLoadError": "qwen3_chat.errors",
    "Qwen3ChatError": "qwen3_chat.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen3_chat' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
