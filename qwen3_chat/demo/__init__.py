"""The tiny self-trained demo model shipped with qwen3-chat (`qwen3 chat -m demo`)."""

from __future__ import annotations

from pathlib import Path

# The committed Hugging Face-layout folder; regenerate with `python -m qwen3_chat.demo.train`.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"

__all__ = ["DEMO_MODEL_DIR"]
