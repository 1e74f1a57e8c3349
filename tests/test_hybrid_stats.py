"""/stats on a hybrid model shows the session's snapshots (count and memory); not on Qwen3."""

from __future__ import annotations

import pytest
from hybrid_checkpoints import make_hybrid
from pty_term import Term

from qwen3_chat import ChatSession, SamplingParams
from qwen3_chat.cli.commands import snapshot_line
from qwen3_chat.cli.models import human_size
from qwen3_chat.weights.loader import load

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hybrid_folder(qwen3_tokenizer_dir, tmp_path_factory):
    path, _ = make_hybrid("qwen3_next", tmp_path_factory.mktemp("hst") / "ckpt",
                          tokenizer_dir=qwen3_tokenizer_dir, vocab_size=151936,
                          tie_word_embeddings=True)  # fmt: skip
    return path


def _one_turn(model, tok) -> ChatSession:
    s = ChatSession(model, tok, sampling=SamplingParams(temperature=0), max_tokens=3, budget=2)
    list(s.send("Hello there"))
    return s


def test_snapshot_line_states_the_points_and_their_memory(hybrid_folder, tiny):
    s = _one_turn(*load(hybrid_folder))
    snaps = s.snapshots
    assert snaps.points and snaps.nbytes > 0
    line = snapshot_line(snaps)
    assert f"snapshots: {len(snaps.points)} of at most {snaps.max_count}" in line
    assert human_size(snaps.nbytes) in line
    assert line.endswith(", ".join(str(o) for o, _ in snaps.points))
    assert snapshot_line(_one_turn(*tiny).snapshots) is None  # attention only: nothing to say


def test_stats_in_a_terminal_shows_snapshots(hybrid_folder, tmp_path):
    term = Term(["-m", str(hybrid_folder), "--temp", "0", "--max-tokens", "3", "--budget", "2"],
                tmp_path / "state")  # fmt: skip
    term.prompt()
    term.ask("Hello there")
    for line, reply in [("/stats", r"snapshots: \d of at most 6 · [\d.]+ [KM]?B · at tokens \d"),
                        ("/exit", "$")]:  # fmt: skip
        term.send(line)
        term.expect(reply)
    assert term.close() == 0
