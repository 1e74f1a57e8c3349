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
from checkpoints import REAL_VOCAB, make_checkpoint, tiny_config
from hub_server import Hub, repo_from_folder

REPO = "Qwen/Qwen3-Tiny"


@pytest.fixture
def ckpt(tmp_path, qwen3_tokenizer_dir) -> Path:
    return make_checkpoint(tmp_path / "src", tiny_config(hidden_size=128, intermediate_size=256),
                           shards=2, tokenizer_dir=qwen3_tokenizer_dir)  # fmt: skip


@pytest.fixture
def chatty(tmp_path, qwen3_tokenizer_dir) -> Path:
    """A checkpoint `qwen3 chat` can answer with: the real vocabulary (tied, so it stays small)."""
    cfg = tiny_config(vocab_size=REAL_VOCAB, tie_word_embeddings=True)
    return make_checkpoint(tmp_path / "chatty", cfg, tokenizer_dir=qwen3_tokenizer_dir)


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
        # The stalled file itself must hold `sent` bytes (other files may be in flight too).
        while not any(p.stat().st_size == sent for p in blobs.glob("*.incomplete")):
            assert time.monotonic() < deadline and proc.poll() is None, "partial file not written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        # "Promptly": long before the 120 s read timeout (generous for a loaded 2-core box).
        _, err = proc.communicate(timeout=20)
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


