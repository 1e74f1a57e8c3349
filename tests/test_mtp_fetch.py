"""The MTP head of a hybrid model fetched from its original repo by HTTP Range, when an
MLX-community folder lacks it (issue 10): a real local Hub (tests/hub_server.py) serves a tiny
Qwen3-Next-like "original" with its `mtp.*` head in the second of two shards; the
"MLX-community" folder holds the same weights without `mtp.*` and a card naming the original."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from checkpoints import REAL_VOCAB, TOKENIZER_FILES
from hub_server import Hub, Repo, repo_from_folder
from safetensors.numpy import load_file, save_file
from test_download import one_line_error, qwen3

from qwen3_chat.hub.mtp_fetch import Tensor, merge_ranges
from qwen3_chat.hub.mtp_origin import card_origin

pytest.importorskip("torch")

ORIGIN = "Qwen/Qwen3-Next-Tiny"
MLX_REPO = "mlx-community/Qwen3-Next-Tiny-bf16"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
ASK = "Copy this: 12 + 30 = 42, 12 + 30 = 42"
# mlx-lm's card: create_model_card's front matter, upload_to_hub's provenance line.
CARD = f"""---
base_model: {ORIGIN}
library_name: mlx
pipeline_tag: text-generation
tags:
- mlx
---

# {MLX_REPO}

