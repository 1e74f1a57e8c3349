"""What `qwen3 models` lists: every alias with the copies on disk, and converted folders.

Data only (no printing, no MLX): the CLI chooses how to show it (a table on a terminal,
plain untruncated lines when piped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.files import read_json
from qwen3_chat.hub.download import cached_repos, converted_dir
from qwen3_chat.hub.open import choose_default
from qwen3_chat.hub.registry import LOCAL_GENERATION, generation_rank, load_registry
from qwen3_chat.hub.state import converted_folders
from qwen3_chat.models.config import BITS, DEFAULT_BITS, QUANT_BITS


@dataclass(frozen=True)
class DiskCopy:
    bits: int  # 16 = the original weights
    path: Path
    size: int  # bytes on disk


@dataclass(frozen=True)
class ModelRow:
    alias: str  # what `-m` takes: an alias, or a converted folder's path
    kind: str  # "dense" | "moe" | "-" when unknown
    download_gb: float | None  # at DEFAULT_BITS, from models.toml
    capability: str  # thinking: "hybrid" | "always" | "never" | "-"
    context_length: int | None
    default: bool = False
    built_in: bool = False  # shipped with the package (the demo)
    converted_from: Path | None = None  # a `qwen3 convert` output: its source folder
    copies: list[DiskCopy] = field(default_factory=list)
    generation: str = LOCAL_GENERATION  # models.toml's, or "local" (demo, converted folders)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _converted_row(path: Path, info: dict) -> ModelRow:
    try:
        cfg = read_json(path / "config.json")
    except Qwen3ChatError:
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    bits = info.get("bits") if info.get("bits") in QUANT_BITS else DEFAULT_BITS
    source = info.get("source")
    return ModelRow(
        alias=str(path), kind="moe" if cfg.get("num_experts") else "dense", download_gb=None,
        capability="-", context_length=cfg.get("max_position_embeddings"),
        converted_from=Path(source) if isinstance(source, str) else None,
        copies=[DiskCopy(bits, path, folder_size(path))],
    )  # fmt: skip


def model_rows() -> list[ModelRow]:
    """Every registry alias (with its copies on disk), then the recorded converted folders
    that still exist. Raises the user models.toml's problem, if it has one."""
    registry = load_registry()
    registry.check()
    default = choose_default().name  # QWEN3_MODEL, the user's, or by this machine's memory
    cached = cached_repos()
    rows = []
    for alias, e in registry.entries.items():
        copies = []
        if e.local is not None:
            copies.append(DiskCopy(BITS[-1], e.local, folder_size(e.local)))
        for bits in BITS:
            repo = e.repo_for(bits)
            if repo is not None and repo in cached:
                path, size = cached[repo]
                copies.append(DiskCopy(bits, path, size))
            elif repo is None and (conv := converted_dir(e.repo, bits)).is_dir():
                copies.append(DiskCopy(bits, conv, folder_size(conv)))
        rows.append(ModelRow(
            alias=alias, kind=e.kind, download_gb=e.download_gb.get(DEFAULT_BITS),
            capability=e.capability, context_length=e.context_length,
            default=alias == default, built_in=e.local is not None, copies=copies,
            generation=e.generation,
        ))  # fmt: skip
    rows += [_converted_row(path, info) for path, info in converted_folders().items()]
    return rows


def by_generation(rows: list[ModelRow]) -> list[tuple[str, list[ModelRow]]]:
    """Rows grouped by generation, newest first, the local ones last; models.toml's order
    within a group."""
    groups: dict[str, list[ModelRow]] = {}
    for row in rows:
        groups.setdefault(row.generation, []).append(row)
    order = sorted(groups, key=lambda g: (g == LOCAL_GENERATION, [-x for x in generation_rank(g)]))
    return [(g, groups[g]) for g in order]
