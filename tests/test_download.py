"""`qwen3 download` / `models` / `rm` / `convert` against a local Hub on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from checkpoints import make_checkpoint, tiny_config
from hub_server import Hub, repo_from_folder

REPO = "Qwen/Qwen3-Tiny"


@pytest.fixture
def ckpt(tmp_path, qwen3_tokenizer_dir) -> Path:
    return make_checkpoint(tmp_path / "src", tiny_config(hidden_size=128, intermediate_size=256),
                           shards=2, tokenizer_dir=qwen3_tokenizer_dir)  # fmt: skip


@pytest.fixture
def hub(ckpt):
    with Hub() as server:
        server.repos[REPO] = repo_from_folder(ckpt)
        yield server


def _env(endpoint: str | None, env: dict[str, str]) -> dict[str, str]:
    full = {**os.environ, **env}
    if endpoint:
        full["HF_ENDPOINT"] = endpoint
    full.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    full.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    return full


def qwen3(*args: str, endpoint: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen3_chat", *args], capture_output=True,
                          text=True, env=_env(endpoint, env), timeout=120)  # fmt: skip


def biggest(hub: Hub) -> str:
    files = hub.repos[REPO].files
    return max(files, key=lambda p: len(files[p]))


def range_starts(hub: Hub, name: str) -> list[int]:
    """The N of every `Range: bytes=N-` GET the server received for file `name`."""
    return [int(m.group(1)) for q in hub.requests if q.startswith("GET") and f"/{name} " in q
            and (m := re.search(r"Range: bytes=(\d+)-", q))]  # fmt: skip


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_full_download_then_loads(hub, ckpt):
    r = qwen3("download", REPO, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert (path / "model.safetensors.index.json").exists()
    for f in ckpt.iterdir():
        assert (path / f.name).read_bytes() == f.read_bytes()
    from qwen3_chat import load

    model, _ = load(path)
    ref, _ = load(ckpt)
    import mlx.core as mx

    x = mx.array([[1, 2, 3]])
    np.testing.assert_array_equal(model(x), ref(x))


def test_resume_after_a_dropped_connection(hub, ckpt):
    big = biggest(hub)
    hub.repos[REPO].drop_once.add(big)
    r = qwen3("download", REPO, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert (path / big).read_bytes() == (ckpt / big).read_bytes()
    # The server sent half the file before hanging up: the client kept what it had written
    # and asked for the rest only (N > 0), never for the whole file again.
    (start,) = range_starts(hub, big)
    assert 0 < start <= len(hub.repos[REPO].files[big]) // 2
    assert len([q for q in hub.requests if q.startswith("GET") and f"/{big}" in q]) == 2


def test_ctrl_c_stops_promptly_and_the_next_run_resumes(hub, ckpt):
    big = biggest(hub)
    sent = len(hub.repos[REPO].files[big]) // 3
    hub.repos[REPO].stall[big] = sent
    # A long read timeout: the stalled transfer must end by Ctrl-C, not by a timeout.
    proc = subprocess.Popen([sys.executable, "-m", "qwen3_chat", "download", REPO],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(hub.url, {"HF_HUB_DOWNLOAD_TIMEOUT": "120"}))  # fmt: skip
    try:
        assert hub.stalled.wait(90), "the download never reached the stalled file"
        blobs = Path(os.environ["HF_HOME"]) / "hub" / "models--Qwen--Qwen3-Tiny" / "blobs"
        deadline = time.monotonic() + 30  # until the client has written what it received
        while sum(p.stat().st_size for p in blobs.glob("*.incomplete")) < sent:
            assert time.monotonic() < deadline and proc.poll() is None, "partial file not written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=3)  # "promptly": well before any read timeout
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert any(p.stat().st_size == sent for p in blobs.glob("*.incomplete"))  # kept
    del hub.repos[REPO].stall[big]
    r = qwen3("download", REPO, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert (Path(r.stdout.strip()) / big).read_bytes() == (ckpt / big).read_bytes()
    assert range_starts(hub, big) == [sent]
    assert not list(blobs.glob("*.incomplete"))


def test_not_found(hub):
    line = one_line_error(qwen3("download", "Qwen/Nope", endpoint=hub.url), "not found")
    assert "Qwen/Nope" in line


def test_gated(hub):
    hub.repos[REPO].gated = True
    one_line_error(qwen3("download", REPO, endpoint=hub.url), "gated", "HF_TOKEN")


def test_no_network():
    r = qwen3("download", REPO, endpoint="http://127.0.0.1:9")
    one_line_error(r, REPO)


def test_offline_from_cache(hub):
    assert qwen3("download", REPO, endpoint=hub.url).returncode == 0
    r = qwen3("download", REPO, endpoint="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    r = qwen3("download", "Qwen/Other", endpoint="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    one_line_error(r, "not downloaded", "qwen3 download")


def test_corrupted_file_is_caught_and_removed(hub):
    big = max(hub.repos[REPO].files, key=lambda p: len(hub.repos[REPO].files[p]))
    hub.repos[REPO].corrupt.add(big)
    one_line_error(qwen3("download", REPO, endpoint=hub.url), big, "sha256 mismatch")
    hub.repos[REPO].corrupt.clear()
    r = qwen3("download", REPO, endpoint=hub.url)  # the bad blob was removed: fetched again
    assert r.returncode == 0, r.stderr


def test_folder_failing_verification_says_what_is_wrong(hub, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    hub.repos[REPO].files["config.json"] = json.dumps({**cfg, "hidden_size": 96}).encode()
    line = one_line_error(qwen3("download", REPO, endpoint=hub.url), "has shape")
    assert "config.json says" in line


def test_bad_repo_ids_are_rejected():
    for bad in ["../../etc", "a/b/c", "owner/na me", "owner/na$me", "x/.."]:
        one_line_error(qwen3("download", bad))


def test_models_lists_download_state_and_rm(hub, tmp_path):
    user = Path(os.environ["XDG_CONFIG_HOME"]) / "qwen3-chat" / "models.toml"
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text(f'[models.tiny]\nrepo = "{REPO}"\nmlx = {{ 4 = "{REPO}" }}\n'
                    'download_gb = { 4 = 0.01 }\nthinking = "hybrid"\n')  # fmt: skip
    r = qwen3("models", COLUMNS="200")
    assert r.returncode == 0 and "tiny" in r.stdout
    assert "qwen3-30b-a3b-thinking-2507" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("tiny"))
    assert row.rstrip().endswith("-")
    assert qwen3("download", "tiny", endpoint=hub.url).returncode == 0
    row = next(line for line in qwen3("models", COLUMNS="200").stdout.splitlines()
               if line.startswith("tiny"))  # fmt: skip
    assert "4-bit" in row and "MB at" in row
    r = qwen3("rm", "tiny")
    assert r.returncode == 0 and REPO in r.stderr
    one_line_error(qwen3("rm", "tiny"), "not downloaded")


def test_malformed_user_registry_names_the_entry():
    user = Path(os.environ["XDG_CONFIG_HOME"]) / "qwen3-chat" / "models.toml"
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text('[models.broken]\nrepo = "no-slash"\n')
    one_line_error(qwen3("models"), "models.broken", "owner/name")


def test_convert_round_trip(ckpt, tmp_path):
    out = tmp_path / "q4"
    r = qwen3("convert", str(ckpt), "--bits", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and (out / "tokenizer.json").exists()
    import mlx.core as mx

    from qwen3_chat import load

    x = mx.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(load(out)[0](x), load(ckpt, bits=4)[0](x))
    again = qwen3("convert", str(ckpt), "--bits", "4", "--out", str(out))
    one_line_error(again, "not an empty folder")


def test_convert_without_or_with_a_broken_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    one_line_error(qwen3("convert", str(ckpt), "--bits", "4", "--out", str(tmp_path / "a")),
                   "config.json")  # fmt: skip
    (ckpt / "config.json").write_text("{broken")
    one_line_error(qwen3("convert", str(ckpt), "--bits", "4", "--out", str(tmp_path / "b")),
                   "config.json", "not valid JSON")  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
