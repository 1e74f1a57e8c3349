"""The shipped demo model: a real Qwen3 folder that loads, thinks, answers and stops."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import pytest

from qwen3_chat import ChatSession, SamplingParams, load
from qwen3_chat.demo import DEMO_MODEL_DIR, data, train
from qwen3_chat.engine.events import AnswerText, Finished, ReasoningText, ThinkingDone

MAX_FOLDER_BYTES = 4 * 1024**2


@pytest.fixture(scope="module")
def demo():
    if not (DEMO_MODEL_DIR / "model.safetensors").exists():
        pytest.fail(
            f"demo model missing: run python -m qwen3_chat.demo.train --out {DEMO_MODEL_DIR}"
        )
    return load(DEMO_MODEL_DIR)


def test_folder_is_small_hf_qwen3_layout():
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names  # fmt: skip
    assert sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir()) <= MAX_FOLDER_BYTES
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["tie_word_embeddings"] is True
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    tcfg = json.loads((DEMO_MODEL_DIR / "tokenizer_config.json").read_text())
    special = {v["content"]: v["special"] for v in tcfg["added_tokens_decoder"].values()}
    # Marked as Qwen3 marks them: the think tags survive skip_special_tokens.
    assert special == {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True,
                       "<think>": False, "</think>": False}  # fmt: skip
    weights = mx.load(str(DEMO_MODEL_DIR / "model.safetensors"))
    assert "model.layers.0.self_attn.q_norm.weight" in weights  # QK-norm, HF names
    assert all(v.dtype == mx.float16 for v in weights.values())


def test_template_renders_qwen3_format(demo):
    _, tok = demo
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
    ]
    text = tok.apply_chat_template(msgs, enable_thinking=False)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tok.apply_chat_template(msgs).endswith("<|im_start|>assistant\n")
    ids = tok.encode("unseen wörds ✓ <think>")
    assert tok.decode(ids) == "unseen wörds ✓ <think>" and ids[-1] == tok.think_start_id


def test_thinking_mode_thinks_then_answers_and_stops(demo):
    model, tok = demo
    out = train.reply(model, tok, "What is 23 + 14?", thinking=True)
    assert out.startswith("<think>")
    reasoning, _, answer = out.partition("</think>")
    assert len(reasoning) > len("<think>\n") and answer.strip().removesuffix("<|im_end|>").strip()
    assert out.endswith("<|im_end|>")


def test_non_thinking_mode_answers_directly(demo):
    model, tok = demo
    out = train.reply(model, tok, "What is 23 + 14?", thinking=False)
    assert "<think>" not in out and "</think>" not in out
    assert out.endswith("<|im_end|>") and len(out) > len("<|im_end|>")


def test_chat_session_events_with_soft_switch(demo):
    model, tok = demo
    session = ChatSession(model, tok, sampling=SamplingParams(temperature=0), max_tokens=120)
    events = list(session.send("What is 31 + 45?"))
    assert any(isinstance(e, ReasoningText) for e in events)
    assert any(isinstance(e, ThinkingDone) for e in events)
    done = events[-1]
    assert isinstance(done, Finished) and done.stats.finish_reason == "stop"
    assert done.answer.strip() and done.reasoning.strip()
    # Second turn with the soft switch: no reasoning, still an answer.
    events = list(session.send("Compute 8 * 7 /no_think"))
    assert not any(isinstance(e, ReasoningText) for e in events)
    assert any(isinstance(e, AnswerText) for e in events)
    assert events[-1].stats.finish_reason == "stop"


def test_data_and_tokenizer_are_deterministic():
    a, b = data.generate(300, seed=3), data.generate(300, seed=3)
    assert [x.messages for x in a] == [x.messages for x in b]
    assert [x.messages for x in data.generate(300, seed=4)] != [x.messages for x in a]
    tok_a, tok_b = data.train_tokenizer(a, 300), data.train_tokenizer(b, 300)
    chat_a, chat_b = data.chat_tokenizer(tok_a), data.chat_tokenizer(tok_b)
    enc_a = [data.encode_example(chat_a, x) for x in a[:50]]
    assert enc_a == [data.encode_example(chat_b, x) for x in b[:50]]
    ids, mask = enc_a[0]
    # Loss only on the reply, which ends with <|im_end|>.
    assert 0 < sum(mask) < len(ids) and ids[-1] == chat_a.im_end_id and mask[-1] == 1
    reply = chat_a.decode([i for i, m in zip(ids, mask, strict=True) if m])
    last = a[0].messages[-1]
    assert last["content"] in reply and (last["reasoning_content"] or "") in reply


def test_reasoning_traces_are_correct_arithmetic():
    for ex in data.generate(200, seed=5):
        for m in re.finditer(r"So (\d+) \+ (\d+) = (\d+)\.", ex.messages[-1]["reasoning_content"]):
            x, y, z = map(int, m.groups())
            assert x + y == z


def test_training_loop_smoke(tmp_path):
    cfg = train.TrainConfig(examples=64, vocab_size=300, batch_size=4, steps=2, warmup=1)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "head_dim": 8}
    stats = train.train(cfg, tmp_path / "m", log=lambda *_: None, model_config=small)
    assert stats["final_loss"] > 0
    model, tok = load(tmp_path / "m")  # what train writes, our loader reads
    assert model.config.hidden_size == 32 and tok.vocab_size == 300


def test_mlx_lm_loads_it_and_agrees(demo):
    """The folder is a normal checkpoint: mlx-lm (our reference) loads it, same logits."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    model, tok = demo
    ref_model, ref_tok = mlx_lm_utils.load(str(DEMO_MODEL_DIR))
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}])
    ids = tok.encode(text)
    assert ref_tok.encode(text, add_special_tokens=False) == ids
    x = mx.array([ids], dtype=mx.int32)
    ours, ref = model(x), ref_model(x).astype(mx.float32)
    # mlx-lm computes in the stored float16, we in float32: close, same greedy tokens.
    assert mx.allclose(ours, ref, atol=5e-2, rtol=1e-2).item()
    assert (ours.argmax(-1) == ref.argmax(-1)).all().item()