def test_a_listed_file_the_hub_cannot_serve_is_one_line(hub):
    hub.repos[REPO].gone.add("generation_config.json")
    one_line_error(qwen3("download", REPO, endpoint=hub.url), REPO, "Entry Not Found")


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
    out = tmp_path / "models" / "q4"  # its parent is missing: made, and said (as /save does)
    r = qwen3("convert", str(ckpt), "--bits", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"(created the folder {out.parent})" in r.stderr, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and (out / "tokenizer.json").exists()
    source = json.loads((ckpt / "config.json").read_text())
    assert {k: cfg[k] for k in source} == source  # every key of the original kept
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


def _marker_files() -> list[Path]:
    return list((Path(os.environ["XDG_CACHE_HOME"]) / "qwen3-chat" / "verified").glob("*.json"))


def test_rm_of_the_built_in_demo_says_so():
    one_line_error(qwen3("rm", "demo"), "demo is built in", "nothing to remove")


def test_rm_forgets_the_verification(hub):
    assert qwen3("download", REPO, endpoint=hub.url).returncode == 0
    assert _marker_files()
    assert qwen3("rm", REPO).returncode == 0
    assert not _marker_files()
    hub.repos[REPO].corrupt.add(biggest(hub))  # the same commit, now served corrupted
    one_line_error(qwen3("download", REPO, endpoint=hub.url), "sha256 mismatch")


def test_a_file_changed_since_verification_is_rehashed(hub):
    r = qwen3("download", REPO, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    cfg = Path(r.stdout.strip()) / "generation_config.json"  # a small (non-LFS) file
    cfg.write_bytes(cfg.read_bytes().replace(b"{", b"[", 1))  # through the link: the blob
    line = one_line_error(qwen3("download", REPO, HF_HUB_OFFLINE="1"), "generation_config.json")
    assert f"qwen3 rm {REPO} && qwen3 download {REPO}" in line
    # Online, `download` re-hashes it, throws the changed blob away and fetches it again.
    r = qwen3("download", REPO, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert cfg.read_bytes() == hub.repos[REPO].files["generation_config.json"]


def test_offline_a_cache_never_verified_is_hashed_first(hub):
    r = qwen3("download", REPO, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    for marker in _marker_files():  # as if another tool had filled the cache
        marker.unlink()
    cfg = Path(r.stdout.strip()) / "generation_config.json"
    cfg.write_bytes(cfg.read_bytes() + b" ")
    one_line_error(qwen3("download", REPO, HF_HUB_OFFLINE="1"),
                   "generation_config.json", "does not match its hash")  # fmt: skip


def test_small_files_are_checked_against_their_git_blob_id(hub):
    assert len(hub.repos[REPO].files["generation_config.json"]) < hub.repos[REPO].lfs_min
    hub.repos[REPO].corrupt.add("generation_config.json")
    one_line_error(qwen3("download", REPO, endpoint=hub.url),
                   "generation_config.json", "git blob sha1 mismatch")  # fmt: skip


def chat(model: str, endpoint: str, **env: str) -> subprocess.CompletedProcess:
    return qwen3("chat", "-m", model, "--max-tokens", "1", "--no-think", "hi",
                 endpoint=endpoint, **env)  # fmt: skip


def test_load_failure_from_the_cache_suggests_rm_and_download(hub, chatty, tmp_path):
    import mlx.core as mx

    from qwen3_chat.weights.convert import convert

    q4 = convert(chatty, tmp_path / "q4", 4)
    weights = mx.load(str(q4 / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]  # its scales stay: verify passes
    mx.save_safetensors(str(q4 / "model.safetensors"), weights, metadata={"format": "mlx"})
    hub.repos[REPO] = repo_from_folder(q4)
    assert qwen3("download", REPO, endpoint=hub.url).returncode == 0
    line = one_line_error(chat(REPO, hub.url), "model.layers.1.mlp.up_proj.weight")
    assert f"qwen3 rm {REPO} && qwen3 download {REPO}" in line


def test_progress_bars_only_on_a_terminal(hub, chatty):
    hub.repos[REPO] = repo_from_folder(chatty)
    r = chat(REPO, hub.url)  # stderr is a pipe here
    assert r.returncode == 0, r.stderr
    assert "%|" not in r.stderr and "\r" not in r.stderr, r.stderr
    assert qwen3("rm", REPO).returncode == 0
    download_on_a_terminal(hub, r"%\|")  # on a real terminal the same download shows its bar


def download_on_a_terminal(hub: Hub, shows: str) -> None:
    """`qwen3 download REPO` in a real pty: `shows` appears and it succeeds."""
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "qwen3_chat", "download", REPO],
                          env=_env(hub.url, {}), encoding="utf-8", timeout=60)  # fmt: skip
    child.expect(shows)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def _user_registry(text: str) -> None:
    user = Path(os.environ["XDG_CONFIG_HOME"]) / "qwen3-chat" / "models.toml"
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text(text)


def test_chat_uses_the_variant_already_on_disk(hub, chatty):
    hub.repos[REPO] = repo_from_folder(chatty)
    _user_registry('[models.tiny]\nrepo = "Qwen/Qwen3-Tiny-Original"\n'
                   f'mlx = {{ 4 = "Qwen/Qwen3-Tiny-4bit", 8 = "{REPO}" }}\n')  # fmt: skip
    assert qwen3("download", "tiny", "--bits", "8", endpoint=hub.url).returncode == 0
    r = chat("tiny", "http://127.0.0.1:9")  # nothing reachable: only what is on disk
    assert r.returncode == 0, r.stderr
    assert "note: tiny: using the 8-bit copy already on disk" in r.stderr  # chat says which
    assert "using the" not in r.stdout
    r = chat("tiny", "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert not any("4bit" in q for q in hub.requests)
    probe = ("from qwen3_chat.hub.download import find_local, variant_note\n"
             "found = find_local('tiny')\nprint(found.bits, variant_note('tiny', found, None))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=_env(None, {}), check=True).stdout  # fmt: skip
    assert out.startswith("8 tiny: using the 8-bit copy already on disk"), out


def test_models_lists_converted_folders_in_full(ckpt, tmp_path):
    out = tmp_path / ("a-folder-name-long-enough-to-be-cut-" * 3) / "Qwen3-Tiny-4bit"
    assert qwen3("convert", str(ckpt), "--bits", "4", "--out", str(out)).returncode == 0
    r = qwen3("models", COLUMNS="60")  # piped: nothing is cut to the width
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "…" not in r.stdout
    import shutil

    shutil.rmtree(out)
    assert str(out) not in qwen3("models").stdout  # gone from disk: no longer listed


def test_malformed_user_registry_does_not_block_demo():
    _user_registry('[models.broken]\nrepo = "no-slash"\n')
    r = qwen3("chat", "-m", "demo", "--max-tokens", "1", "--no-think", "hi")
    assert r.returncode == 0, r.stderr
    one_line_error(qwen3("chat", "-m", "qwen3-8b", "hi"), "models.broken", "owner/name")


_STAGES = ("import json, sys\nfrom qwen3_chat.hub.download import ensure_model\n"
           "ensure_model(sys.argv[1], progress=False,\n"
           "             status=lambda stage, msg: print(json.dumps([stage, msg]), flush=True))")


def stages(hub: Hub) -> list[list[str]]:
    """The (stage, message) pairs ensure_model reports, in a fresh process as the CLI runs it."""
    r = subprocess.run([sys.executable, "-c", _STAGES, REPO], capture_output=True, text=True,
                       env=_env(hub.url, {}), timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_ensure_model_reports_hashing_as_a_verify_stage(hub):
    # Before: ensure_model took only progress=True/False, so hashing showed nothing at all.
    fresh = stages(hub)
    assert [s for s, _ in fresh] == ["download", "verify"] and REPO in fresh[1][1]
    assert stages(hub) == []  # verified and unchanged: nothing slow happens, nothing is said
    for marker in _marker_files():  # as if another tool had filled the cache: all re-hashed
        marker.unlink()
    again = stages(hub)
    assert [s for s, _ in again] == ["verify", "verify"], again  # no bytes fetched again
    assert f"checking {len(hub.repos[REPO].files)} files" in again[0][1]


def test_download_on_a_terminal_shows_the_verify_spinner(hub):
    download_on_a_terminal(hub, f"verifying {REPO}")


def test_a_default_the_hub_does_not_have_falls_back_to_the_shipped_default(hub, chatty):
    """With no -m the machine's memory picks the default, often from the newest family; if the
    Hub has no such repo (yet), chat uses models.toml's shipped default and says so."""
    from qwen3_chat.hub.open import choose_default
    from qwen3_chat.hub.registry import load_registry

    shipped = load_registry().default
    chosen = choose_default().name
    served = load_registry().get(shipped).repo_for(4)
    hub.repos[served] = repo_from_folder(chatty)  # only the shipped default exists on this Hub
    r = qwen3("chat", "--max-tokens", "1", "--no-think", "hi", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    if chosen != shipped:  # on a machine whose memory picks another model
        assert "was not found on the Hugging Face Hub" in r.stderr
        assert f"using {shipped} instead" in r.stderr
    assert "Traceback" not in r.stderr
