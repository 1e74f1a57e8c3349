"""The hybrid family (Qwen3-Next, Qwen3.5) split by layers across real mlx.launch ranks on
loopback: logits, snapshot rewinds and ChatSession turns equal one process's.

A hybrid model's linear layers cannot trim, so every rank keeps snapshots of its own
layers and rank 0's session rewinds them all with one command (distributed/caches.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hybrid_checkpoints import make_hybrid
from test_distributed import check_logits, launch, single

pytest.importorskip("torch")


@pytest.mark.parametrize(("arch", "ranks"), [("qwen3_next", 2), ("qwen3_5", 3)])
def test_pipeline_matches_one_process_through_every_rewind(tmp_path, arch, ranks):
    from mlx.utils import tree_flatten

    # 6 layers: linear, linear, linear, full, linear, linear -- every rank gets linear ones.
    # 512 ids: the rank script feeds token 300.
    model, _ = make_hybrid(arch, tmp_path / "m", num_hidden_layers=6, vocab_size=512)
    out = tmp_path / "out.json"
    run = launch(ranks, model, out)
    assert run.returncode == 0, run.stderr[-2000:]
    ref = single(model)
    check_logits(out, ref)
    got = {k: np.load(f"{out}.{k}.npy") for k in ("from4", "from7", "fresh")}
    # Back to a point kept inside a prefill, to one taken after it, and to empty.
    np.testing.assert_allclose(got["from4"], np.array(ref["step"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["from7"], np.array(ref["step"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["fresh"], np.array(ref["prefill"]), atol=1e-5, rtol=0)

    # Each rank holds only its layers: every tensor once, the embedding on the first rank.
    everything = dict(tree_flatten(ref["params"]))
    held = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(ranks)]
    names = [set(h["names"]) for h in held]
    assert set().union(*names) == set(everything)
    assert sum(len(n) for n in names) == len(everything)
    layer_of = [sorted({int(k.split(".")[2]) for k in n if k.startswith("model.layers.")})
                for n in names]  # fmt: skip
    assert layer_of == ([[0, 1, 2], [3, 4, 5]] if ranks == 2 else [[0, 1], [2, 3], [4, 5]])
    for h in held:
        assert h["nbytes"] == sum(everything[k].nbytes for k in h["names"])
        assert h["active"] < h["nbytes"] + 64 * 1024  # the other layers were never read


def test_chat_session_across_ranks_resumes_like_one_process(tmp_path, qwen3_tokenizer_dir):
    """Turns, /retry and /undo on 2 ranks: the same greedy tokens AND the same prefill
    counts as one process, so every turn resumed from a snapshot kept on both ranks."""
    from qwen3_chat.chat.session import ChatSession
    from qwen3_chat.chat.tokenizer import Tokenizer
    from qwen3_chat.engine.events import Finished

    model, _ = make_hybrid("qwen3_next", tmp_path / "m", seed=3, num_hidden_layers=6,
                           vocab_size=151936, tokenizer_dir=qwen3_tokenizer_dir)  # fmt: skip
    out = tmp_path / "out.json"
    run = launch(2, model, out, RETRY="1")
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(out.read_text())

    m = single(model)["m"]
    session = ChatSession(m, Tokenizer.from_dir(model), sampling_overrides={"temperature": 0.0},
                          max_tokens=8, budget=None)  # fmt: skip
    turns, prefilled = [], []
    for events in (lambda: session.send("Hello there"), lambda: session.send("And again?"),
                   session.retry, lambda: session.undo() and session.send("Something else")):
        fin = [e for e in events() if isinstance(e, Finished)][-1]
        turns.append(list(fin.token_ids))
        prefilled.append(fin.stats.prefill_tokens)
    assert got["chat"] == turns
    assert got["prefilled"] == prefilled
    # Reuse happened: turn 2 and the retry prefilled only their new tokens.
    assert prefilled[1] < 40 and prefilled[2] <= 2, prefilled
    assert len({t for turn in turns for t in turn}) > 6  # varied tokens, not one repeated


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    path, _ = make_hybrid("qwen3_next", tmp_path_factory.mktemp("hybrid") / "m", seed=3,
                          num_hidden_layers=6, vocab_size=151936,
                          tokenizer_dir=qwen3_tokenizer_dir)  # fmt: skip
    return path


@pytest.mark.parametrize("parallel", ["pipeline", "tensor"])
def test_cli_across_ranks_answers_like_one_process(tmp_path, hybrid_dir, parallel):
    from test_distributed_cli import chat, hostfile, workers_of

    one = chat(hybrid_dir)
    assert one.returncode == 0, one.stderr
    many = chat(hybrid_dir, "--hosts", str(hostfile(tmp_path, 2)), "--parallel", parallel)
    assert many.returncode == 0, many.stderr
    a, b = json.loads(one.stdout), json.loads(many.stdout)
    assert b["answer"] == a["answer"] and b["usage"] == a["usage"]
    assert len(set(a["answer"])) > 10  # varied text, not one token repeated
    assert many.stderr.strip() == ""  # tensor splits this model: no note of a fallback
    assert workers_of(hybrid_dir) == []  # every follower ended with rank 0


def test_repl_ctrl_c_then_undo_goes_back_on_every_rank(tmp_path, hybrid_dir):
    """Ctrl-C mid-answer, then /undo: every rank's linear layers go back to a snapshot (or
    to empty), and the next question gets one process's answer."""
    from pty_term import Term
    from test_distributed_cli import chat, hostfile, workers_of

    one = json.loads(chat(hybrid_dir).stdout)["answer"]
    term = Term(["-m", str(hybrid_dir), "--temp", "0", "--no-budget", "--max-tokens", "100000",
                 "--hosts", str(hostfile(tmp_path, 2))], tmp_path / "state")  # fmt: skip
    term.prompt()
    term.send("Tell me a long story")
    time.sleep(1.5)
    term.child.send("\x03")
    term.expect(r"\[interrupted\]")
    term.send("/undo")
    term.prompt()
    term.send("/set max_tokens 12")
    term.prompt()
    term.ask("Hello there")
    assert one[:12] in term.seen
    term.send("/exit")
    assert term.close() == 0
    assert workers_of(hybrid_dir) == []
