"""A draft model found on disk (hub.drafts): the chooser on the real Qwen3 family's configs
and the shipped models.toml, and `qwen3 chat --speculate draft` without --draft finding a
tiny draft in a Hugging Face cache laid out on disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from itertools import count
from pathlib import Path

import pytest
from checkpoints import REAL_VOCAB, make_checkpoint, tiny_config

from qwen3_chat.hub.drafts import ModelFacts, choose_draft, draft_pays, model_facts
from qwen3_chat.hub.registry import load_registry

# The published Qwen3 configs (the fields that size a model), by alias.
DENSE = {"model_type": "qwen3", "vocab_size": REAL_VOCAB, "head_dim": 128}
CONFIGS = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8),
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                          decoder_sparse_step=1, mlp_only_layers=[]),
}  # fmt: skip


@pytest.fixture
def facts(tmp_path):
    """facts(alias, bits, **config changes): ModelFacts read from a config.json on disk, with
    the shipped models.toml entry's memory need."""
    entries, n = load_registry().entries, count()

    def make(alias: str, bits: int = 4, **changes) -> ModelFacts:
        folder = tmp_path / str(next(n))
        folder.mkdir()
        cfg = {**DENSE, **CONFIGS[alias], **changes}
        (folder / "config.json").write_text(json.dumps(cfg))
        found = model_facts(alias, folder, bits, entries[alias])
        assert found is not None
        return found

    return make


def test_the_right_sibling_for_each_size(facts):
    disk = [facts(a) for a in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b")]
    picks = {t: choose_draft(facts(t), disk, None).draft for t in CONFIGS}
    names = {t: d.name if d else None for t, d in picks.items()}
    assert names == {
        "qwen3-0.6b": None, "qwen3-1.7b": None,  # nothing under a quarter of their size
        "qwen3-4b": "qwen3-0.6b", "qwen3-8b": "qwen3-0.6b", "qwen3-14b": "qwen3-0.6b",
        "qwen3-32b": "qwen3-1.7b",  # the 4B is 1/8 of it: too close
        "qwen3-30b-a3b": "qwen3-0.6b",  # sized by its 3.3B active parameters
    }  # fmt: skip
    why = choose_draft(facts("qwen3-1.7b"), disk, None).why
    assert "quarter" in why and "qwen3-1.7b" in why
    for d in (d for d in picks.values() if d):
        assert d.parameters < 0.25 * max(f.parameters for f in disk)
    assert "qwen3-0.6b (4-bit, 0.6B parameters) as the draft model for qwen3-8b" in (
        choose_draft(facts("qwen3-8b"), disk, None).why)


def test_another_vocabulary_or_family_is_refused(facts):
    target = facts("qwen3-8b")
    other_vocab = facts("qwen3-0.6b", vocab_size=248320)  # Qwen3.5's tokenizer
    hybrid = facts("qwen3-0.6b", model_type="qwen3_next")
    moe = facts("qwen3-0.6b", model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[])  # fmt: skip
    choice = choose_draft(target, [other_vocab, hybrid, moe], None)
    assert choice.draft is None
    assert "vocabulary (151936 tokens)" in choice.why and "qwen3 download" in choice.why
    assert choose_draft(target, [other_vocab, hybrid, moe, facts("qwen3-0.6b")], None).draft
    mtp = choose_draft(facts("qwen3-8b", model_type="qwen3_next"), [facts("qwen3-0.6b")], None)
    assert mtp.draft is None and "MTP" in mtp.why


def test_refused_when_the_memory_the_target_leaves_is_short(facts):
    target = facts("qwen3-32b")  # needs 21 GB at 4 bits; the 0.6B 1.0 GB, the 1.7B 2.0 GB
    disk = [facts("qwen3-0.6b"), facts("qwen3-1.7b")]
    # hub.open's rule: models may use 60% of the machine's memory.
    assert choose_draft(target, disk, 64e9).draft.name == "qwen3-1.7b"
    assert choose_draft(target, disk, 37.5e9).draft.name == "qwen3-0.6b"  # 1.5 GB left
    short = choose_draft(target, disk, 36e9)  # 0.6 GB left
    assert short.draft is None
    assert "needs 1.0 GB" in short.why and "leaves 0.6 GB" in short.why, short.why


def test_the_targets_bits_are_preferred_then_fewer(facts):
    disk = [facts("qwen3-0.6b", b) for b in (16, 8, 4)]
    for bits in (4, 8, 16):
        assert choose_draft(facts("qwen3-8b", bits), disk, None).draft.bits == bits
    assert choose_draft(facts("qwen3-8b", 4), disk[:2], None).draft.bits == 8
    # the size comes first: a cheaper model at other bits wins over the same bits
    two = [facts("qwen3-1.7b", 4), facts("qwen3-0.6b", 8)]
    assert choose_draft(facts("qwen3-8b", 4), two, None).draft.name == "qwen3-0.6b"


def test_auto_drafts_with_a_model_only_where_it_pays(facts):
    assert draft_pays(facts("qwen3-8b"), gpu=True) and draft_pays(facts("qwen3-4b"), gpu=True)
    assert not draft_pays(facts("qwen3-8b"), gpu=False)  # a CPU: no wall gain measured
    assert not draft_pays(facts("qwen3-1.7b"), gpu=True)
    assert not draft_pays(facts("qwen3-30b-a3b"), gpu=True)
    assert not draft_pays(facts("qwen3-8b", model_type="qwen3_next"), gpu=True)


# -- the CLI, with a draft in a Hugging Face cache ---------------------------------------------
DRAFT_REPO = "Qwen/Qwen3-Tiny-Draft"


def cache_repo(repo_id: str, folder: Path) -> None:
    """Lay `folder` out as the HF cache does: blobs named by their sha256, a snapshot of
    links to them, refs/main naming the commit."""
    root = Path(os.environ["HF_HOME"]) / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot, blobs = root / "snapshots" / commit, root / "blobs"
    for d in (snapshot, blobs, root / "refs"):
        d.mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))


