"""The shipped demo model: a real Qwen3 folder that loads, thinks, adds right and stops."""

from __future__ import annotations

import json
import random
import re

import mlx.core as mx
import pytest

from qwen3_chat import ChatSession, SamplingParams, load
from qwen3_chat.demo import DEMO_MODEL_DIR, data, evaluate, train
from qwen3_chat.engine.events import AnswerText, Finished, ReasoningText, ThinkingDone
from qwen3_chat.engine.generate import stream_generate

MAX_FOLDER_BYTES = 4 * 1024**2
HELD_OUT_PER_MODE = 200  # a fixed sample of the held-out pairs; 60 could not tell 93% from 95%
MIN_ACCURACY = 0.95  # issue 8's bar, in each mode
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def demo():
    if not (DEMO_MODEL_DIR / "model.safetensors").exists():
        pytest.fail(
            f"demo model missing: run python -m qwen3_chat.demo.train --out {DEMO_MODEL_DIR}"
        )
    return load(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def held_out(demo) -> list[evaluate.Outcome]:
    """Greedy replies to the held-out questions, in thinking and in non-thinking mode."""
    model, tok = demo
    return evaluate.run(model, tok, HELD_OUT_PER_MODE)


def reply(demo, messages: list[dict], thinking: bool) -> str:
    """The raw greedy continuation of a conversation (with <think> and <|im_end|>)."""
    model, tok = demo
    ids = tok.encode(tok.apply_chat_template(messages, enable_thinking=thinking))
    events = stream_generate(model, tok, ids, sampling=GREEDY, max_tokens=evaluate.MAX_TOKENS)
    done = [e for e in events if isinstance(e, Finished)]
    return tok.decode(done[0].token_ids)


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


def pairs_of(questions: list[tuple[str, int, int]]) -> set[tuple[int, int]]:
    return {(a, b) for _, a, b in questions} | {(b, a) for _, a, b in questions}


@pytest.mark.parametrize(("extra", "mix"), [(False, False), (True, False), (True, True)],
                         ids=["stages_1_3", "stage_4", "stage_5_on"])  # fmt: skip
def test_held_out_and_validation_questions_are_disjoint_from_training(extra, mix):
    """No held-out or validation operand pair (in either order) or phrasing is ever used in
    training, and checkpoints are chosen on validation questions the test never asks."""
    cfg = train.TrainConfig()
    trained_pairs, trained_questions = set(), set()
    for ex in data.generate(cfg.examples, cfg.seed, extra, mix):
        for m in ex.messages:
            if m["role"] == "user":
                trained_questions.add(m["content"].strip().lower())
                nums = [int(x) for x in re.findall(r"\d+", m["content"])]
                trained_pairs.update(zip(nums, nums[1:], strict=False))
    trained_phrasings = set(data.TRAIN_PHRASINGS) | set(data.EXTRA_PHRASINGS)
    for k in data.TEST_SIZES:
        questions = data.held_out_questions(k)
        assert len(questions) == k and not pairs_of(questions) & trained_pairs
        assert not {q.strip().lower() for q, _, _ in questions} & trained_questions
        assert all(a < data.LIMIT and b < data.LIMIT for _, a, b in questions)
        assert not pairs_of(questions) & pairs_of(data.validation_questions(HELD_OUT_PER_MODE))
    # The whole test pool (`--eval -n all`, the README's numbers) holds every test sample.
    pool = data.all_held_out_questions()
    assert not pairs_of(pool) & trained_pairs
    assert not pairs_of(pool) & pairs_of(data.validation_questions(data.VALIDATION_SIZE))
    assert all(pairs_of(data.held_out_questions(k)) <= pairs_of(pool) for k in data.TEST_SIZES)
    validation = data.validation_questions(HELD_OUT_PER_MODE)
    assert len(validation) == HELD_OUT_PER_MODE and not pairs_of(validation) & trained_pairs
    assert not {q.strip().lower() for q, _, _ in validation} & trained_questions
    assert not set(data.HELD_OUT_PHRASINGS) & trained_phrasings
    assert not set(data.VALIDATION_PHRASINGS) & (trained_phrasings | set(data.HELD_OUT_PHRASINGS))
    # No trained question has the shape of an evaluation phrasing (composed ones included).
    shape = lambda q: re.sub(r"\d+", "#", q).strip().lower().rstrip("?.!").strip()  # noqa: E731
    evaluation = {shape(p.format(a=1, b=2)) for p in data.HELD_OUT_PHRASINGS}
    evaluation |= {shape(p.format(a=1, b=2)) for p in data.VALIDATION_PHRASINGS}
    assert not {shape(q) for q in trained_questions} & evaluation
    # Every extra phrasing is trained on from stage 4 on, and none before (reproducibility).
    shapes = {re.sub(r"\d+", "#", q).rstrip("?.!") for q in trained_questions}
    extra_shapes = {p.format(a="#", b="#").lower().rstrip("?.!") for p in data.EXTRA_PHRASINGS}
    assert (extra_shapes <= shapes) == extra and bool(extra_shapes & shapes) == extra


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "non_thinking"])
def test_adds_held_out_questions_right_naming_the_operands(held_out, thinking):
    rows = [o for o in held_out if o.thinking == thinking]
    wrong = [(o.question, o.reasoning, o.answer) for o in rows if not o.right]
    assert len(rows) == HELD_OUT_PER_MODE
    assert sum(o.right for o in rows) >= MIN_ACCURACY * len(rows), wrong
    # The working (reasoning, or the answer's inline columns) names a and b as given.
    misread = [(o.question, o.reasoning or o.answer) for o in rows if not o.names_operands]
    assert sum(o.names_operands for o in rows) >= MIN_ACCURACY * len(rows), misread
    if thinking:
        assert all(o.reasoning.strip() for o in rows)
        assert all(f"add {o.a} and {o.b}" in o.reasoning for o in rows if o.names_operands)
    else:
        assert not any(o.reasoning for o in rows)


