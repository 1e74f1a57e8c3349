"""`qwen3 hosts check` and `qwen3 chat --hosts/--parallel/--backend`: one model over several
processes or Macs (qwen3_chat.distributed does the work; this module only talks)."""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import typer

from qwen3_chat import __version__
from qwen3_chat.cli.usage import BITS_HELP, check_bits_option, usage_exit
from qwen3_chat.distributed.hosts import BACKENDS, Host, Hostfile, model_digest, read_hostfile
from qwen3_chat.errors import Qwen3ChatError

PARALLEL = ("pipeline", "tensor", "auto")
PROBE_TIMEOUT_S = 20.0

HOSTS_HELP = "Run across the hosts of this mlx.launch hostfile (JSON) [see `qwen3 hosts check`]."
PARALLEL_HELP = "How to split the model over --hosts: pipeline (by layers), tensor or auto."
BACKEND_HELP = "mx.distributed backend for --hosts: ring (TCP/Thunderbolt), jaccl (RDMA) or mpi."


def _options(hosts: str | None, parallel: str | None, backend: str | None) -> tuple[str, str]:
    if hosts is None:
        if parallel or backend:
            raise usage_exit("--parallel and --backend need --hosts")
        return "", ""
    if parallel is not None and parallel not in PARALLEL:
        raise usage_exit(f"--parallel must be one of {', '.join(PARALLEL)}")
    if backend is not None and backend not in BACKENDS:
        raise usage_exit(f"--backend must be one of {', '.join(BACKENDS)}")
    return parallel or "auto", backend or ""


def refuse_model_switch(name: str, **_: Any) -> Any:
    """The REPL's /model across hosts: a new model would load on this machine only."""
    raise Qwen3ChatError(f"/model is not available with --hosts: quit and run "
                         f"qwen3 chat -m {name} --hosts FILE to use {name} across the hosts")


def open_chat_model(name: str, *, bits: int | None, hosts: str | None = None,
                    parallel: str | None = None, backend: str | None = None) -> Any:  # fmt: skip
    """The LoadedModel `qwen3 chat` talks to: local, or spread over the hostfile's hosts."""
    parallel, backend = _options(hosts, parallel, backend)
    from qwen3_chat.cli.progress import open_with_status

    if hosts is None:
        return open_with_status(name, bits=bits)
    hostfile = read_hostfile(hosts)
    from qwen3_chat.chat.tokenizer import Tokenizer
    from qwen3_chat.distributed.connect import open_distributed
    from qwen3_chat.hub.open import (
        LoadedModel,
        _load_bits,
        guess_capability,
        locate,
        registry_entry,
    )

    path, variant = locate(name, bits=bits)
    if variant:
        typer.echo(f"note: {variant}", err=True)
    quantize, loaded_bits = _load_bits(path, name, bits)
    _quiet_ring_noise()
    dist = open_distributed(hostfile, backend or hostfile.backend or "ring", path, bits=quantize,
                            parallel=parallel)  # fmt: skip
    atexit.register(dist.close)
    if dist.note:
        typer.echo(f"note: {dist.note}", err=True)

    restore_terminal = _terminal_restorer()

    def stop(line: str) -> None:
        # A rank died or hung: say which, end the others, and leave now (a hung step
        # holds a thread inside MLX that a normal exit would wait for), leaving the
        # terminal as we found it (the REPL turns echo off while it generates).
        restore_terminal()
        typer.echo(f"error: {line}", err=True)
        sys.stderr.flush()
        dist.cluster.stop()
        os._exit(1)

    dist.model.on_fault = stop
    tokenizer = Tokenizer.from_dir(path)
    entry = registry_entry(name)
    return LoadedModel(
        name=name, path=path, model=dist.model, tokenizer=tokenizer,
        capability=entry.capability if entry is not None else guess_capability(tokenizer),
        context_length=entry.context_length if entry is not None else None,
        mode_sampling=(entry.sampling or None) if entry is not None else None,
        bits=loaded_bits,
    )  # fmt: skip


