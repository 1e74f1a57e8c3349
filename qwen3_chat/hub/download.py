"""Finding and fetching models: aliases, repo ids and folders; verified Hub downloads.

Downloads go through huggingface_hub's `snapshot_download` (the standard cache, HF_HOME,
HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT, resumable transfers). It does not
check content hashes, so every large file is hashed against the Hub's ETag here, and the
folder is verified before it is ever presented as a model.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

from qwen3_chat.errors import DownloadError, Qwen3ChatError
from qwen3_chat.hub.registry import DEMO_ALIAS, ModelEntry, load_registry
from qwen3_chat.weights.verify import SHA256, sha256_of, verify_model_dir

ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "vocab.*", "merges.txt"]
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
DEFAULT_BITS = 4


def validate_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise Qwen3ChatError(f"not a model alias, folder or Hugging Face repo id: {repo_id!r}")
    return repo_id


def _state_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen3-chat"


def converted_dir(repo_id: str, bits: int) -> Path:
    return _state_dir() / "converted" / f"{repo_id.replace('/', '--')}-{bits}bit"


Resolved = tuple[str | None, Path | None, ModelEntry | None]


def resolve(name: str, bits: int | None = None) -> Resolved:
    """(repo id to fetch, local folder, registry entry) for an alias, folder or repo id."""
    local = Path(name).expanduser()
    if local.is_dir():
        return None, local, None
    registry = load_registry()
    entry = registry.get(name)
    if entry is not None:
        if entry.local is not None:
            return None, entry.local, entry
        return entry.repo_for(bits or DEFAULT_BITS), None, entry
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise Qwen3ChatError(f"model folder not found: {name}")
    if "/" not in name:
        aliases = ", ".join(a for a in sorted(registry.entries) if a != DEMO_ALIAS)
        raise Qwen3ChatError(f"unknown model {name!r}; known aliases: {aliases}, demo")
    return validate_repo_id(name), None, None


def _hub_error(repo_id: str, error: Exception, label: str | None = None) -> DownloadError:
    from huggingface_hub import errors as hf

    if isinstance(error, hf.GatedRepoError) or getattr(
        getattr(error, "response", None), "status_code", None
    ) in (401, 403):
        return DownloadError(
            f"{repo_id} is gated or private: accept its license on the Hub and set HF_TOKEN"
        )
    if isinstance(error, hf.RepositoryNotFoundError):
        return DownloadError(f"{repo_id} was not found on the Hugging Face Hub")
    if isinstance(error, hf.RevisionNotFoundError):
        return DownloadError(f"{repo_id}: no such revision")
    if isinstance(error, hf.LocalEntryNotFoundError | hf.OfflineModeIsEnabled):
        return DownloadError(
            f"{repo_id} is not downloaded and the Hub cannot be reached; "
            f"run `qwen3 download {label or repo_id}` while online "
            "(offline, `qwen3 chat -m demo` runs the built-in model)"
        )
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return DownloadError(f"disk full while downloading {repo_id}; free space and retry")
    if type(error).__name__ in ("ConnectError", "ConnectTimeout", "ConnectionError"):
        return DownloadError(f"cannot reach the Hugging Face Hub to download {repo_id}")
    return DownloadError(f"download of {repo_id} failed: {error}")


def _verified_marker(snapshot: Path) -> Path:
    return _state_dir() / "verified" / f"{snapshot.parent.parent.name}--{snapshot.name}.json"


def _check_hashes(repo_id: str, snapshot: Path, revision: str) -> None:
    """sha256 of every LFS file against the Hub's X-Linked-Etag; bad blobs are deleted."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    for f in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        rel = f.relative_to(snapshot).as_posix()
        meta = get_hf_file_metadata(hf_hub_url(repo_id, rel, revision=revision))
        expected = (meta.etag or "").strip('"')
        if not SHA256.match(expected):
            continue  # small git-stored files carry a git blob id, not a sha256
        got = sha256_of(f)
        if got != expected:
            blob = f.resolve()
            f.unlink()
            blob.unlink(missing_ok=True)
            raise DownloadError(
                f"{rel}: sha256 mismatch (expected {expected[:12]}…, got {got[:12]}…); "
                "the corrupted file was removed, run the download again"
            )


