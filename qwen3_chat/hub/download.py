"""Finding and fetching models: aliases, repo ids and folders; verified Hub downloads.

Files come into the standard Hugging Face cache (HF_HOME, HF_HUB_CACHE, HF_TOKEN,
HF_HUB_OFFLINE, HF_ENDPOINT) through `hub.fetch`, which resumes partial files across runs and
hashes every file against the id the Hub lists it by. A snapshot is verified (hashes, config,
shard index, header shapes) before it is ever presented as a model, and the "verified"
marker is bound to the files it checked (`hub.state`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from qwen3_chat.errors import DownloadError, Qwen3ChatError, RepoNotFoundError
from qwen3_chat.hub.fetch import (
    ALLOW_PATTERNS,
    Progress,
    cached_repo,
    fetch_snapshot,
    hash_file,
    list_files,
    storage,
    tell,
)
from qwen3_chat.hub.mtp_fetch import forget_heads
from qwen3_chat.hub.registry import DEMO_ALIAS, ModelEntry, load_registry
from qwen3_chat.hub.state import (
    read_marker,
    remove_markers,
    stale_files,
    state_dir,
    write_marker,
)
from qwen3_chat.models.config import BITS, DEFAULT_BITS, ORIGINAL_BITS, QUANT_BITS, check_bits
from qwen3_chat.weights.verify import SHA256, verify_model_dir

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def validate_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise Qwen3ChatError(f"not a model alias, folder or Hugging Face repo id: {repo_id!r}")
    return repo_id


def converted_dir(repo_id: str, bits: int) -> Path:
    """Where an alias with no MLX repo at `bits` is quantized to locally."""
    return state_dir() / "converted" / f"{repo_id.replace('/', '--')}-{bits}bit"


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
        return RepoNotFoundError(f"{repo_id} was not found on the Hugging Face Hub")
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
    text = " ".join(str(error).split()) or type(error).__name__  # one line, always
    return DownloadError(f"download of {repo_id} failed: {text}")


def _local_snapshot(repo_id: str, revision: str | None) -> Path:
    """The cached snapshot for a repo (no network); raises huggingface_hub's not-cached error."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(ALLOW_PATTERNS),
                                  local_files_only=True))  # fmt: skip


def repair_hint(label: str) -> str:
    """What to run when a cached model is broken: remove it and fetch it again."""
    return f"run `qwen3 rm {label} && qwen3 download {label}`"


def cache_repair_hint(path: Path) -> str | None:
    """The repair hint for a folder that is a snapshot in the Hugging Face cache, else None."""
    repo_id = cached_repo(path)
    return repair_hint(repo_id) if repo_id else None


def _rehash(snapshot: Path, expected: dict[str, str], label: str, why: str) -> None:
    """Hash files of a cached snapshot (rel -> expected hash) with no network; a mismatch
    says `why` and how to repair it."""
    for rel, want in expected.items():
        try:
            got = hash_file(snapshot / rel, lfs=bool(SHA256.match(want)))
        except OSError:
            raise DownloadError(f"{rel} of {label} is missing from the cache; "
                                f"{repair_hint(label)}") from None  # fmt: skip
        if got != want:
            raise DownloadError(f"{rel} of {label} {why}; {repair_hint(label)}")


def _recheck(repo_id: str, snapshot: Path, label: str, status: Progress | None = None) -> bool:
    """Whether `snapshot` was verified; files changed since are re-hashed first (no network).

    The expected hash is the one the marker recorded (also the blob's name in the cache)."""
    stale = stale_files(snapshot)
    if stale is None:
        return False
    if stale:
        tell(status, "verify", f"re-hashing {len(stale)} changed files of {label}")
        _rehash(snapshot, stale, label, "changed on disk since it was verified")
        write_marker(repo_id, snapshot, _marked_hashes(snapshot))
    return True


def _marked_hashes(snapshot: Path) -> dict[str, str]:
    data = read_marker(snapshot)
    return {rel: info["hash"] for rel, info in data.items()} if data else {}


def download(
    repo_id: str, *, revision: str | None = None, progress: bool = True, label: str | None = None,
    status: Progress | None = None,
) -> Path:  # fmt: skip
    """Fetch (or resume) a repo into the HF cache, verify it, and return its snapshot.

    Every file is hashed against the id the Hub lists it by (sha256 for LFS files, the git
    blob sha1 for small ones). Progress bars appear only when stderr is a terminal.
    `label` is what the user typed (an alias), used in messages; `status` hears the stages
    (`fetch.Progress`: "download", and "verify" while files are hashed)."""
    from huggingface_hub import constants

    validate_repo_id(repo_id)
    label = label or repo_id
    if constants.HF_HUB_OFFLINE:
        try:
            path = _local_snapshot(repo_id, revision)
        except Exception as e:  # noqa: BLE001 - "not cached" comes in several shapes
            raise _hub_error(repo_id, e, label) from None
        if not _recheck(repo_id, path, label, status):  # cached by another tool: never checked
            tell(status, "verify", f"verifying {label}")
            hashes = _blob_hashes(path)
            _rehash(path, hashes, label, "does not match its hash")
            verify_model_dir(path)
            write_marker(repo_id, path, hashes)
        return path
    try:
        commit, files = list_files(repo_id, revision)
        snapshot = storage(repo_id) / "snapshots" / commit
        stale = stale_files(snapshot)
        trusted = set() if stale is None else {f.path for f in files} - set(stale)
        path = fetch_snapshot(repo_id, commit, files, revision=revision, verified=trusted,
                              progress=progress, status=status)  # fmt: skip
    except DownloadError:
        raise
    except Exception as e:  # noqa: BLE001 - HTTP client errors differ across hub versions
        raise _hub_error(repo_id, e, label) from None
    tell(status, "verify", f"verifying {label}")  # the config, shard index and header shapes
    verify_model_dir(path)
    write_marker(repo_id, path, {f.path: f.hash for f in files})
    return path


