"""The package layout is a contract: the library never imports the CLI, and the MLX-free
modules stay importable without MLX (so `qwen3 --help`, servers and tools start fast)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qwen3_chat"

# Modules that must never import MLX, directly or through what they import at module level.
MLX_FREE = [
    "qwen3_chat",
    "qwen3_chat.errors",
    "qwen3_chat.engine",
    "qwen3_chat.engine.events",
    "qwen3_chat.engine.budget",
    "qwen3_chat.engine.defaults",
    "qwen3_chat.engine.phase",
    "qwen3_chat.chat",
    "qwen3_chat.chat.tokenizer",
    "qwen3_chat.models",
    "qwen3_chat.models.config",
    "qwen3_chat.weights",
    "qwen3_chat.weights.verify",
    "qwen3_chat.hub",
    "qwen3_chat.hub.registry",
    "qwen3_chat.hub.download",
    "qwen3_chat.hub.open",
    "qwen3_chat.cli",
    "qwen3_chat.cli.app",
    "qwen3_chat.cli.render",
    "qwen3_chat.cli.repl",
]


def _imported_modules(path: Path) -> set[str]:
    """Every `qwen3_chat…` module a file imports, at any depth (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("qwen3_chat")}


def test_library_never_imports_the_cli():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).parts
        if rel[0] in ("cli", "__main__.py"):
            continue
        bad = sorted(m for m in _imported_modules(path) if m.startswith("qwen3_chat.cli"))
        if bad:
            offenders.append(f"{'/'.join(rel)} imports {bad}")
    assert not offenders, offenders


@pytest.mark.parametrize("module", MLX_FREE)
def test_mlx_free_modules_do_not_import_mlx(module):
    code = (f"import sys, {module}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{module} pulls in {out.stdout.strip()}"


def test_public_api_is_stable():
    import qwen3_chat

    for name in ("load", "ChatSession", "stream_generate", "SamplingParams"):
        assert callable(getattr(qwen3_chat, name)), name