def download(
    repo_id: str, *, revision: str | None = None, progress: bool = True, label: str | None = None
) -> Path:
    """Fetch (or resume) a repo into the HF cache, verify it, and return its snapshot.

    `label` is what the user typed (an alias), used in messages."""
    from huggingface_hub import constants, snapshot_download

    validate_repo_id(repo_id)
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 - HTTP client errors differ across hub versions
        raise _hub_error(repo_id, e, label) from None
    marker = _verified_marker(path)
    if not marker.exists():
        if not constants.HF_HUB_OFFLINE:
            try:
                _check_hashes(repo_id, path, path.name)
            except DownloadError:
                raise
            except Exception as e:  # noqa: BLE001
                raise _hub_error(repo_id, e) from None
        verify_model_dir(path)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"repo": repo_id, "snapshot": str(path)}))
    return path


def resolve_local(name: str, *, bits: int | None = None) -> Path | None:
    """The folder for `name` if it is already on disk and verified, else None."""
    repo_id, local, entry = resolve(name, bits)
    if local is not None:
        return local
    if repo_id is None:
        conv = converted_dir(entry.repo, bits or DEFAULT_BITS)
        return conv if (conv / "config.json").exists() else None
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS,
                                      local_files_only=True))  # fmt: skip
    except Exception:  # noqa: BLE001 - "not cached" comes in several shapes
        return None
    return path if _verified_marker(path).exists() else None


def ensure_model(
    name: str, *, bits: int | None = None, revision: str | None = None, progress: bool = True
) -> Path:
    """A verified local folder for `name`, downloading (and converting) it if needed."""
    if bits not in (None, 4, 8, 16):
        raise Qwen3ChatError(f"bits must be 4, 8 or 16, not {bits}")
    repo_id, local, entry = resolve(name, bits)
    if local is not None:
        return local
    if revision is None and (found := resolve_local(name, bits=bits)) is not None:
        return found
    label = name if bits in (None, DEFAULT_BITS) else f"{name} --bits {bits}"
    if repo_id is not None:
        return download(repo_id, revision=revision, progress=progress, label=label)
    # No published MLX repo at these bits: fetch the original and quantize it here.
    from qwen3_chat.weights.convert import convert

    src = download(entry.repo, revision=revision, progress=progress, label=label)
    return convert(src, converted_dir(entry.repo, bits or DEFAULT_BITS), bits or DEFAULT_BITS)


def cached_repos() -> dict[str, tuple[Path, int]]:
    """repo id -> (latest snapshot folder, bytes on disk) for models in the HF cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return {}
    out = {}
    for repo in info.repos:
        if repo.repo_type == "model" and repo.revisions:
            latest = max(repo.revisions, key=lambda r: r.last_modified)
            out[repo.repo_id] = (Path(latest.snapshot_path), repo.size_on_disk)
    return out


def remove(name: str, *, bits: int | None = None) -> list[str]:
    """Delete a model's files from the cache; returns what was removed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    repo_id, local, entry = resolve(name, bits)
    if local is not None and entry is None:
        raise Qwen3ChatError(f"{name} is a folder of yours; delete it yourself if you mean to")
    targets = {repo_id} if repo_id else set()
    if entry is not None and bits is None:  # every variant of an alias
        targets |= {entry.repo, *entry.mlx.values()}
    removed = []
    try:
        info = scan_cache_dir()
    except CacheNotFound:
        info = None
    for repo in info.repos if info else []:
        if repo.repo_id in targets:
            info.delete_revisions(*(r.commit_hash for r in repo.revisions)).execute()
            removed.append(repo.repo_id)
    if entry is not None:
        import shutil

        for b in (4, 8):
            conv = converted_dir(entry.repo, b)
            if conv.exists() and (bits in (None, b)):
                shutil.rmtree(conv)
                removed.append(str(conv))
    if not removed:
        raise Qwen3ChatError(f"{name} is not downloaded")
    return removed
