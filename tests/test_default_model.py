"""With no -m: QWEN3_MODEL, the user's models.toml default, else a model chosen by memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwen3_chat.cli.app import app
from qwen3_chat.hub.open import choose_default, machine_memory, pick_by_memory
from qwen3_chat.hub.registry import ModelEntry, load_registry

GB = 10**9


def entry(alias: str, generation: str, gb: float, capability: str = "hybrid") -> ModelEntry:
    return ModelEntry(alias=alias, repo=f"q/{alias}", memory_gb={4: gb, 8: gb * 2},
                      capability=capability, generation=generation)  # fmt: skip


ENTRIES = [
    entry("old-small", "qwen3", 2), entry("old-big", "qwen3", 30),
    entry("next-big", "qwen3-next", 20, capability="never"),  # not a general chat model
    entry("mid-small", "qwen3.5", 4), entry("mid-big", "qwen3.5", 12),
    entry("new-big", "qwen3.8", 18),
]  # fmt: skip


@pytest.mark.parametrize(("memory_gb", "bits", "expected"), [
    (64, 4, "new-big"),  # the newest generation wins over a larger old model
    (32, 4, "new-big"),  # 18 GB <= 0.6 * 32
    (24, 4, "mid-big"),  # 18 > 14.4: the newest generation with one that fits, its largest
    (8, 4, "mid-small"),
    (4, 4, "old-small"),  # nothing of 3.5+ fits: an older generation
    (3, 4, None),  # nothing fits comfortably
    (48, 8, "mid-big"),  # at 8 bits new-big needs 36 GB > 0.6 * 48
])  # fmt: skip
def test_pick_by_memory(memory_gb, bits, expected):
    picked = pick_by_memory(ENTRIES, memory_gb * GB, bits)
    assert (picked and picked.alias) == expected


def test_the_shipped_registry_by_memory():
    assert choose_default(memory=8 * GB).name == "qwen3.5-4b"
    assert choose_default(memory=16 * GB).name == "qwen3.5-9b"
    big = choose_default(memory=32 * GB)
    assert big.name == "qwen3.8-27b"
    assert "32 GB" in big.why and "18 GB at 4-bit" in big.why  # which one and why
    tight = choose_default(memory=GB // 2)
    assert tight.name == load_registry().default and "no recommended model" in tight.why
    assert choose_default(memory=None).name  # an unknown memory size still gives a model


def test_qwen3_model_and_the_users_default_win(monkeypatch):
    monkeypatch.setenv("QWEN3_MODEL", "qwen3-0.6b")
    assert choose_default(memory=512 * GB).name == "qwen3-0.6b"
    assert choose_default(memory=512 * GB).why is None
    monkeypatch.delenv("QWEN3_MODEL")
    user = Path(os.environ["XDG_CONFIG_HOME"]) / "qwen3-chat" / "models.toml"
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text('default = "qwen3-1.7b"\n')
    assert choose_default(memory=512 * GB) == choose_default(memory=GB)
    assert choose_default(memory=GB).name == "qwen3-1.7b"


def test_machine_memory_is_a_plausible_size():
    assert machine_memory() > 256 * 2**20


def test_the_cli_says_which_model_and_why(capsys):
    from qwen3_chat.cli.models import default_model

    choice = choose_default()  # this machine's: the line must say what the choice says
    assert default_model(None) == choice.name
    assert capsys.readouterr().err == (f"using {choice.why}\n" if choice.why else "")
    r = CliRunner().invoke(app, ["models"])
    assert f"{choice.name} (default)" in r.stdout
