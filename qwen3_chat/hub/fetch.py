"""Fetching a repo's files into the standard Hugging Face cache, resumably and verifiably.

huggingface_hub hashes nothing and throws a partial file away when a transfer stops, and
its worker pool keeps transferring for many seconds after Ctrl-C. Here each file streams
into `blobs/<hash>.incomplete` (kept across runs, continued with a `Range` request), is
hashed as it arrives (sha256 for LFS files, the git blob sha1 for small files: the ids the
Hub lists them by), and only then becomes the blob a snapshot links to. The cache layout is
huggingface_hub's, so its offline lookups and `scan_cache_dir` see these files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import queue
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3_chat.errors import DownloadError
from qwen3_chat.files import write_atomic

ALLOW_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "tokenizer*", "vocab.*", "merges.txt")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
CHUNK = 1024**2
WORKERS = 4
RETRIES = 5  # a dropped connection resumes from the last byte written, this many times


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the repo root
    size: int
    hash: str  # sha256 (LFS) or git blob sha1; also the blob's file name in the cache
    lfs: bool


def hasher(lfs: bool, size: int) -> Any:
    """A hash object that ends at the Hub's id for a file of `size` bytes."""
    if lfs:
        return hashlib.sha256()
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % size)  # git hashes a header before the content
    return h


def hash_file(path: Path, lfs: bool) -> str:
    h = hasher(lfs, path.stat().st_size)
    with path.open("rb") as f:
        while block := f.read(8 * CHUNK):
            h.update(block)
    return h.hexdigest()


def mismatch(rel: str, lfs: bool, expected: str, got: str) -> DownloadError:
    kind = "sha256" if lfs else "git blob sha1"
    return DownloadError(f"{rel}: {kind} mismatch (expected {expected[:12]}…, got {got[:12]}…); "
                         "the corrupted file was removed, run the download again")  # fmt: skip


def storage(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def cached_repo(path: Path) -> str | None:
    """"Owner/Name" when `path` is a snapshot folder in the Hugging Face cache, else None."""
    from huggingface_hub import constants

    try:
        rel = Path(path).resolve().relative_to(Path(constants.HF_HUB_CACHE).resolve())
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) == 3 and parts[0].startswith("models--") and parts[1] == "snapshots":
        return parts[0].removeprefix("models--").replace("--", "/", 1)
    return None


