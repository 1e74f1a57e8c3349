"""Turn N (issue 10, item 3): a rendered chat is encoded one `<|im_start|>` segment at a
time through a cache, with exactly the ids of a full encode (real Qwen3 tokenizer, many
conversations, hypothesis-made texts); the session renders and counts through it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3_chat.chat.prompt_cache import common_prefix
from qwen3_chat.chat.tokenizer import Tokenizer

# Text that stresses the boundaries: specials and their fragments, combining marks (NFC),
# CJK, emoji, runs of spaces and newlines, digits (split one by one by Qwen's regex).
PIECES = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|im_", "|>", "\u0301",
          "e\u0301", "\u00e9", "日本語", "🙂", "  ", "\n\n", "\r\n", "123456", " word", "'s",
          "\t", "<tool_call>", "user", "assistant\n"]  # fmt: skip
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=12)), max_size=12).map(
    "".join
)
roles = st.sampled_from(["user", "assistant", "system"])
messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": texts}), min_size=1, max_size=6
)
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # the tokenizer is read-only


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(qwen3_tokenizer_dir)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=texts, tail=texts)
def test_segments_encode_like_the_whole_on_any_text(tok: Tokenizer, text: str, tail: str) -> None:
    for t in (text, text + tail, "<|im_start|>" + text, text + "<|im_start|>" + tail):
        assert tok.encode_chat(t) == tok.encode(t)


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURE_OK)
@given(conv=messages, thinking=st.booleans())
def test_rendered_conversations_encode_like_the_whole(
    tok: Tokenizer, conv: list[dict], thinking: bool
) -> None:
    text = tok.apply_chat_template(conv, add_generation_prompt=True, enable_thinking=thinking)
    assert tok.encode_chat(text) == tok.encode(text)


def test_turn_n_encodes_only_its_new_messages(tok: Tokenizer) -> None:
    conv = [{"role": "system", "content": "Be brief."}]
    for t in range(12):
        conv += [{"role": "user", "content": f"Question {t}: why is the sky blue? " * 20},
                 {"role": "assistant", "content": f"Answer {t}: Rayleigh scattering. " * 40}]
        text = tok.apply_chat_template(conv, add_generation_prompt=True)
        before = len(tok._segments)
        assert tok.encode_chat(text) == tok.encode(text)
        # A new user message, a new reply and the generation prompt: nothing older again.
        assert len(tok._segments) - before <= 3


def test_common_prefix_is_exact() -> None:
    a = list(range(5000))
    assert common_prefix(a, a) == 5000
    assert common_prefix(a, a[:100]) == 100
    assert common_prefix(a, [*a[:4321], -1, *a[4322:]]) == 4321
    assert common_prefix([], a) == 0
    assert common_prefix([1], [2]) == 0


def test_session_counts_and_renders_like_a_full_encode(tiny) -> None:
    from qwen3_chat.chat.session import ChatSession

    model, tok = tiny
    s = ChatSession(model, tok, system="Be brief.", thinking=False)
    history = [{"role": "user", "content": "Hi there " * 50},
               {"role": "assistant", "content": "Hello! " * 80}]  # fmt: skip
    s.load_messages(history)

    def full(add: bool, system: str = "Be brief.") -> list[int]:
        conv = [{"role": "system", "content": system}, *history]
        return tok.encode(tok.apply_chat_template(conv, add_generation_prompt=add,
                                                  enable_thinking=False))  # fmt: skip

    assert s.render(False) == full(True)
    assert s.context_used == s.context_used == len(full(False))
    history.append({"role": "user", "content": "And again?"})
    s.load_messages(history)  # a changed conversation is counted afresh
    assert s.context_used == len(full(False))
    s.set_system("Be as long as you like, please.")
    assert s.context_used == len(full(False, "Be as long as you like, please.")) > len(full(False))
