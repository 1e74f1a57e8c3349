"""models.toml's `generation`: parsed, ordered newest first, and `qwen3 models` grouped by it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwen3_chat.cli.app import app
from qwen3_chat.errors import RegistryError
from qwen3_chat.hub.registry import generation_rank, load_registry


def user_toml(text: str) -> Path:
    path = Path(os.environ["XDG_CONFIG_HOME"]) / "qwen3-chat" / "models.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_generation_is_parsed_with_qwen3_as_the_default():
    r = load_registry()
    assert r.get("qwen3.6-35b-a3b").generation == "qwen3.6"
    assert r.get("qwen3-next-80b-a3b-instruct").generation == "qwen3-next"
    assert r.get("qwen3-8b").generation == "qwen3"  # no key in the file
    user_toml('[models.bad]\nrepo = "a/b"\ngeneration = "Qwen 4!"\n')
    with pytest.raises(RegistryError, match="models.bad: generation"):
        load_registry().get("bad")


def test_generations_order_newest_first():
    names = ["qwen3.5", "mine", "qwen3", "qwen3.8", "qwen3-next", "qwen3.6", "qwen4"]
    assert sorted(names, key=generation_rank, reverse=True) == [
        "qwen4", "qwen3.8", "qwen3.6", "qwen3.5", "qwen3-next", "qwen3", "mine"]  # fmt: skip


def test_models_piped_groups_by_generation_aligned():
    user_toml('[models.tiny-next]\nrepo = "me/tiny"\ngeneration = "qwen3.9"\n'
              '[models.plain]\nrepo = "me/plain"\n')  # fmt: skip
    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    heads = [line[1:-1] for line in lines if re.fullmatch(r"\[[a-z0-9.-]+\]", line)]
    assert heads == ["qwen3.9", "qwen3.8", "qwen3.6", "qwen3.5", "qwen3-next", "qwen3", "local"]

    def group(name: str) -> list[str]:
        start = lines.index(f"[{name}]") + 1
        end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
        return [line.split()[0] for line in lines[start:end]]

    assert group("qwen3.9") == ["tiny-next"]
    assert group("qwen3.6") == ["qwen3.6-27b", "qwen3.6-35b-a3b"]
    assert "plain" in group("qwen3") and "qwen3-8b" in group("qwen3")
    assert group("local") == ["demo"]
    rows = [line for line in lines if line and not line.startswith("[")]
    col = rows[0].index("kind")  # every row's second column starts under the header's
    assert all(row[col - 2 : col] == "  " and row[col] != " " for row in rows)