This model [{MLX_REPO}](https://huggingface.co/{MLX_REPO}) was
converted to MLX format from [{ORIGIN}](https://huggingface.co/{ORIGIN})
using mlx-lm version **0.28.3**.
"""


def _folder(out: Path, src: Path, shards: dict[str, dict]) -> Path:
    out.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    for name, tensors in shards.items():
        save_file(tensors, str(out / name), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """`with-head` (the checkpoint as Qwen released it), `original` (the same, in two shards
    with an index, the head in the second) and `mlx` (no `mtp.*`, mlx-lm's card)."""
    from hybrid_checkpoints import make_hybrid
    from test_mtp import add_mtp

    root = tmp_path_factory.mktemp("mtp-fetch")
    path, _ = make_hybrid("qwen3_next", root / "with-head", seed=8, vocab_size=REAL_VOCAB,
                          tokenizer_dir=qwen3_tokenizer_dir, tie_word_embeddings=False)  # fmt: skip
    add_mtp(path, mostly_right=True, damp=0.3)
    tensors = load_file(str(path / "model.safetensors"))
    body = sorted(k for k in tensors if not k.startswith("mtp."))
    first = {k: tensors[k] for k in body[: len(body) // 2]}
    second = {k: v for k, v in tensors.items() if k not in first}
    original = _folder(root / "original", path, {SHARDS[0]: first, SHARDS[1]: second})
    weight_map = {k: SHARDS[0] if k in first else SHARDS[1] for k in tensors}
    (original / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
         "weight_map": weight_map}))  # fmt: skip
    mlx = _folder(root / "mlx", path, {"model.safetensors": {k: tensors[k] for k in body}})
    (mlx / "README.md").write_text(CARD)
    return root


@pytest.fixture
def hub(folders):
    with Hub() as server:
        server.repos[ORIGIN] = repo_from_folder(folders / "original")
        yield server


def chat(folder: Path | str, speculate: str, endpoint: str | None = None, **env: str):
    return qwen3("chat", "-m", str(folder), "--temp", "0", "--no-think", "--max-tokens", "16",
                 "--speculate", speculate, "--json", ASK, endpoint=endpoint, **env)  # fmt: skip


def heads() -> list[Path]:
    """Every file under our state dir's mtp/ (fetched heads, links, leftovers)."""
    import os

    root = Path(os.environ["XDG_CACHE_HOME"]) / "qwen3-chat" / "mtp"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def head_ranges(shard: Path) -> tuple[int, int, int]:
    """(header length, first and past-the-last byte of the mtp tensors) read from the file."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    spans = [(8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
             for k, v in header.items() if k.startswith("mtp.")]  # fmt: skip
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    assert hi - lo == sum(b - a for a, b in spans)  # adjacent: one request covers them
    return n, lo, hi


def ranges_asked(hub: Hub, name: str) -> list[str]:
    return [q.split(" Range: ")[1] if " Range: " in q else "whole file" for q in hub.requests
            if q.startswith("GET") and f"/{name}" in q]  # fmt: skip


def test_speculate_mtp_fetches_only_the_head_and_drafts_as_the_folder_with_it(folders, hub):
    r = chat(folders / "mlx", "mtp", hub.url)
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and ORIGIN in notes[0] and "its model card" in notes[0], notes
    assert notes[0].startswith("fetching the MTP head") and " KB of mtp.* tensors" in notes[0]
    got = json.loads(r.stdout)
    assert got["speculation"]["method"] == "mtp" and got["speculation"]["drafted"] > 0
    # Only the header and the head's bytes of the shard holding it; the other shard never.
    n, lo, hi = head_ranges(folders / "original" / SHARDS[1])
    assert ranges_asked(hub, SHARDS[1]) == ["bytes=0-7", f"bytes=8-{8 + n - 1}",
                                            f"bytes={lo}-{hi - 1}"]  # fmt: skip
    assert ranges_asked(hub, SHARDS[0]) == []
    files = heads()
    assert [p.suffix for p in files] == [".json", ".safetensors"], files  # a link, the head
    # The folder that had the head says the same, with the same drafts kept.
    want = json.loads(chat(folders / "with-head", "mtp").stdout)
    assert got["answer"] == want["answer"] and got["speculation"] == want["speculation"]
    # A second run, offline and with no Hub at all, finds the head; auto uses it too.
    asked = len(hub.requests)
    for method in ("mtp", "auto"):
        again = chat(folders / "mlx", method, "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
        assert again.returncode == 0 and "fetching" not in again.stderr, again.stderr
        out = json.loads(again.stdout)
        assert out["answer"] == want["answer"] and out["speculation"]["method"] == "mtp"
    assert len(hub.requests) == asked and heads() == files


def test_the_fetched_head_gives_the_same_mtp_logits_and_greedy_tokens(folders, hub):
    import mlx.core as mx
    from test_mtp import PROMPT, plain_tokens, spec_tokens

    from qwen3_chat.engine.speculative import make_speculation
    from qwen3_chat.models.mtp import has_mtp, mtp_head
    from qwen3_chat.weights.loader import load_model

    assert not has_mtp(load_model(folders / "mlx"))  # nothing fetched yet in this home
    r = chat(folders / "mlx", "mtp", hub.url)
    assert r.returncode == 0, r.stderr
    fetched, reference = load_model(folders / "mlx"), load_model(folders / "with-head")
    ids = PROMPT[:24]

    def mtp_logits(model) -> np.ndarray:
        _, hidden = model(mx.array([ids]), return_hidden=True)
        head = mtp_head(model)
        g = head(model.model.embed_tokens(mx.array([ids[1:]])), hidden[:, :-1],
                 head.make_cache())  # fmt: skip
        return np.array(model.project(g)[0])

    assert np.array_equal(mtp_logits(fetched), mtp_logits(reference))
    spec = make_speculation("mtp")
    assert spec_tokens(spec, fetched, PROMPT, 30) == plain_tokens(reference, PROMPT, 30)
    assert spec.stats.accepted > 0


def test_a_bar_shows_on_a_terminal(folders, hub):
    """Piped, the note is all (above); on a real terminal the fetch draws its bar."""
    import os
    import sys

    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "qwen3_chat", "chat", "-m", str(folders / "mlx"),
                                           "--speculate", "mtp", "--max-tokens", "4", ASK],
                          env={**os.environ, "HF_ENDPOINT": hub.url}, encoding="utf-8",
                          timeout=60)  # fmt: skip
    child.expect("fetching the MTP head")
    child.expect(r"Qwen3-Next-Tiny mtp: +\d+%\|")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and len(heads()) == 2


def test_auto_never_fetches(folders, hub):
    r = chat(folders / "mlx", "auto", hub.url)
    assert r.returncode == 0, r.stderr
    assert hub.requests == [] and heads() == []
    assert json.loads(r.stdout).get("speculation", {}).get("method") != "mtp"


@pytest.mark.parametrize("fault", ["corrupt", "short", "ignore_range", "no_repo"])
def test_a_broken_answer_is_one_line_and_leaves_no_file(folders, hub, fault):
    repo = hub.repos[ORIGIN]
    if fault == "corrupt":  # the header length's first byte flipped
        repo.corrupt.add(SHARDS[1])
    elif fault == "short":  # every range comes back half
        repo.short.add(SHARDS[1])
    elif fault == "ignore_range":  # would send the whole shard
        repo.ignore_range = True
    else:
        del hub.repos[ORIGIN]
    needle = {"corrupt": "safetensors header", "short": "came back short",
              "ignore_range": "ignored the byte range",
              "no_repo": f"{ORIGIN} was not found"}[fault]  # fmt: skip
    one_line_error(chat(folders / "mlx", "mtp", hub.url), needle)
    assert heads() == []  # no head, no link, no half-written file


def test_unknown_original_or_offline_is_the_one_no_head_line(folders, hub, tmp_path):
    bare = shutil.copytree(folders / "mlx", tmp_path / "bare")
    (bare / "README.md").unlink()
    r = chat(bare, "mtp", hub.url)
    assert r.returncode == 2
    line = one_line_error(r, "no MTP head", "original repo is not known", "no model card")
    assert line.startswith("error: --speculate mtp")
    one_line_error(chat(folders / "mlx", "mtp", hub.url, HF_HUB_OFFLINE="1"), "no MTP head",
                   "HF_HUB_OFFLINE")  # fmt: skip
    assert hub.requests == [] and heads() == []


@pytest.mark.parametrize("kind", ["pickle", "headless"])
def test_an_original_without_a_safetensors_head_is_the_no_head_line(folders, hub, kind):
    if kind == "pickle":  # never read: safetensors only
        hub.repos[ORIGIN] = Repo({"config.json": b"{}", "pytorch_model.bin": b"\x80" * 2048})
    else:  # the card names a repo that lacks the head too
        hub.repos[ORIGIN] = repo_from_folder(folders / "mlx")
    r = chat(folders / "mlx", "mtp", hub.url)
    assert r.returncode == 2
    why = "has no safetensors weights" if kind == "pickle" else "has no mtp.* tensors either"
    one_line_error(r, "no MTP head", f"{ORIGIN} ", why)
    assert not any("pytorch_model.bin" in q for q in hub.requests) and heads() == []


def test_an_unreachable_hub_is_offline_too(folders):
    r = chat(folders / "mlx", "mtp", "http://127.0.0.1:9")  # nothing listens there
    assert r.returncode == 2
    one_line_error(r, "no MTP head", "cannot reach the Hugging Face Hub", ORIGIN)
    assert heads() == []


def test_a_quantized_folder_reuses_the_head_and_quantizes_it_like_the_model(folders, hub,
                                                                            tmp_path):  # fmt: skip
    """A second conversion of the same original (8-bit here) takes the head fetched for the
    first: the original's commit is looked up, no byte of a shard is asked for again."""
    import mlx.nn as nn
    from test_mtp import PROMPT, plain_tokens, spec_tokens

    from qwen3_chat.engine.speculative import make_speculation
    from qwen3_chat.models.mtp import mtp_head
    from qwen3_chat.weights.loader import load_model, save_model

    mlx = folders / "mlx"
    keep = [p for p in mlx.iterdir() if p.name == "README.md" or p.name in TOKENIZER_FILES]
    q8 = save_model(load_model(mlx, bits=8), None, tmp_path / "q8", extra_files=keep)
    assert chat(folders / "mlx", "mtp", hub.url).returncode == 0
    fetched = len(ranges_asked(hub, SHARDS[1]))
    r = chat(q8, "mtp", hub.url)
    assert r.returncode == 0 and "fetching" not in r.stderr, r.stderr
    assert len(ranges_asked(hub, SHARDS[1])) == fetched == 3
    assert json.loads(r.stdout)["speculation"]["method"] == "mtp"
    model = load_model(q8)
    assert model.config.quantization and isinstance(mtp_head(model).fc, nn.QuantizedLinear)
    spec = make_speculation("mtp")
    assert spec_tokens(spec, model, PROMPT, 30) == plain_tokens(model, PROMPT, 30)
    assert spec.stats.accepted > 0


def test_download_mtp_reads_the_card_from_the_hub_and_fetches_ahead(folders, hub):
    """Our downloads skip README.md: the card of a cached MLX snapshot comes from the Hub."""
    hub.repos[MLX_REPO] = repo_from_folder(folders / "mlx")
    assert qwen3("download", MLX_REPO, endpoint=hub.url).returncode == 0
    offline = qwen3("download", MLX_REPO, "--mtp", HF_HUB_OFFLINE="1")
    one_line_error(offline, f"--mtp: no MTP head for {MLX_REPO}: ", "HF_HUB_OFFLINE")
    r = qwen3("download", MLX_REPO, "--mtp", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    snapshot = Path(r.stdout.strip())
    assert not (snapshot / "README.md").exists()
    assert any(q.startswith(f"GET /{MLX_REPO}/resolve/") and q.endswith("/README.md")
               for q in hub.requests)  # fmt: skip
    assert f"{MLX_REPO}'s model card" in r.stderr and "MTP head at" in r.stderr
    again = qwen3("download", MLX_REPO, "--mtp", endpoint="http://127.0.0.1:9",
                  HF_HUB_OFFLINE="1")  # fmt: skip
    assert again.returncode == 0 and "fetching" not in again.stderr, again.stderr
    out = chat(MLX_REPO, "mtp", "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    assert json.loads(out.stdout)["speculation"]["method"] == "mtp", out.stderr
    one_line_error(qwen3("download", "demo", "--mtp"), "not a Qwen3-Next/3.5 model")



# -- the pieces ---------------------------------------------------------------------------
def test_an_alias_names_its_original_in_models_toml(tmp_path):
    from qwen3_chat.hub.mtp_origin import local_origin

    bare = tmp_path / "qwen3-next-80b-a3b-instruct"  # a folder's name is not an alias
    bare.mkdir()
    found = local_origin(bare, "qwen3-next-80b-a3b-instruct")
    assert found.repo == "Qwen/Qwen3-Next-80B-A3B-Instruct" and "models.toml" in found.why
    assert local_origin(bare, str(bare)).repo is None


@pytest.mark.parametrize("card, repo", [
    (CARD, ORIGIN),
    (f"---\nbase_model:\n- {ORIGIN}\n---\n", ORIGIN),  # a one-item list
    (f"# x\nThe Model [a/b](u) was converted to MLX format from [{ORIGIN}](u)", ORIGIN),
    ("---\nbase_model: [Qwen/A, Qwen/B]\n---\n", None),  # several: none is chosen
    (CARD.replace(f"base_model: {ORIGIN}", "base_model: Qwen/Other"), None),  # disagree
    ("---\nbase_model: ../../etc\n---\n", None),  # not a repo id
    ("---\nbase_model: [unclosed\n---\n", None),  # broken YAML, no line either
    ("# Qwen3-Next-80B-A3B-Instruct-4bit\n", None),  # nothing is guessed from a name
])  # fmt: skip
def test_the_card_names_the_original(card, repo):
    assert card_origin(card).repo == repo


def test_adjacent_ranges_merge_and_gaps_do_not():
    t = [Tensor("a", "F32", (2,), 100, 108), Tensor("b", "F32", (2,), 108, 116),
         Tensor("c", "F32", (1,), 120, 124)]  # fmt: skip
    assert merge_ranges(tuple(t)) == [(100, 116), (120, 124)]


def test_rm_deletes_the_head_fetched_for_the_model(folders, hub):
    """A fetched head is ours to clean up: `qwen3 rm` of the model that fetched it deletes
    it (and its record) once no other model uses it."""
    hub.repos[MLX_REPO] = repo_from_folder(folders / "mlx")
    assert qwen3("download", MLX_REPO, endpoint=hub.url).returncode == 0
    assert qwen3("download", MLX_REPO, "--mtp", endpoint=hub.url).returncode == 0
    assert any(p.suffix == ".safetensors" for p in heads())
    r = qwen3("rm", MLX_REPO)
    assert r.returncode == 0, r.stderr
    assert heads() == []