def list_files(repo_id: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
    """(commit, the files we fetch) for a repo at a revision, from the Hub's file tree."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    commit = revision if revision and COMMIT.match(revision) else None
    if commit is None:
        commit = api.model_info(repo_id, revision=revision or "main").sha
    files = []
    for f in api.list_repo_tree(repo_id, revision=commit, recursive=True):
        if not isinstance(f, RepoFile):
            continue
        if not any(fnmatch.fnmatch(f.path, p) for p in ALLOW_PATTERNS):
            continue
        if f.lfs is not None:
            files.append(RemoteFile(f.path, f.lfs.size, f.lfs.sha256, True))
        else:
            files.append(RemoteFile(f.path, f.size, f.blob_id, False))
    return commit, files


# progress(stage, message) hears about slow steps, so a caller can show them (the library never
# prints): "verify" while files are hashed or checked, "download" as bytes start to arrive
# (huggingface's bars follow on a terminal), "load" (hub.open) while weights are read.
Progress = Callable[[str, str], None]


def tell(status: Progress | None, stage: str, message: str) -> None:
    if status is not None:
        status(stage, message)


class _Stopped(Exception):
    """Another worker failed or the user pressed Ctrl-C: leave the partial file as it is."""


class _Fetcher:
    def __init__(self, repo_id: str, commit: str, progress: bool, total: int) -> None:
        from huggingface_hub import constants, get_session
        from tqdm import tqdm

        self.repo_id, self.commit = repo_id, commit
        self.root = storage(repo_id)
        self.locks = Path(constants.HF_HUB_CACHE) / ".locks" / self.root.name
        self.client = get_session()
        self.timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
        self.stop = threading.Event()
        self.lock = threading.Lock()
        # Bars only on a terminal: piped stderr carries messages, not carriage returns.
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=repo_id, file=sys.stderr, leave=False,
                        disable=not (progress and sys.stderr.isatty()))  # fmt: skip

    def advance(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)

    def blob(self, f: RemoteFile) -> Path:
        return self.root / "blobs" / f.hash

    def fetch(self, f: RemoteFile) -> None:
        from filelock import FileLock

        blob = self.blob(f)
        if blob.exists():
            return
        self.locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.locks / f"{f.hash}.lock")):  # another qwen3 may fetch it too
            if not blob.exists():
                self._fetch_locked(f, blob)

    def _fetch_locked(self, f: RemoteFile, blob: Path) -> None:
        from httpx2 import TransportError
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        part = blob.with_name(blob.name + ".incomplete")
        part.parent.mkdir(parents=True, exist_ok=True)
        h = hasher(f.lfs, f.size)
        offset = part.stat().st_size if part.exists() else 0
        if offset > f.size:
            part.unlink()
            offset = 0
        if offset:  # the bytes kept from an earlier run count toward the hash
            with part.open("rb") as done:
                while block := done.read(8 * CHUNK):
                    h.update(block)
            self.advance(offset)
        url = hf_hub_url(self.repo_id, f.path, revision=self.commit)
        for attempt in range(RETRIES + 1):
            if offset >= f.size:
                break
            headers = build_hf_headers()
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                with self.client.stream("GET", url, headers=headers, follow_redirects=True,
                                        timeout=self.timeout) as r:  # fmt: skip
                    hf_raise_for_status(r)
                    if offset and r.status_code != 206:  # the server ignored Range: restart
                        self.advance(-offset)
                        offset, h = 0, hasher(f.lfs, f.size)
                    # Unbuffered: what arrived is on disk even if the process is stopped.
                    with part.open("ab" if offset else "wb", buffering=0) as out:
                        for chunk in r.iter_bytes():  # as received: all of it reaches disk
                            if self.stop.is_set():
                                raise _Stopped
                            out.write(chunk)
                            h.update(chunk)
                            offset += len(chunk)
                            self.advance(len(chunk))
            except TransportError:
                if attempt == RETRIES or self.stop.is_set():
                    raise
        if offset != f.size:
            raise DownloadError(f"{f.path}: got {offset} bytes, the Hub lists {f.size}")
        got = h.hexdigest()
        if got != f.hash:
            part.unlink(missing_ok=True)
            raise mismatch(f.path, f.lfs, f.hash, got)
        os.replace(part, blob)

    def link(self, f: RemoteFile) -> None:
        """snapshots/<commit>/<path> -> ../../blobs/<hash>, as huggingface_hub lays it out."""
        link = self.root / "snapshots" / self.commit / f.path
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(self.blob(f), link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            return
        link.unlink(missing_ok=True)
        os.symlink(target, link)


def fetch_snapshot(
    repo_id: str, commit: str, files: list[RemoteFile], *, revision: str | None,
    verified: set[str], progress: bool, status: Progress | None = None,
) -> Path:  # fmt: skip
    """Hash what no marker vouches for, download what is missing or changed, link the snapshot.

    `verified` names files a marker vouches for (unchanged since they were hashed). On
    Ctrl-C the workers stop at their next chunk and KeyboardInterrupt propagates; partial
    files stay for the next run."""
    root = storage(repo_id)
    todo = []
    unvouched = [f for f in files if f.path not in verified and (root / "blobs" / f.hash).exists()]
    if unvouched:  # can be many GB (a cache another tool filled): say so before it starts
        tell(status, "verify", f"checking {len(unvouched)} files of {repo_id} already on disk")
    for f in files:
        blob = root / "blobs" / f.hash
        # A blob from before that no marker vouches for is hashed; a changed one is fetched again.
        if blob.exists() and f.path not in verified and hash_file(blob, f.lfs) != f.hash:
            blob.unlink()
        if not blob.exists():
            todo.append(f)
    total = sum(f.size for f in todo)
    if todo:
        tell(status, "download", f"downloading {repo_id}")
    fetcher = _Fetcher(repo_id, commit, progress, total)
    jobs: queue.Queue[RemoteFile] = queue.Queue()
    for f in sorted(todo, key=lambda f: -f.size):
        jobs.put(f)
    errors: list[BaseException] = []

    def work() -> None:
        while not fetcher.stop.is_set():
            try:
                f = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                fetcher.fetch(f)
            except _Stopped:
                return
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                errors.append(e)
                fetcher.stop.set()
                return

    # Daemon threads: a worker stuck in a stalled read must not keep the process alive
    # after Ctrl-C; its file is unbuffered, so nothing it received is lost.
    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(WORKERS, len(todo)))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.1)
    except KeyboardInterrupt:
        fetcher.stop.set()
        for t in threads:
            t.join(0.5)
        raise
    finally:
        fetcher.bar.close()
    if errors:
        raise errors[0]
    for f in files:
        fetcher.link(f)
    if not (revision and COMMIT.match(revision)):  # a branch or tag: remember where it points
        write_atomic(root / "refs" / (revision or "main"), commit)
    return root / "snapshots" / commit
