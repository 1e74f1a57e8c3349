"""ChatSession on a tiny hybrid model (Qwen3-Next layout, real Qwen3 tokenizer and
template): the linear layers cannot be trimmed, so turns resume from snapshots, and
every reuse must give the tokens a from-scratch computation gives."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TOKENIZER_FILES
from hybrid_checkpoints import make_hybrid

from qwen3_chat import ChatSession, SamplingParams
from qwen3_chat.chat.tokenizer import Tokenizer
from qwen3_chat.engine.budget import CLOSING_TEXT
from qwen3_chat.engine.events import Finished
from qwen3_chat.weights.loader import load

pytest.importorskip("torch")

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def hybrid_chat(qwen3_tokenizer_dir, tmp_path_factory):
    path, _ = make_hybrid(
        "qwen3_next",
        tmp_path_factory.mktemp("hs") / "ckpt",
        tokenizer_dir=qwen3_tokenizer_dir,
        vocab_size=151936,
        tie_word_embeddings=True,
    )
    return load(path)


def finished(events) -> Finished:
    evs = list(events)
    assert isinstance(evs[-1], Finished)
    return evs[-1]


def session(hybrid_chat, **kw) -> ChatSession:
    model, tok = hybrid_chat
    return ChatSession(model, tok, **{"sampling": GREEDY, "max_tokens": 8, **kw})


def test_turn_two_prefills_after_the_snapshot_and_matches_from_scratch(hybrid_chat):
    s = session(hybrid_chat, budget=6)
    first = finished(s.send("Hello there"))
    prompt1 = s.render(True, s.messages[:1])
    second = finished(s.send("And again?"))
    prompt2 = s.render(True, s.messages[:3])
    # The snapshot sits after the first prompt's next-to-last token.
    assert prompt2[: len(prompt1)] == prompt1
    assert second.stats.prefill_tokens == len(prompt2) - (len(prompt1) - 1)
    fresh = session(hybrid_chat, budget=6)
    fresh.load_messages(s.messages[:2])
    again = finished(fresh.send("And again?"))
    assert again.stats.prefill_tokens == len(prompt2)
    assert again.token_ids == second.token_ids
    assert first.token_ids  # the model did answer turn 1


def test_without_thinking_turn_two_resumes_after_the_last_message(hybrid_chat):
    """The non-thinking prompt ends in an empty think block that the history drops, so
    the usable snapshot is the one just after turn 1's last <|im_end|>."""
    model, tok = hybrid_chat
    s = session(hybrid_chat, thinking=False)
    finished(s.send("Hello there"))
    prompt1 = s.render(False, s.messages[:1])
    second = finished(s.send("And again?"))
    prompt2 = s.render(False, s.messages[:3])
    boundary = max(i for i, t in enumerate(prompt1) if t == tok.im_end_id) + 1
    assert prompt2[:boundary] == prompt1[:boundary] and prompt2[: len(prompt1)] != prompt1
    assert second.stats.prefill_tokens == len(prompt2) - boundary
    fresh = session(hybrid_chat, thinking=False)
    fresh.load_messages(s.messages[:2])
    assert finished(fresh.send("And again?")).token_ids == second.token_ids


def test_retry_and_undo_then_resend_reproduce_the_greedy_answer(hybrid_chat):
    s = session(hybrid_chat, thinking=False)
    a = finished(s.send("one"))
    b = finished(s.retry())
    assert b.token_ids == a.token_ids and b.stats.prefill_tokens == 1
    c = finished(s.send("two"))
    assert s.undo()
    d = finished(s.send("two"))
    assert d.token_ids == c.token_ids and d.stats.prefill_tokens == 1


def test_budget_forced_closing_keeps_the_cache_exact(hybrid_chat, qwen3_tokenizer_dir, tmp_path):
    """After the forced closing replaces a speculative step, every token the model chose
    is the argmax of a full, cache-free forward pass. The Thinking-2507 template opens
    <think> itself, so even a random model reasons until the budget cuts it."""
    model, _ = hybrid_chat
    template = qwen3_tokenizer_dir / "family" / "Qwen3-4B-Thinking-2507" / "chat_template.jinja"
    if not template.exists():
        pytest.skip(f"the Thinking-2507 template is not at {template}")
    for name in TOKENIZER_FILES:
        if (qwen3_tokenizer_dir / name).exists():
            shutil.copyfile(qwen3_tokenizer_dir / name, tmp_path / name)
    shutil.copyfile(template, tmp_path / "chat_template.jinja")
    tok = Tokenizer.from_dir(tmp_path)
    s = ChatSession(model, tok, sampling=GREEDY, capability="always", budget=3, max_tokens=90)
    fin = finished(s.send("Think a little"))
    assert fin.stats.budget_hit
    prompt = s.render(True, s.messages[:1])
    ids = prompt + list(fin.token_ids)
    logits = np.array(model(mx.array([ids]))[0])
    greedy = logits[len(prompt) - 1 : -1].argmax(axis=-1).tolist()
    # The forced closing is the only run the model did not choose; after it, every token
    # is the argmax of the cache-free pass (the cache survived the replaced step).
    closing = tok.encode(CLOSING_TEXT)
    got = list(fin.token_ids)
    start = next(i for i in range(len(got)) if got[i : i + len(closing)] == closing)
    end = start + len(closing)
    assert got[:start] == greedy[:start]
    assert got[end:] == greedy[end : len(got)]
    assert len(got) > end  # the answer after the closing was decoded


def test_ctrl_c_mid_answer_then_a_new_turn_matches_from_scratch(hybrid_chat):
    s = session(hybrid_chat, thinking=False, max_tokens=12)
    events = s.send("Tell me something")
    for _, _ in zip(range(4), events, strict=False):  # a few events, then Ctrl-C
        pass
    events.close()
    s.abort()
    nxt = finished(s.send("Go on"))
    fresh = session(hybrid_chat, thinking=False, max_tokens=12)
    fresh.load_messages(s.messages[:2])
    assert finished(fresh.send("Go on")).token_ids == nxt.token_ids
