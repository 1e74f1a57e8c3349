"""What qwen3-chat remembers about models on disk (no MLX): verified markers, converted folders.

A "verified" marker says a snapshot's files passed their hash and shape checks. It is bound
to what it checked: each file's size and mtime, and the hash it must have, so a file that
changed since (a corrupted re-download, a hand edit) is re-hashed before it is trusted again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.files import read_json, write_json


def state_dir() -> Path:
    """$XDG_CACHE_HOME/qwen3-chat (default ~/.cache/qwen3-chat)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen3-chat"


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except Qwen3ChatError:
        return None  # a missing or broken state file is the same as none: start again


# -- verified markers ------------------------------------------------------------------------
def marker_path(snapshot: Path) -> Path:
    """models--Owner--Name/snapshots/<commit> -> verified/models--Owner--Name--<commit>.json"""
    return state_dir() / "verified" / f"{snapshot.parent.parent.name}--{snapshot.name}.json"


def _stamp(path: Path) -> list[int]:
    st = path.stat()  # follows the cache's symlink to the blob: that is what changes
    return [st.st_size, st.st_mtime_ns]


def write_marker(repo_id: str, snapshot: Path, hashes: dict[str, str]) -> None:
    """Record that every file in `hashes` (relative path -> expected hash) checked out."""
    files = {rel: {"hash": h, "stamp": _stamp(snapshot / rel)} for rel, h in hashes.items()}
    write_json(marker_path(snapshot), {"repo": repo_id, "snapshot": str(snapshot), "files": files})


def read_marker(snapshot: Path) -> dict[str, Any] | None:
    """rel path -> {"hash", "stamp"} as verified; None if never verified (or unreadable)."""
    data = _read(marker_path(snapshot))
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else None


def stale_files(snapshot: Path) -> dict[str, str] | None:
    """Files changed since the snapshot was verified (rel -> expected hash); None if never
    verified (or the marker is unreadable), {} when everything is as it was checked."""
    files = read_marker(snapshot)
    if files is None:
        return None
    stale: dict[str, str] = {}
    for rel, info in files.items():
        try:
            same = _stamp(snapshot / rel) == info["stamp"]
        except (OSError, KeyError, TypeError):
            same = False
        if not same:
            stale[rel] = info.get("hash", "") if isinstance(info, dict) else ""
    return stale


def remove_markers(repo_id: str) -> None:
    """Forget every verified snapshot of `repo_id` (after its files were deleted)."""
    prefix = "models--" + repo_id.replace("/", "--") + "--"
    folder = state_dir() / "verified"
    for f in folder.glob("*.json") if folder.is_dir() else []:
        if f.name.startswith(prefix) and "--" not in f.name[len(prefix) :]:
            f.unlink(missing_ok=True)


# -- converted folders -------------------------------------------------------------------------
def _converted_file() -> Path:
    return state_dir() / "converted.json"


def record_converted(out: Path, src: Path, bits: int) -> None:
    """Remember a `qwen3 convert` output so `qwen3 models` can list it."""
    data = _read(_converted_file())
    entries = data if isinstance(data, dict) else {}
    entries[str(Path(out).resolve())] = {"source": str(Path(src).resolve()), "bits": bits}
    write_json(_converted_file(), entries)


def converted_folders() -> dict[Path, dict[str, Any]]:
    """Converted folders that still exist (path -> {"source", "bits"}), oldest first."""
    data = _read(_converted_file())
    if not isinstance(data, dict):
        return {}
    return {
        Path(p): info
        for p, info in data.items()
        if isinstance(info, dict) and (Path(p) / "config.json").is_file()
    }