def qwen3(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing is fetched: only what is on disk
    return subprocess.run([sys.executable, "-m", "qwen3_chat", *args], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip


@pytest.fixture
def target(tmp_path, qwen3_tokenizer_dir) -> Path:
    """A tiny target with the real vocabulary; a draft a quarter its size is far smaller."""
    cfg = tiny_config(vocab_size=REAL_VOCAB, tie_word_embeddings=True)
    return make_checkpoint(tmp_path / "target", cfg, tokenizer_dir=qwen3_tokenizer_dir)


@pytest.fixture
def draft_on_disk(tmp_path, qwen3_tokenizer_dir) -> str:
    """A tiny draft (1/8 of the target) in the HF cache under a user models.toml alias,
    verified by `qwen3 download` offline as a copy another tool fetched would be."""
    cfg = tiny_config(vocab_size=REAL_VOCAB, tie_word_embeddings=True, hidden_size=8,
                      intermediate_size=16, num_hidden_layers=1)  # fmt: skip
    cache_repo(DRAFT_REPO, make_checkpoint(tmp_path / "draft", cfg, seed=3,
                                           tokenizer_dir=qwen3_tokenizer_dir))  # fmt: skip
    user = Path(os.environ["XDG_CONFIG_HOME"]) / "qwen3-chat" / "models.toml"
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text(f'[models.tiny-draft]\nrepo = "{DRAFT_REPO}"\n')
    r = qwen3("download", "tiny-draft", "--bits", "16")
    assert r.returncode == 0, r.stderr
    return "tiny-draft"


def chat_json(target: Path, *args: str) -> subprocess.CompletedProcess:
    return qwen3("chat", "-m", str(target), "--temp", "0", "--no-think", "--json",
                 "--max-tokens", "24", *args, "Count: 1 2 3 4 5 6 7 8")  # fmt: skip


def test_speculate_draft_finds_the_draft_on_disk(target, draft_on_disk):
    plain = chat_json(target, "--speculate", "off")
    assert plain.returncode == 0, plain.stderr
    r = chat_json(target, "--speculate", "draft")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "draft model" in line]
    assert len(notes) == 1 and "tiny-draft (original" in notes[0], r.stderr
    got, want = json.loads(r.stdout), json.loads(plain.stdout)
    assert got["answer"] == want["answer"]  # exact: the same greedy output
    spec = got["speculation"]
    assert spec["method"] == "draft" and spec["drafted"] > 0, spec
    # auto on this tiny target stays as before (a draft pays only for 4B+ on a GPU)
    auto = chat_json(target)
    assert auto.returncode == 0 and "draft model" not in auto.stderr, auto.stderr
    assert json.loads(auto.stdout)["answer"] == want["answer"]
    assert json.loads(auto.stdout).get("speculation", {}).get("method") != "draft"


def test_speculate_draft_with_nothing_on_disk_is_one_line(target):
    r = chat_json(target, "--speculate", "draft")
    assert r.returncode == 2 and r.stdout == "", r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--speculate draft needs --draft MODEL" in lines[0]
    assert "sharing" in lines[0] and "on disk" in lines[0], lines[0]


def test_auto_finds_the_draft_only_for_a_big_dense_target_on_a_gpu(tmp_path, draft_on_disk):
    """find_draft as the CLI asks it, in a fresh process (the HF cache is read at import):
    an 8B-shaped target (config only: a draft's choice reads no weights) gets the draft on a
    GPU and nothing on a CPU."""
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({**DENSE, **CONFIGS["qwen3-8b"]}))
    probe = (
        "import sys\nfrom pathlib import Path\nfrom qwen3_chat.hub.drafts import find_draft\n"
        "for gpu in (True, False):\n"
        "    c = find_draft('big', Path(sys.argv[1]), 4, auto=True, gpu=gpu)\n"
        "    print(c and (c.draft.name, c.draft.bits))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(big)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["('tiny-draft', 16)", "None"], out.stdout
