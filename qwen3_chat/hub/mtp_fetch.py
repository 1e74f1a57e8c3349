"""Fetching a hybrid model's MTP head (`mtp.*`) from its original repo by HTTP Range (issue 10).

MLX-community conversions of Qwen3-Next/3.5 drop the `mtp.*` tensors; the original repo
(`hub.mtp_origin`) still has them, inside shards of many GB. Only the head is fetched: the
shard index, each holding shard's 8-byte header length and JSON header, then the head's own
byte ranges (adjacent tensors in one request), through the Hub endpoint, token and session
`hub.fetch` uses (HF_ENDPOINT, HF_TOKEN). The tensors are written, dtype and shape as stored,
into ONE safetensors file in our state dir (`mtp/models--Owner--Name--<commit>.safetensors`,
written beside and renamed into place), and a small record links the model folder to it: the
HF snapshot is never modified, and the next load finds the head with no network.

What is checked, honestly: the Hub lists a sha256 per LFS file, and a sha256 covers the whole
file, so a byte range of a shard cannot be checked against it. The index is small and is
checked against its git blob id. Of the ranges, every header must parse and stay inside the
shard's listed size, every head tensor must be a float type whose byte count equals its
dtype x shape, every answer must be a 206 covering exactly the bytes asked for, and the file
written must add up to its own header. A shard served with the same length but other bytes
inside the head's range would not be noticed; TLS and the pinned commit are the defence there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_chat.errors import DownloadError, ModelLoadError, Qwen3ChatError, RepoNotFoundError
from qwen3_chat.files import read_json, write_json
from qwen3_chat.hub.fetch import RETRIES, RemoteFile, cached_repo, hasher, list_files
from qwen3_chat.hub.info import DTYPE_BYTES
from qwen3_chat.hub.state import state_dir
from qwen3_chat.weights.verify import INDEX_FILE, HeaderError, decode_header, read_header

MTP_PREFIX = "mtp."  # as models/qwen3_next.py keeps them (no MLX imported here)
HEAD_DTYPES = ("F32", "F16", "BF16")  # what the head is built from; FP8 repos need scales
SINGLE_FILE = "model.safetensors"


class HeadUnavailable(Qwen3ChatError):
    """No head can be fetched for this folder (original unknown, offline, or it has none)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the shard, end exclusive
    end: int


@dataclass(frozen=True)
class Shard:
    path: str
    tensors: tuple[Tensor, ...]  # by offset


@dataclass
class HeadPlan:
    """What fetching the head of `folder` takes; `ready` when it is on disk already."""

    folder: Path
    origin: str
    commit: str
    found_by: str  # where the origin was named, for messages
    shards: list[Shard] = field(default_factory=list)
    ready: Path | None = None

    @property
    def size(self) -> int:
        return sum(t.end - t.start for s in self.shards for t in s.tensors)


# -- where heads live ---------------------------------------------------------------------------
def heads_dir() -> Path:
    return state_dir() / "mtp"


def head_path(origin: str, commit: str) -> Path:
    return heads_dir() / f"models--{origin.replace('/', '--')}--{commit}.safetensors"


def _link_path(folder: Path) -> Path:
    """The record naming a folder's fetched head: by repo and commit for a cached snapshot
    (it outlives a moved HF cache), by its resolved path for any other folder."""
    folder = Path(folder).resolve()
    repo = cached_repo(folder)
    key = (f"models--{repo.replace('/', '--')}--{folder.name}" if repo else
           "dir-" + hashlib.sha256(str(folder).encode()).hexdigest()[:24])  # fmt: skip
    return heads_dir() / "links" / f"{key}.json"


def head_file(folder: Path) -> Path | None:
    """The head fetched for `folder` before, or None; no network."""
    try:
        record = read_json(_link_path(folder))
        path = heads_dir() / Path(record["file"]).name
        read_header(path)  # written whole by us; a damaged one is as good as none
    except (Qwen3ChatError, KeyError, TypeError, OSError):
        return None
    return path


