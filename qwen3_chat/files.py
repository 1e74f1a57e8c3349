"""Reading JSON files with one clear error, and writing files atomically (no MLX here).

Every module that reads a config/state JSON file or writes one goes through these two
functions, so "what happens on a broken file" and "what an interrupted write leaves behind"
each have one answer: a `Qwen3ChatError` subclass naming the file, and either the old file
or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from qwen3_chat.errors import Qwen3ChatError


def read_json(
    path: str | Path, *, error: type[Qwen3ChatError] = Qwen3ChatError, what: str = "JSON"
) -> Any:
    """The parsed content of `path`, or `error` with one line saying what is wrong.

    `what` names the expected content in the message ("config", "saved conversation")."""
    path = Path(path).expanduser()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {what} file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid {what} ({e})") from None


def missing_folder(path: str | Path) -> Path | None:
    """The outermost folder above `path` that does not exist yet (writing would create it),
    or None: callers say they made it, so a typo in a folder name does not go unnoticed."""
    missing = [p for p in Path(path).expanduser().parents if not p.exists()]
    return missing[-1] if missing else None


def write_atomic(path: str | Path, data: bytes | str, *, mode: int = 0o644) -> Path:
    """Write `data` to `path` so a crash or Ctrl-C leaves the old file or the new one.

    A temp file in the same folder (so the rename never crosses filesystems) is written,
    fsynced, given `mode` (mkstemp's 0600 would otherwise stick) and renamed over `path`."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any, *, mode: int = 0o644, sort_keys: bool = False) -> Path:
    """`data` as indented UTF-8 JSON, written atomically (see `write_atomic`)."""
    text = json.dumps(data, ensure_ascii=False, indent=2, sort_keys=sort_keys) + "\n"
    return write_atomic(path, text, mode=mode)
