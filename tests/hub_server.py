"""A local HTTP server speaking the part of the Hugging Face Hub protocol huggingface_hub uses:
revision info, the recursive tree, and `resolve` with HEAD/GET, ETag / X-Linked-Etag,
X-Repo-Commit and Range. Failure modes are switched on per test (drop, corrupt, gated, stall).
Every request is recorded as "METHOD /path" plus " Range: bytes=N-" (or "bytes=N-M") when one
was asked for."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    lfs_min: int = 1024  # files this big are "LFS": their ETag is the sha256
    drop_once: set[str] = field(default_factory=set)  # GET sends half, then hangs up
    corrupt: set[str] = field(default_factory=set)  # GET serves bytes not matching the ETag
    # GET of a full file sends this many bytes, then holds the connection open until the
    # server's `release` event (or shutdown): a transfer caught in the middle.
    stall: dict[str, int] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)  # listed in the tree, but resolve says 404
    short: set[str] = field(default_factory=set)  # a ranged GET gets half the bytes it asked for
    ignore_range: bool = False  # GET answers 200 with the whole file, whatever Range says

    def is_lfs(self, path: str) -> bool:
        return len(self.files[path]) >= self.lfs_min

    def etag(self, path: str) -> str:
        data = self.files[path]
        if self.is_lfs(path):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # a git blob id


def repo_from_folder(folder: Path, **kw) -> Repo:
    return Repo({p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()},
                **kw)  # fmt: skip


class Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.stalled = threading.Event()  # set once a stalled transfer has sent its bytes
        self.release = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Hub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


API = re.compile(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/?]+)(/[^?]*)?")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class Handler(BaseHTTPRequestHandler):
    server: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _json(self, code: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        elif repo.gated and "authorization" not in {k.lower() for k in self.headers}:
            self._json(401, {"error": "gated"}, {"X-Error-Code": "GatedRepo"})
            return None
        return repo

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        asked = self.headers.get("Range")
        self.server.requests.append(f"{self.command} {self.path}"
                                    + (f" Range: {asked}" if asked else ""))  # fmt: skip
        if m := API.match(self.path):
            repo = self._repo(m.group(1))
            if repo is None:
                return
            if m.group(2) == "revision":
                siblings = [{"rfilename": p} for p in repo.files]
                return self._json(200, {"id": m.group(1), "sha": repo.commit,
                                        "siblings": siblings, "private": False})  # fmt: skip
            tree = []
            for p, data in repo.files.items():
                entry = {"type": "file", "path": p, "size": len(data), "oid": repo.etag(p)}
                if repo.is_lfs(p):
                    entry["lfs"] = {"oid": repo.etag(p), "size": len(data), "pointerSize": 134}
                    entry["oid"] = hashlib.sha1(data).hexdigest()
                tree.append(entry)
            return self._json(200, tree)
        if m := RESOLVE.match(self.path):
            repo = self._repo(m.group(1))
            if repo is None:
                return
            path = m.group(3)
            if path not in repo.files or path in repo.gone:
                return self._json(404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound"})  # fmt: skip
            return self._serve_file(repo, path)
        self._json(404, {"error": "not found"})

    def _serve_file(self, repo: Repo, path: str) -> None:
        data = repo.files[path]
        etag = f'"{repo.etag(path)}"'
        headers = {"X-Repo-Commit": repo.commit, "ETag": etag, "Accept-Ranges": "bytes"}
        if repo.is_lfs(path):
            headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))}
        if self.command == "GET" and path in repo.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, stop = 0, len(data)
        r = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        ranged = self.command == "GET" and r is not None and not repo.ignore_range
        if ranged:  # "bytes=N-" (a resumed download) or "bytes=N-M" (M inclusive)
            start = int(r.group(1))
            stop = min(int(r.group(2)) + 1, len(data)) if r.group(2) else len(data)
            if path in repo.short:
                stop = start + (stop - start) // 2
        body = data[start:stop]
        self.send_response(206 if ranged else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if not start and path in repo.stall:
            self.wfile.write(body[: repo.stall[path]])
            self.wfile.flush()
            self.server.stalled.set()
            self.server.release.wait()
            self.close_connection = True
            return
        if path in repo.drop_once:
            repo.drop_once.discard(path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)