def _link(folder: Path, path: Path, origin: str, commit: str) -> None:
    write_json(_link_path(folder), {"folder": str(Path(folder).resolve()), "origin": origin,
                                    "commit": commit, "file": path.name})  # fmt: skip


def forget_heads(repos: set[str], folders: list[Path]) -> list[str]:
    """After `qwen3 rm`: drop the records of these repos' snapshots and of these folders,
    then every fetched head no record names any more (heads are shared by the conversions
    of one original); returns the heads deleted."""
    links = heads_dir() / "links"
    if not links.is_dir():
        return []
    gone = {f"models--{r.replace('/', '--')}--" for r in repos}
    named = {_link_path(f).name for f in folders}
    for record in links.glob("*.json"):
        if record.name in named or record.name.startswith(tuple(gone)):
            record.unlink(missing_ok=True)
    kept = set()
    for record in links.glob("*.json"):
        try:
            kept.add(read_json(record)["file"])
        except (Qwen3ChatError, KeyError, TypeError):
            continue  # a damaged record names nothing
    removed = []
    for head in heads_dir().glob("*.safetensors"):
        if head.name not in kept:
            head.unlink(missing_ok=True)
            removed.append(str(head))
    return removed


def attach_head(model: Any, path: Path) -> int:
    """Add a fetched head's tensors to a hybrid model that has none (mx.load maps them
    lazily; models/mtp.py builds and quantizes the head from them); returns how many."""
    import mlx.core as mx

    if not hasattr(model, "mtp_weights") or model.mtp_weights:
        return 0
    try:
        tensors = mx.load(str(path))
    except Exception as e:  # MLX raises bare RuntimeError/ValueError for bad files
        raise ModelLoadError(f"{path}: cannot read the fetched MTP head ({e})") from None
    model.mtp_weights.update({k: v for k, v in tensors.items() if k.startswith(MTP_PREFIX)})
    return len(model.mtp_weights)


def folder_has_head(folder: Path) -> bool:
    """Whether a folder's own safetensors hold `mtp.*` tensors (headers only)."""
    from qwen3_chat.weights.verify import parse_header, shard_list

    try:
        files, wmap = shard_list(Path(folder))
        if wmap is not None:
            return any(k.startswith(MTP_PREFIX) for k in wmap)
        return any(k.startswith(MTP_PREFIX) for f in files for k in parse_header(f)[0])
    except HeaderError:
        return False


