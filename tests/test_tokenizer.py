"""Tokenizer and chat template against the real Qwen3 files, with transformers as reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3_chat.chat.tokenizer import Tokenizer
from qwen3_chat.errors import TokenizerError

RELEASE_CONFIG = "extras/tokenizer_config.release-2025-04-30.json"


@pytest.fixture(scope="session")
def tok(qwen3_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(qwen3_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_tok(qwen3_tokenizer_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(qwen3_tokenizer_dir), local_files_only=True
    )


def _folder(src: Path, dst: Path, **replace: str) -> Path:
    """A copy of the tokenizer folder (big files symlinked) with some files replaced or removed."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in replace:
            (dst / f.name).symlink_to(f)
    for name, text in replace.items():
        if text is not None:
            (dst / name).write_text(text, encoding="utf-8")
    return dst


# ---------------------------------------------------------------- chat template parity

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city <b>now</b> & later",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "e.g. 北京"}},
            "required": ["city"],
        },
    },
}
TOOL_CALL = {
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
}
TOOL_CALL_STR = {
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}

U = {"role": "user", "content": "What is 2+2?"}
A = {"role": "assistant", "content": "4"}
SYS = {"role": "system", "content": "You are a terse assistant.\nAnswer in one line."}
A_THINK = {"role": "assistant", "content": "<think>\nAdd them: 4.\n</think>\n\nIt is 4."}
A_REASON = {"role": "assistant", "content": "It is 4.", "reasoning_content": "Simple sum."}

# (messages, kwargs) pairs; kwargs go to both implementations.
CONVERSATIONS: list[tuple[list[dict], dict]] = [
    ([U], {}),
    ([U], {"enable_thinking": False}),
    ([U], {"add_generation_prompt": False}),
    ([SYS, U], {}),
    ([SYS, U], {"enable_thinking": False}),
    ([U, A, {"role": "user", "content": "And 3+3?"}], {}),
    ([U, A], {"add_generation_prompt": False}),
    ([SYS, U, A_THINK, {"role": "user", "content": "Why?"}], {}),
    ([U, A_THINK], {"add_generation_prompt": False}),
    ([U, A_REASON, {"role": "user", "content": "More?"}], {}),
    ([U, A_REASON], {"add_generation_prompt": False}),
    ([U, {"role": "assistant", "content": "<think>old</think>new", "reasoning_content": "r"}], {}),
    ([U, {"role": "assistant", "content": "x", "thinking": "via the thinking alias"}], {}),
    ([{"role": "user", "content": "Think hard /think"}], {}),
    ([{"role": "user", "content": "Quick answer /no_think"}], {}),
    (
        [{"role": "user", "content": "/no_think hi"}, A, {"role": "user", "content": "/think why"}],
        {},
    ),
    ([{"role": "user", "content": "  spaced \n\n lines \t"}], {"enable_thinking": True}),
    ([{"role": "user", "content": '你好，世界 🦙 <tag> & "quotes"'}], {}),
    ([{"role": "user", "content": "Weather in Zürich?"}], {"tools": [WEATHER_TOOL]}),
    (
        [SYS, {"role": "user", "content": "Weather?"}],
        {"tools": [WEATHER_TOOL], "enable_thinking": False},
    ),
    (
        [
            {"role": "user", "content": "Weather in Zürich and Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL, TOOL_CALL_STR]},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "tool", "content": '{"temp": 9}'},
        ],
        {"tools": [WEATHER_TOOL]},
    ),
    (
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "<think>\nsunny\n</think>\n\nSunny."},
            {"role": "user", "content": "Thanks"},
        ],
        {"tools": [WEATHER_TOOL]},
    ),
    ([{"role": "user", "content": [{"type": "text", "text": "list content"}]}], {}),
    ([U, {"role": "assistant", "content": "a"}, U, {"role": "assistant", "content": "b"}], {}),
]

# Cases with content=None / list content, which only Qwen's later template renders.
NON_STRING_CASES = (21, 22)


@pytest.fixture(scope="session")
def release_pair(qwen3_tokenizer_dir: Path, tmp_path_factory, hf_tok):
    """Ours and transformers' tokenizer on the release-day (2025-04-30) template."""
    from transformers import AutoTokenizer

    release = (qwen3_tokenizer_dir / RELEASE_CONFIG).read_text(encoding="utf-8")
    dst = tmp_path_factory.mktemp("release") / "tok"
    folder = _folder(qwen3_tokenizer_dir, dst, **{"tokenizer_config.json": release})
    return Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(
        str(folder), local_files_only=True
    )