def _blob_hashes(snapshot: Path) -> dict[str, str]:
    """rel path -> hash for a cached snapshot, read from its links (blobs are named by hash)."""
    return {p.relative_to(snapshot).as_posix(): Path(os.readlink(p)).name
            for p in snapshot.rglob("*") if p.is_symlink()}  # fmt: skip


@dataclass(frozen=True)
class LocalModel:
    """A verified folder on disk and the bits of its weights (16 = the original)."""

    path: Path
    bits: int


def _variants(entry: ModelEntry, bits: int | None) -> list[int]:
    """Bits to look for on disk: the ones asked for, else the preferred bits first."""
    if bits is not None:
        return [bits]
    return [DEFAULT_BITS, *(b for b in BITS if b != DEFAULT_BITS)]


def _cached_snapshot(repo_id: str, label: str, status: Progress | None = None) -> Path | None:
    """The verified cached snapshot of `repo_id`, or None (changed files are re-hashed)."""
    try:
        path = _local_snapshot(repo_id, None)
    except Exception:  # noqa: BLE001 - "not cached" comes in several shapes
        return None
    return path if _recheck(repo_id, path, label, status) else None


def find_local(
    name: str, *, bits: int | None = None, status: Progress | None = None
) -> LocalModel | None:
    """The verified copy of `name` already on disk, or None; no network.

    With no `bits`, an alias uses whichever variant is on disk (the default bits first,
    then 8, then the original), so `download X --bits 8` then `chat -m X` fetches nothing."""
    if bits is not None:
        check_bits(bits)
    repo_id, local, entry = resolve(name, bits)
    if local is not None:
        return LocalModel(local, bits or ORIGINAL_BITS)
    if entry is None:
        path = _cached_snapshot(repo_id, name, status)
        return LocalModel(path, bits or DEFAULT_BITS) if path else None
    for b in _variants(entry, bits):
        label = name if bits is None else f"{name} --bits {b}"
        repo = entry.repo_for(b)
        if repo is not None:
            path = _cached_snapshot(repo, label, status)
        else:
            conv = converted_dir(entry.repo, b)
            path = conv if (conv / "config.json").is_file() else None
        if path is not None:
            return LocalModel(path, b)
    return None


def variant_note(name: str, found: LocalModel, bits: int | None) -> str | None:
    """What to tell the user when no --bits was given and a non-default copy is used."""
    if bits is not None or found.bits == DEFAULT_BITS:
        return None
    entry = resolve(name)[2]
    if entry is None or entry.local is not None:  # a folder, a repo id, the built-in demo
        return None
    kind = "original" if found.bits == ORIGINAL_BITS else f"{found.bits}-bit"
    return f"{name}: using the {kind} copy already on disk (--bits chooses another)"


def resolve_local(name: str, *, bits: int | None = None) -> Path | None:
    """The folder for `name` if it is already on disk and verified, else None."""
    found = find_local(name, bits=bits)
    return found.path if found else None


def ensure_model(
    name: str, *, bits: int | None = None, revision: str | None = None, progress: bool = True,
    status: Progress | None = None,
) -> Path:  # fmt: skip
    """A verified local folder for `name`, downloading (and converting) it if needed.

    `progress` draws the download bars (on a terminal); `status(stage, message)` hears the
    stages, "verify" included, so a caller can show a spinner while files are hashed."""
    if bits is not None:
        check_bits(bits)
    repo_id, local, entry = resolve(name, bits)
    if local is not None:
        return local
    try:
        found = find_local(name, bits=bits, status=status) if revision is None else None
    except DownloadError:  # a cached file changed: the download below re-hashes and repairs it
        found = None
    if found is not None:
        return found.path
    label = name if bits in (None, DEFAULT_BITS) else f"{name} --bits {bits}"
    if repo_id is not None:
        return download(repo_id, revision=revision, progress=progress, label=label,
                        status=status)  # fmt: skip
    # No published MLX repo at these bits: fetch the original and quantize it here.
    from qwen3_chat.weights.convert import convert

    bits = bits or DEFAULT_BITS
    src = download(entry.repo, revision=revision, progress=progress, label=label, status=status)
    return convert(src, converted_dir(entry.repo, bits), bits)


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
    """Delete a model's files from the cache, and what we knew about them (verified
    markers, partial downloads); returns what was removed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    if bits is not None:
        check_bits(bits)
    repo_id, local, entry = resolve(name, bits)
    if local is not None and entry is None:
        raise Qwen3ChatError(f"{name} is a folder of yours; delete it yourself if you mean to")
    if local is not None and name == DEMO_ALIAS:  # before: "demo is not downloaded"
        raise Qwen3ChatError(f"{name} is built in (it comes with qwen3-chat): nothing to remove")
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
    for target in targets:
        remove_markers(target)  # a marker must never vouch for a later download
        blobs = storage(target) / "blobs"
        for part in blobs.glob("*.incomplete") if blobs.is_dir() else []:
            part.unlink(missing_ok=True)
    folders = []
    if entry is not None:
        for b in QUANT_BITS:
            conv = converted_dir(entry.repo, b)
            if conv.exists() and (bits in (None, b)):
                shutil.rmtree(conv)
                removed.append(str(conv))
                folders.append(conv)
    if not removed:
        raise Qwen3ChatError(f"{name} is not downloaded")
    return removed + forget_heads(targets, folders)  # MTP heads fetched for these models
