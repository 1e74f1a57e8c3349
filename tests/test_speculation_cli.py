"""--speculate in the chat, beyond the first model: it survives /load and /model (resolved
again for the new model), and auto's draft from disk that fails is a note, never an exit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import REAL_VOCAB, make_checkpoint, tiny_config
from pty_term import Term, make_never_model
from test_drafts import DRAFT_REPO, draft_on_disk, target  # noqa: F401 (fixtures)

from qwen3_chat.cli.speculation import SpeculationRequest, resolve

ASK = "Copy this: 12 + 30 = 42, 12 + 30 = 42, 12 + 30 = 42"


@pytest.fixture(scope="module")
def models(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """A folder of tiny models with the real vocabulary, named shortly (the REPL runs there,
    so its notes fit a line): `mtp` and `mtp2`, hybrids with an MTP head; `dense`, without."""
    pytest.importorskip("torch")
    from hybrid_checkpoints import make_hybrid
    from test_mtp import add_mtp

    root = tmp_path_factory.mktemp("models")
    make_never_model(root / "never", qwen3_tokenizer_dir).rename(root / "dense")
    path, _ = make_hybrid("qwen3_next", root / "mtp", seed=8, tokenizer_dir=qwen3_tokenizer_dir,
                          vocab_size=REAL_VOCAB, tie_word_embeddings=False)  # fmt: skip
    add_mtp(path, mostly_right=True, damp=0.3)
    shutil.copytree(path, root / "mtp2")
    return root


def stats(term: Term) -> str:
    """What /stats says about the last answer."""
    term.send("/stats")
    term.expect(r"finish \w+")
    return term.seen


def saved(term: Term, name: str) -> list[dict]:
    term.send(f"/save {name}")
    term.expect("saved")
    return json.loads((Path(term.child.cwd) / name).read_text())["messages"]


def run_chat(models: Path, state: Path, speculate: str) -> tuple[list[str], list[dict]]:
    """Two turns, /load of the saved conversation, a third turn, /model mtp2, a fourth:
    the /stats after each turn and the conversation."""
    term = Term(["-m", "mtp", "--temp", "0", "--no-think", "--max-tokens", "12",
                 "--speculate", speculate], state, cwd=models)  # fmt: skip
    term.prompt()
    seen = []
    for step in ("ask", "ask", "load", "ask", "model", "ask"):
        if step == "load":
            saved(term, f"{speculate}.json")
            term.send(f"/load {speculate}.json")
            term.expect("loaded")
        elif step == "model":
            term.send("/model mtp2")
            term.expect("now chatting with mtp2")
        else:
            term.ask(f"{ASK} ({len(seen)})")
            seen.append(stats(term))
    messages = saved(term, f"{speculate}-end.json")
    term.send("/exit")
    assert term.close() == 0
    return seen, messages


def test_speculation_goes_on_after_load_and_model_and_says_what_plain_says(tmp_path, models):
    seen, messages = run_chat(models, tmp_path / "a", "mtp")
    for i, text in enumerate(seen):  # turn 3 follows /load, turn 4 /model
        assert "speculation (mtp): " in text, (i, text)
    assert "Traceback" not in "".join(seen)
    accepted = [int(n) for n in re.findall(r"speculation \(mtp\): (\d+) of", "".join(seen))]
    assert sum(accepted) > 0  # the head's drafts were kept: the comparison below means something
    plain_seen, plain = run_chat(models, tmp_path / "b", "off")
    assert not any("speculation" in s for s in plain_seen)
    assert messages == plain  # exact: the same greedy answers in every turn


def test_model_without_what_was_asked_is_one_note_and_the_chat_goes_on(tmp_path, models):
    term = Term(["-m", "mtp", "--temp", "0", "--no-think", "--max-tokens", "8",
                 "--speculate", "mtp"], tmp_path / "state", cwd=models)  # fmt: skip
    term.prompt()
    term.ask(ASK)
    assert "speculation (mtp): " in stats(term)
    term.send("/model dense")
    term.expect("now chatting with dense")
    term.prompt()
    assert term.seen.count("speculation off for dense: ") == 1, term.seen
    assert "MTP head" in term.seen and "Traceback" not in term.seen
    term.ask("And now?")
    assert "speculation" not in stats(term)
    term.send("/model mtp")  # back to a model with a head: mtp again, as asked
    term.expect("now chatting with mtp")
    term.prompt()
    assert "speculation off" not in term.seen
    term.ask("Once more?")
    assert "speculation (mtp): " in stats(term)
    term.send("/exit")
    assert term.close() == 0


def test_a_draft_model_that_still_fits_is_kept_and_one_that_does_not_is_a_note(
        models, tmp_path, qwen3_tokenizer_dir):  # fmt: skip
    """`--draft` across /model: the same draft, not loaded again, for another target with its
    vocabulary; for the demo (its own 512-token vocabulary) speculation is off, with why."""
    from qwen3_chat.hub.open import open_model

    draft = tiny_config(vocab_size=REAL_VOCAB, tie_word_embeddings=True, hidden_size=8,
                        intermediate_size=16, num_hidden_layers=1)  # fmt: skip
    make_checkpoint(tmp_path / "draft", draft, seed=3, tokenizer_dir=qwen3_tokenizer_dir)
    shutil.copytree(models / "dense", tmp_path / "dense2")
    request = SpeculationRequest("draft", str(tmp_path / "draft"))
    first, note = resolve(request, open_model(str(models / "dense")), strict=True)
    assert first.method == "draft" and first.draft_model is not None and note is None
    again, note = resolve(request, open_model(str(tmp_path / "dense2")), strict=False)
    assert note is None and again.draft_model is first.draft_model  # kept, not reloaded
    off, note = resolve(request, open_model("demo"), strict=False)
    assert off is None and note.startswith("speculation off for demo: ")
    assert "vocabulary" in note


# -- auto's draft from disk ------------------------------------------------------------------
# On this CPU auto never drafts with a model (hub.drafts.draft_pays: a GPU and a 4B+ target).
# The chat below is told it runs on a GPU and that the tiny target is worth a draft; the
# choice from disk, the load, the check and the fallback are the real ones.
AS_ON_A_GPU = """
import sys
import qwen3_chat.cli.speculation as speculation
import qwen3_chat.hub.drafts as drafts
speculation.on_gpu = lambda: True
drafts.draft_pays = lambda target, gpu: True
from qwen3_chat.cli.app import main
sys.argv = ["qwen3", *sys.argv[1:]]
main()
"""


def corrupt_keeping_the_stamp(draft_repo: str) -> None:
    """Garbage in the verified draft's weights, size and mtime kept: the marker still vouches
    for the file (a disk error, or a tool that wrote it in place after verification)."""
    root = Path(os.environ["HF_HOME"]) / "hub" / ("models--" + draft_repo.replace("/", "--"))
    blob = next((root / "snapshots").glob("*/model.safetensors")).resolve()
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    data[:8] = b"\xff" * 8  # the header length: far past the end of the file
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_autos_draft_that_does_not_load_is_one_note_and_the_chat_answers(
        draft_on_disk, target):  # noqa: F811 (fixtures)
    corrupt_keeping_the_stamp(DRAFT_REPO)
    args = ["chat", "-m", str(target), "--temp", "0", "--no-think", "--json",
            "--max-tokens", "8", "Count: 1 2 3 4 5 6 7 8"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", AS_ON_A_GPU, *args], capture_output=True,
                       text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("note: not drafting with tiny-draft: "), lines
    assert "Traceback" not in r.stderr
    plain = subprocess.run([sys.executable, "-m", "qwen3_chat", *args, "--speculate", "off"],
                           capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert json.loads(r.stdout)["answer"] == json.loads(plain.stdout)["answer"]