@pytest.mark.parametrize("version", ["current", "release"])
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(request, tok, hf_tok, version, case):
    ours, ref = (tok, hf_tok) if version == "current" else request.getfixturevalue("release_pair")
    messages, kwargs = CONVERSATIONS[case]
    kwargs = {"add_generation_prompt": True, **kwargs}
    try:
        expected = ref.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # the release template cannot render non-string content: nor can we
        with pytest.raises(TokenizerError, match="chat template"):
            ours.apply_chat_template(messages, **kwargs)
        assert case in NON_STRING_CASES and version == "release", e
        return
    assert ours.apply_chat_template(messages, **kwargs) == expected


def test_template_versions_differ_where_qwen_changed_them(tok, release_pair):
    # Qwen's later template accepts non-string content; the release-day one fails on it.
    old = release_pair[0]
    conv = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert tok.apply_chat_template(conv) == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TokenizerError, match="startswith"):
        old.apply_chat_template(conv)
    plain = [SYS, U, A_REASON, {"role": "user", "content": "more"}]
    assert old.apply_chat_template(plain) == tok.apply_chat_template(plain)


def test_thinking_switch_and_history_stripping(tok):
    on = tok.apply_chat_template([U])
    off = tok.apply_chat_template([U], enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n")
    assert off == on + "<think>\n\n</think>\n\n"
    history = tok.apply_chat_template([U, A_THINK, {"role": "user", "content": "ok"}])
    assert "Add them" not in history and "It is 4." in history


# Exercises the environment settings Qwen's own template does not: indented block tags
# (lstrip_blocks), trim_blocks, loop controls, namespace, dict(), {% generation %}, tojson
# options, strftime_now, special-token variables and None-valued keys.
ENV_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ m.role }}|{{ m.content | tojson }}|{{ m.tool_calls is defined }}|{{ eos_token }}]
    {% if ns.n > 2 %}{% break %}{% endif %}
{% endfor %}
{% generation %}{{ dict(a=1, b=[1, 2]) | tojson(indent=2, sort_keys=true) }}{% endgeneration %}
{{ strftime_now('%Y') }}{% if add_generation_prompt %}GO{% endif %}"""


def test_chat_template_jinja_file_wins(qwen3_tokenizer_dir, tmp_path, hf_tok):
    from transformers import AutoTokenizer

    jinja = ENV_TEMPLATE
    folder = _folder(qwen3_tokenizer_dir, tmp_path / "tok", **{"chat_template.jinja": jinja})
    ours = Tokenizer.from_dir(folder)
    ref = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    msgs = [
        {"role": "user", "content": "<a> & é", "tool_calls": None},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "x", "tool_calls": []},
        {"role": "user", "content": "y"},
        {"role": "user", "content": "past the break"},
    ]
    got = ours.apply_chat_template(msgs)
    assert got == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert got.startswith('[user|"<a> & é"|False|<|im_end|>]\n[assistant|"x"|True|')
    assert "hidden" not in got and "past the break" not in got and got.endswith("GO")


def test_the_real_extras_jinja_equals_the_config_template(qwen3_tokenizer_dir, tmp_path, tok):
    jinja = (qwen3_tokenizer_dir / "extras" / "chat_template.jinja").read_text(encoding="utf-8")
    folder = _folder(qwen3_tokenizer_dir, tmp_path / "tok", **{"chat_template.jinja": jinja})
    other = Tokenizer.from_dir(folder)
    assert other.chat_template == jinja
    conv = [SYS, U, A_REASON, {"role": "user", "content": "next"}]
    assert other.apply_chat_template(conv) == tok.apply_chat_template(conv)


RAISING = (
    "{% if messages[0].role != 'user' %}{{ raise_exception('bad role: ' + messages[0].role) }}"
)
RAISING += "{% endif %}"


def _write(path: Path, text: str) -> None:
    path.unlink()
    path.write_text(text, encoding="utf-8")


def test_template_errors_are_tokenizer_errors(qwen3_tokenizer_dir, tmp_path, tok):
    folder = _folder(qwen3_tokenizer_dir, tmp_path / "tok", **{"chat_template.jinja": RAISING})
    with pytest.raises(TokenizerError, match="chat template: bad role: assistant"):
        Tokenizer.from_dir(folder).apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(TokenizerError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(TokenizerError, match="message 0"):
        tok.apply_chat_template(["hello"])
    # The sandbox blocks attribute escapes; the error names the template.
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    _write(folder / "chat_template.jinja", evil)
    with pytest.raises(TokenizerError, match="chat template"):
        Tokenizer.from_dir(folder).apply_chat_template([U])
    ns = "{% set n = namespace(_x=1) %}{{ n._x }}"
    _write(folder / "chat_template.jinja", ns)
    with pytest.raises(TokenizerError, match="underscore"):
        Tokenizer.from_dir(folder).apply_chat_template([U])


# ---------------------------------------------------------------- encode / decode parity

TEXTS = [
    "Hello world",
    " Hello World!",
    "你好，世界！我想在apple工作1314151天～",
    "日本語のテキストと한국어 텍스트",
    "emoji 🦙🚀😶‍🌫️ ✅ 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "    leading spaces\n\n\n\n   \t\t  trailing   \r\n\r\nCRLF",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|endoftext|>",
    "inline <think>x</think> and <tool_call>{}</tool_call> and <|im_end|>text",
    "e\u0301cole cafe\u0301 A\u030a n\u0303",  # decomposed accents: NFC composes them
    "Ελληνικά Русский العربية עברית हिन्दी",
    "numbers 1234567890 3.14159 1e-10 0xFF",
    "'s 't 're 've 'm 'll 'd 'S 'T don't I'M",
    "\u00a0nbsp\u2009thin\u3000ideographic space",
    "a" * 300 + " " + "ab" * 100,
    "",
    "\ufffd replacement and \x00 null \x7f del",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_nfc_and_special_tokens_inline(tok):
    assert tok.encode("e\u0301") == tok.encode("é")
    ids = tok.encode("a<|im_end|>b<think>")
    assert tok.im_end_id in ids and tok.think_start_id in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab<think>"  # <think> is not "special"


def test_llama_cpp_vectors(qwen3_tokenizer_dir, tok):
    data = qwen3_tokenizer_dir / "testdata"
    texts = (data / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8")
    texts = texts.split("\n__ggml_vocab_test__\n")[:-1]
    expected = (data / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(texts) == len(expected) == 46
    for text, line in zip(texts, expected, strict=True):
        assert tok.encode(text) == [int(i) for i in line.split()], text


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(TokenizerError):
        tok.decode([-1])
    with pytest.raises(TokenizerError):
        tok.decode(["a"])  # type: ignore[list-item]
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# ---------------------------------------------------------------- streaming detokenizer


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    d = tok.detokenizer()
    return [d.add(i) for i in ids] + [d.flush()]


def _single_byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    return [_BYTE_IDS(tok)[b] for b in data]


def _BYTE_IDS(tok: Tokenizer) -> dict[int, int]:  # noqa: N802 - cached table
    if not hasattr(tok, "_test_byte_ids"):
        table = {}
        for i in range(tok.vocab_size):
            raw = tok.token_bytes(i)
            if raw is not None and len(raw) == 1:
                table.setdefault(raw[0], i)
        tok._test_byte_ids = table  # type: ignore[attr-defined]
    return tok._test_byte_ids  # type: ignore[attr-defined]


# A ZWJ sequence, a combining accent and a real U+FFFD next to plain ASCII and specials.
CHARS = ["a", "b", " ", ",", "\n", "\t", "中", "文", "日", "🦙", "🚀", "😶\u200d🌫\ufe0f", "e\u0301"]
CHARS += ["Ä", "Ω", "\ufffd", "<think>", "<|im_end|>"]
TEXT_ALPHABET = st.sampled_from(CHARS)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(
        st.tuples(st.lists(TEXT_ALPHABET, max_size=6).map("".join), st.booleans()), max_size=8
    ),
    noise=st.lists(st.integers(0, 255), max_size=4),
)
def test_any_split_reassembles_exactly(tok, pieces, noise):
    # Mix whole-text tokens with byte-by-byte tokens (splitting UTF-8 characters), then raw bytes.
    ids: list[int] = []
    for text, by_bytes in pieces:
        ids += _single_byte_ids(tok, text.encode("utf-8")) if by_bytes else tok.encode(text)
    clean_text = tok.decode(ids)
    ids += _single_byte_ids(tok, bytes(noise))
    out = _stream(tok, ids)
    assert "".join(out) == tok.decode(ids)
    if not noise and "\ufffd" not in clean_text:
        assert all("\ufffd" not in piece for piece in out)  # never half a character


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids=st.lists(st.integers(0, 151700), max_size=12))
def test_arbitrary_ids_reassemble(tok, ids):
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_stream_emits_as_soon_as_a_character_completes(tok):
    llama = _single_byte_ids(tok, "🦙".encode())
    d = tok.detokenizer()
    assert [d.add(i) for i in llama] == ["", "", "", "🦙"]
    # A real U+FFFD character is text like any other: emitted at once, not held back.
    fffd = tok.encode("\ufffd")
    assert [d.add(i) for _ in range(3) for i in fffd][-1] == "\ufffd"
    assert d.flush() == ""


def test_stream_window_stays_small(tok):
    # 2,000 tokens, a third of them splitting characters: the pending window never grows.
    ids = _single_byte_ids(tok, ("中文 " * 200).encode()) + tok.encode("🦙 x" * 300)
    d = tok.detokenizer()
    sizes = []
    for i in ids:
        d.add(i)
        sizes.append(len(d._pending))
    assert max(sizes) <= 3


# ---------------------------------------------------------------- special ids and files


def test_special_ids_come_from_the_files(tok, hf_tok):
    assert tok.think_start_id == hf_tok.convert_tokens_to_ids("<think>")
    assert tok.think_end_id == hf_tok.convert_tokens_to_ids("</think>")
    assert tok.im_end_id == hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_id == hf_tok.pad_token_id
    assert tok.vocab_size == len(hf_tok)
    assert tok.token_to_id("<|endoftext|>") == hf_tok.convert_tokens_to_ids("<|endoftext|>")
    gen = json.loads(Path(hf_tok.name_or_path, "generation_config.json").read_text())
    assert tok.eos_ids == frozenset(gen["eos_token_id"]) | {hf_tok.eos_token_id}


def test_eos_ids_follow_generation_config(qwen3_tokenizer_dir, tmp_path):
    gen = json.loads((qwen3_tokenizer_dir / "generation_config.json").read_text())
    gen["eos_token_id"] = [151643, 151666]
    folder = _folder(
        qwen3_tokenizer_dir, tmp_path / "tok", **{"generation_config.json": json.dumps(gen)}
    )
    # eos_token of tokenizer_config (<|im_end|>) is always added.
    assert Tokenizer.from_dir(folder).eos_ids == frozenset({151643, 151666, 151645})


def test_eos_falls_back_to_config_json(qwen3_tokenizer_dir, tmp_path):
    folder = _folder(qwen3_tokenizer_dir, tmp_path / "tok", **{"generation_config.json": None})
    _write(folder / "config.json", json.dumps({"eos_token_id": 151643}))
    assert Tokenizer.from_dir(folder).eos_ids == frozenset({151643, 151645})


def test_think_ids_are_looked_up_not_constants(qwen3_tokenizer_dir, tmp_path):
    # Rebuild tokenizer.json with <think> at another id: the attribute must follow it.
    data = json.loads((qwen3_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for t in data["added_tokens"]:
        if t["content"] in ("<think>", "</think>"):
            t["content"] = t["content"].replace("think", "reason")
    folder = _folder(qwen3_tokenizer_dir, tmp_path / "tok", **{"tokenizer.json": json.dumps(data)})
    other = Tokenizer.from_dir(folder)
    assert other.think_start_id is None  # "<think>" is now ordinary text, several BPE tokens
    assert other.token_to_id("<reason>") == 151667


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer.json", None, "tokenizer.json"),
        ("tokenizer.json", "{not json", "tokenizer.json"),
        ("tokenizer_config.json", None, "tokenizer_config.json"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json"),
        ("tokenizer_config.json", '{"chat_template": 5}', "tokenizer_config.json"),
        ("generation_config.json", "{oops", "generation_config.json"),
        ("generation_config.json", '{"eos_token_id": "x"}', "generation_config.json"),
    ],
)
def test_bad_files_raise_naming_the_file(qwen3_tokenizer_dir, tmp_path, name, content, match):
    folder = _folder(qwen3_tokenizer_dir, tmp_path / "tok", **{name: content})
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_dir(folder)


def test_not_a_directory(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")