def _terminal_restorer() -> Any:
    """A function that puts the terminal back as it is now (mode, cursor shown)."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, OSError, ValueError):
        saved = None

    def restore() -> None:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[?25h\n")  # a live panel may have hidden the cursor
            sys.stdout.flush()

    return restore


def _quiet_ring_noise() -> None:
    """MLX's ring backend writes a line per failed socket call to fd 2 when a peer goes;
    keep those off the user's screen (our own one-line error says what happened)."""
    try:
        original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        return
    sys.stderr.flush()
    sys.stderr = open(original, "w", buffering=1, closefd=False)  # noqa: SIM115 - for good

    def relay() -> None:
        with open(read_end, "rb") as src:
            for line in src:
                if not line.startswith(b"[ring]"):
                    os.write(original, line)

    threading.Thread(target=relay, daemon=True, name="qwen3-stderr").start()


# -- qwen3 hosts check ---------------------------------------------------------------------
hosts_app = typer.Typer(help="Hosts for running one model across several Macs.",
                        no_args_is_help=True)  # fmt: skip


def _probe(host: Host, path: Path) -> tuple[dict[str, str] | None, str]:
    cmd = [sys.executable, "-m", "qwen3_chat.distributed.hosts", str(path)]
    if not host.is_local:  # ssh takes one remote command string: every word quoted
        ssh = shutil.which("ssh") or "ssh"
        cmd = [ssh, "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "--", host.ssh,
               shlex.join(cmd)]  # fmt: skip
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"unreachable ({e})"
    if run.returncode != 0:
        lines = (run.stderr or run.stdout).strip().splitlines()
        return None, f"unreachable or no qwen3-chat ({lines[-1] if lines else run.returncode})"
    try:
        return json.loads(run.stdout), ""
    except ValueError:
        return None, "qwen3-chat did not answer (is it installed there?)"


def check_hosts(hostfile: Hostfile, path: Path) -> list[tuple[str, bool, str]]:
    """(host, ok, what) per rank: reachable, same version, same model (config/index sha256)."""
    want = model_digest(path)
    rows = []
    for rank, host in enumerate(hostfile.hosts):
        info, problem = _probe(host, path)
        if info is not None:
            if info.get("version") != __version__:
                problem = f"qwen3-chat {info.get('version')} (here {__version__})"
            elif not info.get("digest"):
                problem = f"model missing at {path}"
            elif info["digest"] != want:
                problem = f"model at {path} differs (config/index sha256)"
        rows.append((f"rank {rank} {host.ssh}", not problem,
                     problem or f"qwen3-chat {__version__}, model ok"))  # fmt: skip
    return rows


@hosts_app.command("check")
def check(
    hostfile: str = typer.Argument(..., help="mlx.launch hostfile (JSON)."),
    model_name: str | None = typer.Option(None, "--model", "-m", metavar="NAME|PATH",
                                          help="Model every host must have [env: QWEN3_MODEL]."),
    bits: int | None = typer.Option(None, "--bits", help=f"{BITS_HELP}."),
) -> None:
    """Check every host: reachable, the same qwen3-chat version, the same model folder."""
    check_bits_option(bits)
    from qwen3_chat.cli.models import default_model
    from qwen3_chat.hub.download import resolve_local

    hosts = read_hostfile(hostfile)
    name = model_name or default_model(bits)
    found = resolve_local(name, bits=bits)
    if found is None:
        raise Qwen3ChatError(f"{name} is not on this machine: `qwen3 download {name}` first")
    rows = check_hosts(hosts, Path(found))
    for who, ok, what in rows:
        typer.echo(f"{'ok ' if ok else 'MISSING'} {who}: {what}")
    bad = [who for who, ok, _ in rows if not ok]
    if bad:
        typer.echo(f"error: {len(bad)} of {len(rows)} hosts not ready", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(hosts_app, name="hosts")