def test_eval_command_prints_the_accuracy_table(capsys):
    for validation in ([], ["--validation"]):
        assert train.main(["--eval", str(DEMO_MODEL_DIR), "-n", "2", *validation]) == 0
        out = capsys.readouterr().out
        for mode in ("thinking", "non-thinking"):
            assert re.search(rf"^{mode} +\d/2 ", out, re.M), out


def test_validation_run_asks_the_validation_questions_in_both_modes(demo):
    model, tok = demo
    outcomes = evaluate.run(model, tok, 2, validation=True)
    asked = [(q, a, b) for q, a, b in data.validation_questions(2)]
    assert [(o.question, o.a, o.b, o.thinking) for o in outcomes] == [
        (*x, thinking) for thinking in (True, False) for x in asked
    ]


def test_thinking_mode_thinks_then_answers_and_stops(demo):
    out = reply(demo, [{"role": "user", "content": "What is 23 + 14?"}], thinking=True)
    assert out.startswith("<think>\n") and out.endswith("<|im_end|>")
    reasoning, _, answer = out.partition("</think>")
    assert "23" in reasoning and "14" in reasoning and "**37**" in answer


def test_non_thinking_mode_answers_directly(demo):
    out = reply(demo, [{"role": "user", "content": "What is 23 + 14?"}], thinking=False)
    assert "<think>" not in out and "</think>" not in out  # the template pre-filled them
    assert out.endswith("<|im_end|>") and "**37**" in out


def test_soft_switch_no_think_writes_an_empty_think_block(demo):
    # Rendered in thinking mode, the model itself must honour the /no_think in the message.
    out = reply(demo, [{"role": "user", "content": "What is 41 + 38? /no_think"}], thinking=True)
    assert out.startswith("<think>\n\n</think>\n\n") and "**79**" in out
    assert out.endswith("<|im_end|>")


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "non_thinking"])
@pytest.mark.parametrize("text", ["Hello!", "What is the capital of France?"])
def test_greeting_or_off_topic_gets_a_brief_polite_reply(demo, text, thinking):
    out = reply(demo, [{"role": "user", "content": text}], thinking)
    answer = out.split("</think>")[-1].removesuffix("<|im_end|>").strip()
    assert out.endswith("<|im_end|>") and "tiny demo model" in answer and len(answer) < 120
    assert "**" not in answer  # no made-up result


