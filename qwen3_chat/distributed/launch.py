"""Starting the ranks of a hostfile: the followers as child processes (ssh for remote
hosts), rank 0 in this process, so the REPL keeps the user's terminal.

Each follower gets the environment mlx.launch would give it (MLX_RANK, MLX_HOSTFILE with the
ring's addresses, or the jaccl coordinator and RDMA devices). mlx.launch itself is not used
for the session: it pipes every rank's stdin/stdout through itself, so rank 0 would never
see a terminal (and piped stdin never reaches EOF). Commands are argument lists; only ssh's
remote command is a string, and every word of it is quoted.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwen3_chat.distributed.group import PipelineError
from qwen3_chat.distributed.hosts import Hostfile, model_digest

RING_PORT = 32323  # mlx.launch's default first port, for remote hosts
STOP_GRACE_S = 2.0


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def ring_addresses(hostfile: Hostfile) -> list[list[str]]:
    """One "ip:port" list per rank: free ports on this machine, RING_PORT+rank elsewhere."""
    taken: set[int] = set()
    out = []
    for rank, h in enumerate(hostfile.hosts):
        if not h.ips:
            raise PipelineError(f"hostfile: {h.ssh} needs \"ips\" for the ring backend")
        port = _free_port(taken) if h.is_local else RING_PORT + rank
        out.append([f"{h.ips[0]}:{port}"])
    return out


def backend_env(hostfile: Hostfile, backend: str, rank: int, files: Path) -> dict[str, str]:
    """What mlx.launch exports for `rank` (files are written under `files`)."""
    env = dict(e.split("=", 1) for e in hostfile.envs)
    env["MLX_RANK"] = str(rank)
    if backend == "ring":
        env["MLX_HOSTFILE"] = str(files / "ring.json")
    elif backend == "jaccl":
        first = hostfile.hosts[0]
        if not first.ips:
            raise PipelineError(f"hostfile: rank 0 ({first.ssh}) needs an IP for jaccl")
        env["MLX_JACCL_COORDINATOR"] = f"{first.ips[0]}:{RING_PORT}"
        env["MLX_IBV_DEVICES"] = str(files / "ibv.json")
    else:
        raise PipelineError(
            f"--backend {backend}: rank 0 must keep the terminal, which mpirun does not "
            "allow; use ring or jaccl"
        )
    return env


@dataclass
class Cluster:
    """Follower processes of one distributed session, and how to name the one at fault."""

    hostfile: Hostfile
    backend: str
    files: Path
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    timeout_note: str = ""

    @classmethod
    def start(cls, hostfile: Hostfile, backend: str, model: Path, *, bits: int | None,
              dtype: str, parallel: str = "pipeline") -> Cluster:  # fmt: skip
        files = Path(tempfile.mkdtemp(prefix="qwen3-dist-"))
        cluster = cls(hostfile, backend, files)
        try:
            if backend == "ring":
                (files / "ring.json").write_text(json.dumps(ring_addresses(hostfile)))
            elif backend == "jaccl":
                (files / "ibv.json").write_text(json.dumps([list(h.rdma) for h in hostfile.hosts]))
            worker = [sys.executable, "-m", "qwen3_chat.distributed.worker",
                      "--model", str(model), "--digest", model_digest(model),
                      "--dtype", dtype, "--backend", backend, "--parallel", parallel,
                      "--names", ",".join(hostfile.names)]  # fmt: skip
            if bits is not None:
                worker += ["--bits", str(bits)]
            for rank in range(1, len(hostfile.hosts)):
                cluster._spawn(rank, worker)
            os.environ.update(backend_env(hostfile, backend, 0, files))
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, rank: int, worker: list[str]) -> None:
        host = self.hostfile.hosts[rank]
        env = backend_env(self.hostfile, self.backend, rank, self.files)
        log = open(self.files / f"rank{rank}.log", "wb")  # noqa: SIM115 - the child keeps it
        if host.is_local:
            argv, child_env = worker, {**os.environ, **env}
        else:  # the remote side needs its own copy of the address file
            name = Path(env.get("MLX_HOSTFILE") or env["MLX_IBV_DEVICES"]).name
            key = "MLX_HOSTFILE" if "MLX_HOSTFILE" in env else "MLX_IBV_DEVICES"
            content = (self.files / name).read_text()
            env.pop(key)
            script = (f"f=$(mktemp) && printf %s {shlex.quote(content)} > \"$f\" && "
                      f"exec env {key}=\"$f\" {shlex.join(f'{k}={v}' for k, v in env.items())} "
                      f"{shlex.join(worker)}")  # fmt: skip
            ssh = shutil.which("ssh") or "ssh"
            argv, child_env = [ssh, "-o", "BatchMode=yes", "--", host.ssh, script], None
        # Own session: Ctrl-C in the terminal reaches rank 0 only, which stops the rest.
        self.procs[rank] = subprocess.Popen(
            argv, env=child_env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip
        log.close()

    def dead(self) -> list[int]:
        return [r for r, p in sorted(self.procs.items()) if p.poll() is not None]

    def last_line(self, rank: int) -> str:
        try:
            lines = (self.files / f"rank{rank}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        # The ring's own complaints about closed sockets say nothing about the cause.
        useful = [ln for ln in lines if ln.strip() and not ln.startswith("[ring]")]
        return useful[-1].strip() if useful else ""

    def describe(self, error: BaseException | None) -> str:
        """The one line rank 0 stops with: which host stopped or did not answer."""
        deadline = time.monotonic() + 1.0  # a killed rank takes a moment to be reaped
        while not self.dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        dead = self.dead()
        if dead:
            r = dead[0]
            code = self.procs[r].returncode
            why = self.last_line(r) or f"exit status {code}"
            return f"distributed: rank {r} on {self.hostfile.hosts[r].ssh} stopped ({why})"
        names = ", ".join(sorted(set(self.hostfile.names[1:])))
        if error is None:
            return f"distributed: no answer from the ranks on {names} in time; stopping"
        return f"distributed: lost contact with the ranks on {names} ({error}); stopping"

    def stop(self) -> None:
        """End every follower (those still running get SIGTERM, then SIGKILL)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
                p.send_signal(signal.SIGCONT)  # a stopped rank takes its SIGTERM at once
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.files, ignore_errors=True)
