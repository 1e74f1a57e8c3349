"""`qwen3 chat --hosts` and `qwen3 hosts check` on loopback: real processes, real ring.

The hostfile lists 127.0.0.1 several times; rank 0 is the qwen3 process itself and starts
the followers. Faults are real: a follower is killed or stopped mid-generation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from checkpoints import make_checkpoint, tiny_config
from pty_term import PLAIN_TEMPLATE

QWEN3 = [sys.executable, "-m", "qwen3_chat"]


def hostfile(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"hosts{n}.json"
    path.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * n}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    # Untied and seeded so greedy decoding gives varied tokens (a tiny tied model repeats one).
    cfg = tiny_config(moe=True, num_hidden_layers=3, vocab_size=151936)
    return make_checkpoint(tmp_path_factory.mktemp("moe"), cfg, seed=1,
                           tokenizer_dir=qwen3_tokenizer_dir)  # fmt: skip


@pytest.fixture(scope="module")
def one_process(model_dir) -> dict:
    """The --json answer of one process, the reference for every distributed run."""
    run = chat(model_dir)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def workers_of(model: Path) -> list[int]:
    """Follower processes still running on `model` (their command line names it)."""
    out = subprocess.run(["pgrep", "-f", f"distributed.worker --model {model}"],
                         capture_output=True, text=True)  # fmt: skip
    return [int(p) for p in out.stdout.split()]


def followers(pid: int) -> list[int]:
    """The follower processes qwen3 (pid) started, in rank order."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(k) for k in kids)