def test_multi_turn_context_and_system_prompt(demo):
    msgs = [
        {"role": "system", "content": "You are a patient math tutor."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": data.GREETING_REPLY},
        {"role": "user", "content": "What is 13 + 58?"},
        {"role": "assistant", "content": "13 + 58 = **71**."},
        {"role": "user", "content": "What is 27 plus 36?"},
    ]
    out = reply(demo, msgs, thinking=True)
    assert "add 27 and 36" in out and out.endswith("**63**.<|im_end|>")


def test_chat_session_events_with_soft_switch(demo):
    model, tok = demo
    session = ChatSession(model, tok, sampling=GREEDY, max_tokens=evaluate.MAX_TOKENS)
    events = list(session.send("What is 31 + 45?"))
    assert any(isinstance(e, ReasoningText) for e in events)
    assert any(isinstance(e, ThinkingDone) for e in events)
    done = events[-1]
    assert isinstance(done, Finished) and done.stats.finish_reason == "stop"
    assert "add 31 and 45" in done.reasoning and "**76**" in done.answer
    # Second turn with the soft switch: no reasoning, still an answer.
    events = list(session.send("Compute 8 + 7 /no_think"))
    assert not any(isinstance(e, ReasoningText) for e in events)
    assert "**15**" in "".join(e.text for e in events if isinstance(e, AnswerText))
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
    reply_text = chat_a.decode([i for i, m in zip(ids, mask, strict=True) if m])
    last = a[0].messages[-1]
    assert last["content"] in reply_text and (last["reasoning_content"] or "") in reply_text


def test_column_working_is_right_for_every_pair():
    """Every digit, carry and column sum the model is taught, for all pairs under 100."""
    pattern = re.compile(r"I need to add (\d+) and (\d+)\. Ones: ((\d) \+ (\d) = (\d+)(, carry 1)?)"
                         r"\. Tens: ((\d) \+ (\d)( \+ 1)? = (\d+))\. So (\d+) \+ (\d+) = (\d+)\.")
    for a in range(data.LIMIT):
        for b in range(data.LIMIT):
            m = pattern.fullmatch(data.addition_reasoning(a, b))
            assert m, data.addition_reasoning(a, b)
            x, y, ones_step, oa, ob, ones, carry, tens_step, ta, tb, plus1, tens, x2, y2, total = (
                m.groups()
            )
            assert [int(v) for v in (x, y, x2, y2)] == [a, b, a, b]
            assert (int(oa), int(ob), int(ta), int(tb)) == (a % 10, b % 10, a // 10, b // 10)
            assert int(ones) == a % 10 + b % 10 and bool(carry) == bool(plus1) == (int(ones) > 9)
            assert int(tens) == a // 10 + b // 10 + (1 if carry else 0)
            assert int(total) == a + b == int(tens) * 10 + int(ones) % 10
            # Without thinking, the answer carries the same columns inline.
            assert data.addition_answer(a, b, thinking=False) == (
                f"{a} + {b}: ones {ones_step}; tens {tens_step}. So {a} + {b} = **{a + b}**."
            )
            assert data.addition_answer(a, b, thinking=True) == f"{a} + {b} = **{a + b}**."


def test_packing_keeps_every_conversation_whole_in_fixed_rows():
    encoded = [([i] * n, [0] * (n - 2) + [1, 1]) for i, n in enumerate((5, 9, 3, 7, 8, 2), 1)]
    rows = train.pack(encoded, 12, sep=[99], pad_id=0, rng=random.Random(0))
    assert all(len(ids) == len(mask) == 12 for ids, mask in rows)
    segments = []
    for ids, mask in rows:
        # The separator and the padding are never trained on.
        assert all(m == 0 for t, m in zip(ids, mask, strict=True) if t in (0, 99))
        used = [i for i, t in enumerate(ids) if t != 0]
        assert used == list(range(len(used)))  # padding only at the end
        part: list[tuple[int, int]] = []
        for t, m in zip(ids[: len(used)] + [99], mask[: len(used)] + [0], strict=True):
            if t == 99:
                segments.append(part)
                part = []
            else:
                part.append((t, m))
    # Each conversation appears exactly once, whole, with its own mask.
    assert sorted(segments) == sorted(list(zip(*e, strict=True)) for e in encoded)


def test_training_loop_smoke(tmp_path):
    cfg = train.TrainConfig(examples=64, vocab_size=300, batch_size=2, steps=2, warmup=1)
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