# -- the Hub, by byte range ---------------------------------------------------------------------
def _hub_failure(origin: str, e: Exception) -> Qwen3ChatError:
    """One line for a failed request to the original repo; an unreachable Hub is offline."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf.GatedRepoError) or status in (401, 403):
        return DownloadError(f"{origin} is gated or private: accept its license on the Hub "
                             "and set HF_TOKEN to fetch its MTP head")  # fmt: skip
    if isinstance(e, hf.RepositoryNotFoundError):
        return RepoNotFoundError(f"{origin} was not found on the Hugging Face Hub")
    if type(e).__name__ in ("ConnectError", "ConnectTimeout", "ConnectionError"):
        return HeadUnavailable(f"cannot reach the Hugging Face Hub to fetch it from {origin}")
    text = " ".join(str(e).split()) or type(e).__name__
    return DownloadError(f"fetching the MTP head of {origin} failed: {text}")


class _Ranges:
    """Byte ranges of one repo's files at one commit."""

    def __init__(self, origin: str, commit: str) -> None:
        from huggingface_hub import constants, get_session

        self.origin, self.commit = origin, commit
        self.client = get_session()
        self.timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT

    def chunks(self, rel: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) of `rel`; an answer cut short goes on from where it stopped,
        RETRIES times. A server that ignores Range is refused: that would be the whole shard."""
        from httpx2 import TransportError
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        url = hf_hub_url(self.origin, rel, revision=self.commit)
        pos = start
        for _ in range(RETRIES + 1):
            headers = {**build_hf_headers(), "Range": f"bytes={pos}-{end - 1}"}
            try:
                with self.client.stream("GET", url, headers=headers, follow_redirects=True,
                                        timeout=self.timeout) as r:  # fmt: skip
                    hf_raise_for_status(r)
                    if r.status_code != 206:
                        raise DownloadError(
                            f"{rel} of {self.origin}: the server ignored the byte range "
                            f"(HTTP {r.status_code}); not downloading the whole file"
                        )
                    for chunk in r.iter_bytes():
                        if pos + len(chunk) > end:
                            raise DownloadError(f"{rel} of {self.origin}: the server sent "
                                                "more bytes than were asked for")  # fmt: skip
                        pos += len(chunk)
                        yield chunk
            except TransportError:
                pass  # a dropped connection: ask again for the rest
            if pos == end:
                return
        raise DownloadError(f"{rel} of {self.origin}: bytes {start}-{end - 1} came back short "
                            f"({pos - start} of {end - start}), {RETRIES + 1} tries")  # fmt: skip

    def read(self, rel: str, start: int, end: int) -> bytes:
        return b"".join(self.chunks(rel, start, end))


def _index_map(ranges: _Ranges, index: RemoteFile) -> dict[str, str]:
    """The original's weight map (mtp key -> shard), its bytes checked against the Hub's id."""
    data = ranges.read(index.path, 0, index.size)
    h = hasher(index.lfs, index.size)
    h.update(data)
    if h.hexdigest() != index.hash:
        raise DownloadError(f"{INDEX_FILE} of {ranges.origin} does not match its hash")
    try:
        wmap = json.loads(data)["weight_map"]
        return {k: v for k, v in wmap.items() if k.startswith(MTP_PREFIX) and isinstance(v, str)}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DownloadError(f"{INDEX_FILE} of {ranges.origin}: no weight_map") from None


def _shard(ranges: _Ranges, f: RemoteFile, listed: set[str] | None) -> Shard:
    """The head's tensors in shard `f`, from its header (two small ranges)."""
    where = f"{f.path} of {ranges.origin}"
    try:
        header, data_start, _ = decode_header(lambda a, b: ranges.read(f.path, a, b), f.size,
                                              where)  # fmt: skip
    except HeaderError as e:
        raise DownloadError(str(e)) from None
    tensors = []
    for name, info in header.items():
        if name.startswith(MTP_PREFIX):
            tensors.append(_tensor(where, name, info, data_start, f.size))
    missing = sorted((listed or set()) - {t.name for t in tensors})
    if missing:
        raise DownloadError(f"{where}: the index lists {missing[0]} here, the header does not")
    return Shard(f.path, tuple(sorted(tensors, key=lambda t: t.start)))


def _tensor(where: str, name: str, info: Any, base: int, size: int) -> Tensor:
    """One header entry, checked: a float dtype, byte count = dtype x shape, inside the file."""
    try:
        dtype, shape, (a, b) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = all(isinstance(x, int) and x >= 0 for x in (*shape, a, b))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DownloadError(f"{where}: corrupt header entry for {name}")
    if dtype not in HEAD_DTYPES:
        raise DownloadError(f"{where}: {name} is {dtype}; the MTP head is read from "
                            f"{', '.join(HEAD_DTYPES)} tensors only")  # fmt: skip
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if b - a != need:
        raise DownloadError(f"{where}: {name} holds {b - a} bytes, its {dtype} shape "
                            f"{list(shape)} needs {need}")  # fmt: skip
    if base + b > size:
        raise DownloadError(f"{where}: {name} ends past the end of the file")
    return Tensor(name, dtype, shape, base + a, base + b)


