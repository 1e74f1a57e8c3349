"""Hostfiles (mlx.launch's JSON format) and the checks made before any rank loads weights.

MLX-free, so `qwen3 hosts check` answers fast. A hostfile is either a list of hosts or
{"backend": ..., "envs": [...], "hosts": [...]}, each host {"ssh": NAME, "ips": [IP, ...]}.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qwen3_chat.errors import Qwen3ChatError

BACKENDS = ("ring", "jaccl", "mpi")
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
# What a ssh host name may look like: user@host, a DNS name or an address; never an option.
_SSH_NAME = re.compile(r"^(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9][A-Za-z0-9.:_-]*$")


class HostfileError(Qwen3ChatError):
    """A hostfile that cannot be used, with the reason."""


@dataclass(frozen=True)
class Host:
    ssh: str
    ips: tuple[str, ...]
    rdma: tuple[str | None, ...] = ()

    @property
    def is_local(self) -> bool:
        return self.ssh in LOCAL_NAMES


@dataclass
class Hostfile:
    hosts: list[Host]
    backend: str = ""
    envs: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [h.ssh for h in self.hosts]


def _host(i: int, raw: object, where: str) -> Host:
    if not isinstance(raw, dict) or not isinstance(raw.get("ssh"), str):
        raise HostfileError(f"{where}: host {i} needs an \"ssh\" name")
    name = raw["ssh"]
    if not _SSH_NAME.match(name):
        raise HostfileError(f"{where}: host {i}: {name!r} is not a host name")
    ips = raw.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(a, str) for a in ips):
        raise HostfileError(f"{where}: host {i}: \"ips\" must be a list of addresses")
    for a in ips:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise HostfileError(f"{where}: host {i}: {a!r} is not an IP address") from None
    if not ips and name in LOCAL_NAMES:
        ips = ["127.0.0.1"]
    rdma = raw.get("rdma", [])
    if not isinstance(rdma, list):
        raise HostfileError(f"{where}: host {i}: \"rdma\" must be a list")
    return Host(name, tuple(ips), tuple(rdma))


def read_hostfile(path: str | Path) -> Hostfile:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise HostfileError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise HostfileError(f"{path}: not JSON ({e})") from None
    backend, envs = "", []
    if isinstance(data, dict):
        backend, envs, data = data.get("backend", ""), data.get("envs", []), data.get("hosts")
    if not isinstance(data, list) or not data:
        raise HostfileError(f"{path}: needs a non-empty list of hosts")
    if backend and backend not in BACKENDS:
        raise HostfileError(f"{path}: backend must be one of {', '.join(BACKENDS)}")
    if not isinstance(envs, list) or not all(isinstance(e, str) and "=" in e for e in envs):
        raise HostfileError(f"{path}: \"envs\" must be a list of NAME=VALUE strings")
    return Hostfile([_host(i, h, str(path)) for i, h in enumerate(data)], backend, envs)


def model_digest(path: str | Path) -> str:
    """sha256 over config.json and the shard index (or the single weights file's size):
    equal on two hosts means the same model folder, without hashing gigabytes."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        f = path / name
        try:
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
        except FileNotFoundError:
            if name == "config.json":
                return ""
        except OSError:
            return ""
    single = path / "model.safetensors"
    if single.is_file():
        h.update(f"model.safetensors:{single.stat().st_size}".encode())
    return h.hexdigest()


def probe(path: str) -> dict[str, str]:
    """What `qwen3 hosts check` asks every host: its qwen3-chat version and model digest."""
    from qwen3_chat import __version__

    return {"version": __version__, "digest": model_digest(path)}


if __name__ == "__main__":  # python -m qwen3_chat.distributed.hosts MODEL_DIR
    import sys

    print(json.dumps(probe(sys.argv[1])))
