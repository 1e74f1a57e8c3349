"""The package layout is a contract: the library never imports the CLI, and the MLX-free
modules stay importable without MLX (so `qwen3 --help`, servers and tools start fast)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "qwen3_chat"

# Modules that must never import MLX at import time: whole packages (the CLI, the hub) plus
# the MLX-free parts of the others (events, configs, template, schemas...).
MLX_FREE_PACKAGES = ["cli", "hub"]
MLX_FREE = [
    "qwen3_chat",
    "qwen3_chat.errors",
    "qwen3_chat.files",
    "qwen3_chat.engine",
    "qwen3_chat.engine.events",
    "qwen3_chat.engine.budget",
    "qwen3_chat.engine.defaults",
    "qwen3_chat.engine.phase",
    "qwen3_chat.chat",
    "qwen3_chat.chat.tokenizer",
    "qwen3_chat.models",
    "qwen3_chat.models.config",
    "qwen3_chat.models.hybrid_config",
    "qwen3_chat.weights",
    "qwen3_chat.weights.verify",
    "qwen3_chat.serve",
    "qwen3_chat.serve.schema",
    "qwen3_chat.serve.tools",
    "qwen3_chat.distributed",
    "qwen3_chat.distributed.hosts",
]


def _package_modules(package: str) -> list[str]:
    parts = (path.relative_to(PKG).with_suffix("").parts for path in (PKG / package).rglob("*.py"))
    return sorted(".".join(("qwen3_chat", *p)).removesuffix(".__init__") for p in parts)


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


def test_mlx_free_modules_do_not_import_mlx():
    """One interpreter imports them one by one and names the first that pulls MLX in."""
    modules = MLX_FREE + [m for p in MLX_FREE_PACKAGES for m in _package_modules(p)]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    if any(m.split('.')[0] in ('mlx', 'mlx_lm') for m in sys.modules):\n"
        "        print(name); break\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{out.stdout.strip()} pulls in MLX"
    assert len(modules) > 30  # the package walk found the CLI and hub modules


def test_public_api_is_stable():
    import qwen3_chat

    for name in ("load", "ChatSession", "stream_generate", "SamplingParams"):
        assert callable(getattr(qwen3_chat, name)), name