def merge_ranges(tensors: tuple[Tensor, ...]) -> list[tuple[int, int]]:
    """[start, end) byte ranges covering `tensors` (sorted by offset): adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for t in tensors:
        if out and out[-1][1] == t.start:
            out[-1] = (out[-1][0], t.end)
        else:
            out.append((t.start, t.end))
    return out


def plan_head(folder: Path, name: str) -> HeadPlan:
    """Find the original of `folder`, its commit and where its `mtp.*` tensors lie (a few
    small requests). HeadUnavailable: offline, original unknown, or it has no head."""
    from huggingface_hub import constants

    from qwen3_chat.hub.mtp_origin import find_origin

    if constants.HF_HUB_OFFLINE:
        raise HeadUnavailable("the Hub is off (HF_HUB_OFFLINE) and no head was fetched before")
    try:
        found = find_origin(folder, name)
    except Exception as e:  # noqa: BLE001 - the cached snapshot's card, from the Hub
        raise _hub_failure(cached_repo(folder) or str(folder), e) from None
    if found.repo is None:
        raise HeadUnavailable(f"its original repo is not known: {found.why}")
    origin = found.repo
    try:
        commit, files = list_files(origin, None)
        plan = HeadPlan(Path(folder), origin, commit, found.why)
        if head_path(origin, commit).is_file():  # fetched for another variant of it
            plan.ready = head_path(origin, commit)
            return plan
        plan.shards = _locate(_Ranges(origin, commit), {f.path: f for f in files})
    except Qwen3ChatError:
        raise
    except Exception as e:  # noqa: BLE001 - HTTP client errors differ across hub versions
        raise _hub_failure(origin, e) from None
    if not plan.shards:
        raise HeadUnavailable(f"{origin} (named by {found.why}) has no mtp.* tensors either")
    return plan


def _locate(ranges: _Ranges, files: dict[str, RemoteFile]) -> list[Shard]:
    """The shards holding the head, safetensors only."""
    if INDEX_FILE in files:
        wmap = _index_map(ranges, files[INDEX_FILE])
        by_shard: dict[str, set[str]] = {}
        for key, shard in wmap.items():
            by_shard.setdefault(shard, set()).add(key)
        for shard in by_shard:
            if shard not in files or not shard.endswith(".safetensors"):
                raise DownloadError(f"{INDEX_FILE} of {ranges.origin} names {shard!r}, "
                                    "which is not a safetensors file of the repo")  # fmt: skip
        return [_shard(ranges, files[s], keys) for s, keys in sorted(by_shard.items())]
    if SINGLE_FILE in files:
        shard = _shard(ranges, files[SINGLE_FILE], None)
        return [shard] if shard.tensors else []
    # hub.fetch lists safetensors and JSON only: pickle weights (.bin) are never looked at.
    raise HeadUnavailable(f"{ranges.origin} has no safetensors weights")


def _header_bytes(plan: HeadPlan) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "origin": plan.origin,
                                               "commit": plan.commit}}  # fmt: skip
    offset = 0
    for shard in plan.shards:
        for t in shard.tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.end - t.start]}  # fmt: skip
            offset += t.end - t.start
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def fetch_head(plan: HeadPlan, *, progress: bool = False) -> Path:
    """Fetch the planned ranges into one safetensors file (written beside and renamed: never
    half a file), link `plan.folder` to it and return it. `progress` draws a bar on a terminal."""
    target = plan.ready
    if target is None:
        target = head_path(plan.origin, plan.commit)
        try:
            _write(plan, target, progress)
        except Qwen3ChatError:
            raise
        except OSError as e:
            raise DownloadError(f"{target}: cannot write ({e.strerror or e})") from None
        except Exception as e:  # noqa: BLE001 - HTTP client errors differ across hub versions
            raise _hub_failure(plan.origin, e) from None
    _link(plan.folder, target, plan.origin, plan.commit)
    return target


def _write(plan: HeadPlan, target: Path, progress: bool) -> None:
    from tqdm import tqdm

    ranges = _Ranges(plan.origin, plan.commit)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    bar = tqdm(total=plan.size, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               desc=f"{plan.origin} mtp", leave=False,
               disable=not (progress and sys.stderr.isatty()))  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_header_bytes(plan))
            for shard in plan.shards:
                for start, end in merge_ranges(shard.tensors):
                    for chunk in ranges.chunks(shard.path, start, end):
                        out.write(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        read_header(Path(tmp))  # the file adds up to its own header
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        bar.close()

