"""The `qwen3` command line: thin over the library; the only package that prints."""

from qwen3_chat.cli.app import main

__all__ = ["main"]
