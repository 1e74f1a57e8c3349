"""Shared fixtures: the real Qwen3 tokenizer folder and tiny random checkpoints."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

SHARED_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "qwen3-tokenizer"


def pytest_configure(config) -> None:
    # Started as a background job of a non-interactive shell, pytest inherits SIGINT ignored
    # and so would every CLI it spawns: the Ctrl-C tests would test the shell, not us.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _tokenizer_dir() -> Path:
    return Path(os.environ.get("QWEN3_TOKENIZER_DIR", SHARED_TOKENIZER))


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files (../shared/qwen3-tokenizer); skip when absent."""
    path = _tokenizer_dir()
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"real Qwen3 tokenizer files not found at {path} (set QWEN3_TOKENIZER_DIR)")
    return path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep tests away from the user's real config, history and Hugging Face cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("QWEN3_MODEL", raising=False)


@pytest.fixture(scope="session")
def tiny(qwen3_tokenizer_dir, tmp_path_factory):
    """(model, tokenizer): a tiny random Qwen3 with the real 151,936-token vocabulary.

    Shared by the whole run (it is read-only); it never stops on its own reliably, so tests
    bound their generations."""
    from checkpoints import make_checkpoint, tiny_config

    from qwen3_chat import load

    cfg = tiny_config(vocab_size=151936, tie_word_embeddings=True)
    path = make_checkpoint(tmp_path_factory.mktemp("tiny"), cfg, tokenizer_dir=qwen3_tokenizer_dir)
    return load(path)