def chat(model: Path, *extra: str, budget: str = "--no-budget",
         timeout: float = 60) -> subprocess.CompletedProcess:  # fmt: skip
    cmd = [*QWEN3, "chat", "-m", str(model), "--temp", "0", budget, "--max-tokens", "12",
           "--json", "Hello there", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.parametrize(("ranks", "parallel", "note"), [
    (2, "auto", ""),  # auto over TCP (ring): pipeline
    (2, "tensor", ""),
    (3, "tensor", "note: tensor parallel is not possible (attention heads (4) do not divide "
                  "by 3 ranks); using pipeline"),
])  # fmt: skip
def test_chat_across_ranks_answers_like_one_process(tmp_path, model_dir, one_process, ranks,
                                                    parallel, note):  # fmt: skip
    many = chat(model_dir, "--hosts", str(hostfile(tmp_path, ranks)), "--parallel", parallel)
    assert many.returncode == 0, many.stderr
    a, b = one_process, json.loads(many.stdout)
    assert b["answer"] == a["answer"] and b["usage"] == a["usage"]
    assert len(set(a["answer"].split())) > 3
    assert many.stderr.strip() == note
    assert workers_of(model_dir) == []  # every follower ended with rank 0


def _start_stream(model: Path, hosts: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [*QWEN3, "chat", "-m", str(model), "--temp", "0", "--no-budget", "--max-tokens",
           "100000", "--jsonl", "Tell me a long story", "--hosts", str(hosts)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env={**os.environ, **env})  # fmt: skip


@pytest.mark.parametrize(("sig", "expect"), [
    (signal.SIGKILL, "distributed: rank 1 on 127.0.0.1 stopped"),
    (signal.SIGSTOP, "distributed: no answer from the ranks on 127.0.0.1 in time"),
])  # fmt: skip
def test_a_rank_that_dies_or_hangs_stops_rank_0_with_one_line(tmp_path, model_dir, sig, expect):
    proc = _start_stream(model_dir, hostfile(tmp_path, 3), {"QWEN3_DIST_TIMEOUT": "2"})
    try:
        assert proc.stdout.readline()  # generating: the first event arrived
        victim = followers(proc.pid)[0]
        os.kill(victim, sig)
        t0 = time.monotonic()
        proc.wait(timeout=20)
        elapsed = time.monotonic() - t0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        if sig == signal.SIGSTOP and victim in workers_of(model_dir):  # rank 0 ends it
            os.kill(victim, signal.SIGKILL)
    assert proc.returncode == 1
    assert elapsed < 10
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expect}"), err
    assert workers_of(model_dir) == []  # rank 0 ended the others, the hung one included


def test_ctrl_c_on_rank_0_stops_every_rank(tmp_path, model_dir):
    proc = _start_stream(model_dir, hostfile(tmp_path, 2), {})
    try:
        assert proc.stdout.readline()
        assert len(followers(proc.pid)) == 1
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr.read()
    assert workers_of(model_dir) == []


def test_hosts_check(tmp_path, model_dir):
    hosts = hostfile(tmp_path, 2)
    ok = subprocess.run([*QWEN3, "hosts", "check", str(hosts), "-m", str(model_dir)],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(", model ok") == 2
    # A host that cannot be reached is named, and the check fails.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                               {"ssh": "no-such-host.invalid", "ips": ["10.9.9.9"]}]))  # fmt: skip
    run = subprocess.run([*QWEN3, "hosts", "check", str(bad), "-m", str(model_dir)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1
    assert "MISSING rank 1 no-such-host.invalid: unreachable" in run.stdout
    assert run.stderr.strip() == "error: 1 of 2 hosts not ready"


@pytest.mark.parametrize(("args", "message"), [
    (["--parallel", "pipeline"], "error: --parallel and --backend need --hosts"),
    (["--hosts", "HOSTS", "--backend", "nccl"], "error: --backend must be one of ring, jaccl, mpi"),
    (["--hosts", "missing.json"], "error: missing.json: cannot read"),
])  # fmt: skip
def test_bad_distributed_options_are_one_line(tmp_path, model_dir, args, message):
    args = [str(hostfile(tmp_path, 2)) if a == "HOSTS" else a for a in args]
    run = chat(model_dir, *args)
    assert run.returncode in (1, 2)
    assert run.stderr.strip().startswith(message), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_repl_across_ranks_retry_undo_exit(tmp_path, model_dir, one_process):
    from pty_term import Term

    one = one_process["answer"]
    term = Term(["-m", str(model_dir), "--temp", "0", "--no-budget", "--max-tokens", "12",
                 "--hosts", str(hostfile(tmp_path, 2))], tmp_path / "state")  # fmt: skip
    term.prompt()
    assert len(followers(term.child.pid)) == 1
    term.ask("Hello there")
    first = one.split()[0]
    assert first in term.seen  # the same greedy answer as one process
    term.ask("/retry")  # the cache rewinds on every rank, and the same answer comes again
    assert first in term.seen
    term.send("/undo")
    term.prompt()
    term.send("/model demo")  # would load on this machine only: refused, the ranks stay
    term.expect("not available with --hosts")
    term.prompt()
    assert len(followers(term.child.pid)) == 1
    term.send("/exit")
    assert term.close() == 0
    assert workers_of(model_dir) == []


def test_repl_stops_with_one_line_and_a_sound_terminal_when_a_rank_dies(tmp_path, model_dir):
    from pty_term import Term

    term = Term(["-m", str(model_dir), "--temp", "0", "--no-budget", "--max-tokens", "100000",
                 "--hosts", str(hostfile(tmp_path, 2))], tmp_path / "state")  # fmt: skip
    term.prompt()
    victim = followers(term.child.pid)[0]
    term.send("Tell me a long story")
    time.sleep(1.0)  # answering (echo is off while the REPL generates)
    assert not term.child.getecho()
    os.kill(victim, signal.SIGKILL)
    term.expect("error: distributed: rank 1 on 127.0.0.1 stopped")
    term.child.expect(pexpect.EOF)
    assert term.child.getecho()  # the terminal is left as it was found
    transcript = term.transcript + term.child.before
    assert term.close() == 1
    assert "Traceback" not in transcript and "[ring]" not in transcript


def test_a_remote_host_is_started_through_ssh_with_every_word_quoted(tmp_path, model_dir,
                                                                     one_process):  # fmt: skip
    """The remote path, up to the network: `ssh` here runs its command in a local shell,
    as sshd would on the other Mac, so the quoting, the copied ring addresses and the
    environment are real."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ssh").write_text('#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done\n'
                              'shift; echo "$1" > "$(dirname "$0")/host"; shift\n'
                              'exec /bin/sh -c "$1"\n')  # fmt: skip
    (fake / "ssh").chmod(0o755)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                 {"ssh": "me@mac-2.local", "ips": ["127.0.0.1"]}]))  # fmt: skip
    cmd = [*QWEN3, "chat", "-m", str(model_dir), "--temp", "0", "--no-budget", "--max-tokens",
           "12", "--json", "Hello there", "--hosts", str(hosts)]  # fmt: skip
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env,
                         stdin=subprocess.DEVNULL)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["answer"] == one_process["answer"]
    assert (fake / "host").read_text().strip() == "me@mac-2.local"


@pytest.mark.parametrize(("data", "message"), [
    ([{"ssh": "-oProxyCommand=touch /tmp/x"}], "is not a host name"),  # no ssh options
    ([{"ssh": "mac1", "ips": ["10.0.0.300"]}], "'10.0.0.300' is not an IP address"),
    ({"backend": "nccl", "hosts": [{"ssh": "mac1"}]}, "backend must be one of ring, jaccl, mpi"),
    ([], "needs a non-empty list of hosts"),
])  # fmt: skip
def test_hostfiles_are_checked_before_anything_runs(tmp_path, data, message):
    from qwen3_chat.distributed.hosts import HostfileError, read_hostfile

    path = tmp_path / "h.json"
    path.write_text(json.dumps(data))
    with pytest.raises(HostfileError, match=message):
        read_hostfile(path)


def test_each_rank_gets_what_mlx_launch_would_export(tmp_path):
    from qwen3_chat.distributed.group import PipelineError
    from qwen3_chat.distributed.hosts import read_hostfile
    from qwen3_chat.distributed.launch import backend_env, ring_addresses

    path = tmp_path / "h.json"
    path.write_text(json.dumps({"envs": ["MLX_METAL_FAST_SYNCH=1"], "hosts": [
        {"ssh": "mac1", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en3"]},
        {"ssh": "mac2", "ips": ["10.0.0.2"], "rdma": ["rdma_en3", None]}]}))  # fmt: skip
    hf = read_hostfile(path)
    assert ring_addresses(hf) == [["10.0.0.1:32323"], ["10.0.0.2:32324"]]
    assert backend_env(hf, "ring", 1, tmp_path) == {
        "MLX_METAL_FAST_SYNCH": "1", "MLX_RANK": "1", "MLX_HOSTFILE": str(tmp_path / "ring.json")}
    jaccl = backend_env(hf, "jaccl", 1, tmp_path)
    assert jaccl["MLX_JACCL_COORDINATOR"] == "10.0.0.1:32323"
    assert jaccl["MLX_IBV_DEVICES"] == str(tmp_path / "ibv.json")
    with pytest.raises(PipelineError, match="use ring or jaccl"):
        backend_env(hf, "mpi", 1, tmp_path)


def test_repl_ctrl_c_mid_answer_keeps_every_rank_in_step(tmp_path, model_dir, one_process):
    """Ctrl-C lands while a step is on the ring: the session rewinds, the followers with
    it, and a fresh conversation then answers exactly as one process does."""
    from pty_term import Term

    term = Term(["-m", str(model_dir), "--temp", "0", "--no-budget", "--max-tokens", "12",
                 "--hosts", str(hostfile(tmp_path, 3))], tmp_path / "state")  # fmt: skip
    term.prompt()
    term.send("/set max_tokens 100000")
    term.prompt()
    term.send("Tell me a long story")
    time.sleep(1.5)
    term.child.send("\x03")
    term.expect(r"\[interrupted\]")
    term.send("/set max_tokens 12")
    term.prompt()
    term.send("/clear")
    term.prompt()
    term.ask("Hello there")
    assert one_process["answer"].split()[0] in term.seen
    term.send("/exit")
    assert term.close() == 0
    assert workers_of(model_dir) == []


def test_thinking_budget_across_ranks(tmp_path, model_dir):
    """The budget forces its closing text in place of a sampled token: that rewinds the
    cache by one on every rank. Reasoning, answer and counts match one process."""
    # A template that always opens <think> (as Thinking-2507's does): random weights
    # would never open it themselves.
    thinker = tmp_path / "thinker"
    shutil.copytree(model_dir, thinker)
    cfg = json.loads((thinker / "tokenizer_config.json").read_text())
    cfg["chat_template"] = PLAIN_TEMPLATE + "{% if add_generation_prompt %}<think>\n{% endif %}"
    (thinker / "tokenizer_config.json").write_text(json.dumps(cfg))
    args = ["--max-tokens", "6"]
    one = chat(thinker, *args, budget="--budget=4")
    many = chat(thinker, *args, "--hosts", str(hostfile(tmp_path, 2)), budget="--budget=4")
    assert one.returncode == 0 and many.returncode == 0, many.stderr
    a, b = json.loads(one.stdout), json.loads(many.stdout)
    assert a["budget_hit"] and a["reasoning"]
    assert (b["reasoning"], b["answer"], b["usage"]) == (a["reasoning"], a["answer"], a["usage"])
