"""REPL commands: settings, input, attachments, clipboard, history.

Logic is tested directly (settings validation, the conversation store, attachments); what
concerns the terminal runs the real `qwen3 chat` in a pseudo-terminal.
"""

from __future__ import annotations

import base64
import json
from dataclasses import fields
from pathlib import Path

import pytest
from pty_term import Term
from test_repl import QUESTION
from typer.testing import CliRunner

from qwen3_chat.cli import clipboard
from qwen3_chat.cli.attachments import read_attachment, with_attachments
from qwen3_chat.cli.repl import block_open, unquote
from qwen3_chat.cli.settings import (
    KNOBS,
    apply_setting,
    check_saved,
    parse_setting,
)
from qwen3_chat.errors import Qwen3ChatError

NOTE = "The secret number is 4242.\n"


@pytest.fixture(scope="module")
def demo():
    from qwen3_chat import load
    from qwen3_chat.demo import DEMO_MODEL_DIR

    return load(DEMO_MODEL_DIR)


def saved(data: dict | None = None, **changes) -> dict:
    base = {"version": 1, "system": None, "thinking": True, "budget": 10, "max_tokens": 64,
            "sampling": None, "capability": "hybrid", "context_length": None,
            "sampling_overrides": {}, "mode_sampling": {},
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello", "reasoning_content": "r"}]}
    return {**(data or base), **changes}


# -- settings ---------------------------------------------------------------------------------
def test_knobs_are_sampling_params_fields():
    from qwen3_chat.engine.sampling import SamplingParams

    assert KNOBS == tuple(f.name for f in fields(SamplingParams))


def test_parse_setting_accepts_good_values_and_names_bad_ones():
    assert parse_setting("temperature", "0.2") == ("temperature", 0.2)
    assert parse_setting("temp", "1") == ("temperature", 1)
    assert parse_setting("TOP_K", "40") == ("top_k", 40)
    assert parse_setting("seed", "7") == ("seed", 7)
    assert parse_setting("seed", "default") == ("seed", None)
    assert parse_setting("budget", "off") == ("budget", None)
    assert parse_setting("max_tokens", "512") == ("max_tokens", 512)
    for name, value, message in [
        ("temperature", "-1", "temperature must be >= 0"),
        ("temperature", "hot", "temperature must be a number"),
        ("top_p", "1.5", "top_p must be in"),
        ("top_k", "2.5", "top_k must be a whole number"),
        ("presence_penalty", "5", "presence_penalty must be in"),  # before: accepted
        ("seed", "-1", "seed must be"),
        ("seed", str(2**64), "seed must be"),  # before: accepted, then a traceback mid-answer
        ("colour", "red", "unknown setting"),
        ("temperature", "", "usage: /set temperature VALUE"),
    ]:
        with pytest.raises(Qwen3ChatError, match=message):
            parse_setting(name, value)


def test_apply_setting_changes_the_session_and_a_rejected_one_changes_nothing(demo):
    from qwen3_chat import ChatSession, SamplingParams

    s = ChatSession(*demo, mode_sampling={"thinking": {"top_p": 0.5}})
    apply_setting(s, "temperature", 0.2)
    apply_setting(s, "seed", 7)
    assert s.sampling_for(True) == SamplingParams(temperature=0.2, top_p=0.5, top_k=20, seed=7)
    assert s.sampling_for(False).temperature == 0.2 and s.sampling_for(False).top_p == 0.8
    apply_setting(s, "temperature", None)
    assert s.sampling_for(True).temperature == 0.6 and s.sampling_for(True).seed == 7
    apply_setting(s, "max_tokens", 5)
    apply_setting(s, "budget", None)
    assert (s.max_tokens, s.budget) == (5, None)
    fixed = ChatSession(*demo, sampling=SamplingParams(temperature=0))
    apply_setting(fixed, "top_k", 3)
    assert fixed.sampling_for(False) == SamplingParams(temperature=0, top_k=3)
    for name, text in [("max_tokens", "0"), ("max_tokens", "default"), ("budget", "-3"),
                       ("budget", "lots")]:  # fmt: skip
        with pytest.raises(Qwen3ChatError, match=f"{name} must be"):
            apply_setting(s, *parse_setting(name, text))
    assert (s.max_tokens, s.budget) == (5, None)


@pytest.mark.parametrize("name, text, rule", [
    ("budget", "abc", "budget must be a whole number >= 0, or off (got 'abc')"),
    ("budget", "-3", "budget must be a whole number >= 0, or off (got -3)"),
    ("max_tokens", "0", "max_tokens must be a whole number >= 1 (got 0)"),
    ("max_tokens", "lots", "max_tokens must be a whole number >= 1 (got 'lots')"),
])  # fmt: skip
def test_a_bad_limit_is_worded_for_the_repl(demo, name, text, rule):
    """/budget abc and /set budget -3: the REPL's words (off), not the library's None."""
    from qwen3_chat import ChatSession

    s = ChatSession(*demo, budget=7)
    with pytest.raises(Qwen3ChatError) as e:
        apply_setting(s, *parse_setting(name, text))
    assert str(e.value) == rule  # before: "... an integer >= 0 or None, not 'abc'"
    assert s.budget == 7


def test_a_saved_file_is_checked_field_by_field(demo):
    """/load and --resume: check_saved, then ChatSession.from_dict (which checks the rest)."""
    from qwen3_chat import ChatSession

    def restore(data: dict) -> ChatSession:
        check_saved(data)
        return ChatSession.from_dict(*demo, data)

    assert restore(saved()).messages[1]["reasoning_content"] == "r"
    for change, message in [
        ({"max_tokens": -5}, "max_tokens must be"),
        ({"max_tokens": 2.5}, "max_tokens must be"),
        ({"budget": True}, "budget must be"),
        ({"budget": "lots"}, "budget must be"),
        ({"thinking": "no"}, "thinking must be"),
        ({"system": 3}, "system must be"),
        ({"capability": "sometimes"}, "capability must be one of"),
        ({"context_length": 0}, "context_length must be"),
        ({"version": 9}, "unknown save version"),
        ({"sampling": {"temperature": -1}}, "sampling: bad sampling setting"),
        ({"sampling_overrides": {"top_p": "x"}}, "top_p must be a number"),
        ({"sampling_overrides": {"top_k": True}}, "top_k must be a whole number"),
        ({"sampling_overrides": {"warmth": 1}}, "unknown sampling setting"),
        ({"mode_sampling": {"dreaming": {}}}, "mode_sampling must map"),
        ({"mode_sampling": {"thinking": {"top_k": -1}}}, "mode_sampling.thinking"),
        ({"messages": "hi"}, "messages must be a list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "bad message"),
        ({"messages": [{"role": "user"}]}, "bad message"),
        ({"messages": [{"role": "user", "content": "x", "interrupted": "yes"}]}, "interrupted"),
        ({"messages": [{"role": "assistant", "content": "x", "reasoning_tokens": "\x1b[2J"}]},
         "bad message"),  # /history prints the count: only a whole number >= 0 gets there
        ({"messages": [{"role": "assistant", "content": "x", "reasoning_tokens": -4}]},
         "bad message"),
    ]:
        with pytest.raises(Qwen3ChatError, match=message):
            restore(saved(**change))
    with pytest.raises(Qwen3ChatError, match="not a saved"):
        check_saved([1, 2])


def test_every_command_is_in_help_and_completion():
    from qwen3_chat.cli.commands import COMMANDS, HANDLERS

    assert set(HANDLERS) | {"/exit", "/quit"} == set(COMMANDS)  # /help and Tab read COMMANDS


# -- input ------------------------------------------------------------------------------------
def test_triple_quote_blocks():
    assert block_open('"""') and block_open('"""\nline') and block_open('"""a\n"""b"""')
    assert not block_open('"""a""" and more') and not block_open("plain")
    assert not block_open('"""\nx = """doc"""\n"""')
    assert unquote('"""\nline one\nline two\n"""') == "line one\nline two"
    assert unquote('"""one line"""') == "one line"
    assert unquote('"""\nx = """doc"""\n"""') == 'x = """doc"""'
    code = '"""Doc."""\n\ndef f():\n    """Inner."""'
    assert unquote(code) == code and unquote('"""a""" b') == '"""a""" b'


# -- attachments ------------------------------------------------------------------------------
def test_attachments_text_only_and_within_the_context(tmp_path, qwen3_tokenizer_dir):
    from qwen3_chat.chat.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(qwen3_tokenizer_dir)
    note = tmp_path / "note.md"
    note.write_text("use ``` fences\n" + NOTE, encoding="utf-8")
    att = read_attachment(note, tok, 1000)
    assert att.name == "note.md" and att.tokens == len(tok.encode(att.text))
    assert att.text == f"note.md:\n````\nuse ``` fences\n{NOTE.rstrip()}\n````"
    assert with_attachments("Why?", [att]) == att.text + "\n\nWhy?"
    (tmp_path / "bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    for path, message in [
        (tmp_path / "bin", "not a UTF-8 text file"),
        (tmp_path / "latin1.txt", "not a UTF-8 text file"),
        (tmp_path / "missing.txt", "no such file"),
        (tmp_path, "is a folder"),
    ]:
        with pytest.raises(Qwen3ChatError, match=message):
            read_attachment(path, tok, 1000)
    with pytest.raises(Qwen3ChatError, match=rf"{att.tokens} tokens, but only 5 tokens"):
        read_attachment(note, tok, 5)


# -- clipboard --------------------------------------------------------------------------------
def fake_tool(tmp_path: Path, name: str = "wl-copy") -> tuple[Path, Path]:
    """A clipboard program that stores what it is given: (its folder, the file it writes)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "clipboard.txt"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/sh\ncat > '{out}'\n")
    (bin_dir / name).chmod(0o755)
    return bin_dir, out


def test_clipboard_tool_gets_the_text_as_an_argument_free_stdin(tmp_path, monkeypatch):
    bin_dir, out = fake_tool(tmp_path)
    text = "it's $(rm -rf /) `x` é"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    assert clipboard.copy_with_tool(text) is None  # wl-copy needs a Wayland display
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    assert clipboard.copy_with_tool(text) == "wl-copy"
    assert out.read_text(encoding="utf-8") == text
    seq = clipboard.osc52(text)
    assert seq.startswith("\x1b]52;c;") and seq.endswith("\x07")
    assert base64.b64decode(seq[7:-1]).decode() == text
    assert clipboard.osc52("x" * clipboard.OSC52_MAX) is None


# -- in the terminal --------------------------------------------------------------------------
def test_set_settings_completion_and_history(tmp_path):
    term = Term(["-m", "demo", "--temp", "0"], tmp_path / "state")
    term.prompt()
    # Tab once the completion menu is up (prompt-toolkit completes in the background).
    term.child.send("/set te")
    term.expect("temperature")
    term.child.send("\t")
    term.send(" 0.2")
    term.expect("temperature 0.2")
    for line, reply in [
        ("/set top_p 1.5", "top_p must be in"),
        ("/set max_tokens -5", "max_tokens must be a whole number >= 1"),
        ("/budget abc", r"budget must be a whole number >= 0, or off \(got 'abc'\)"),
        ("/set colour red", "unknown setting 'colour'"),
        ("/set seed 7", "seed 7"),
        ("/set budget 1024", "thinking budget 1024 tokens"),
        ("/set max_tokens 512", "max_tokens 512"),
    ]:
        term.send(line)
        term.expect(reply)
    term.expect("budget 1024 │")
    term.child.send("/setti")
    term.expect("/settings")
    term.child.send("\t")
    term.send("")
    term.expect(r"temperature 0\.2 · top_p 0\.95 · top_k 20")
    term.expect(r"temperature 0\.2 · top_p 0\.8 · top_k 20 .* seed 7")
    term.expect("max_tokens 512 · budget 1024 tokens")
    term.expect(r"system prompt\s+\(none\)")
    term.send("/set temperature default")
    term.expect("temperature back to the default")
    term.send("/set")
    term.expect(r"temperature 0\.6 · top_p 0\.95")

    term.ask(QUESTION)
    bad = tmp_path / "evil.json"
    bad.write_text(json.dumps(saved(messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "\x1b]0;pwned\x07Hello\x1b[2J there",
         "reasoning_content": "some thought"}])))  # fmt: skip
    term.send(f"/load {bad}")
    term.expect("loaded 2 messages")
    term.send("/history")
    term.expect(r"▸ reasoning, \d+ tokens · /show 1 to expand")
    term.expect(r"Hello\S* there")  # what is left of the escape sequences is inert text
    term.prompt()
    assert "\x1b]0;pwned" not in term.transcript and "\x1b[2J" not in term.transcript
    assert "some thought" not in term.seen
    term.send("/exit")
    assert term.close() == 0


def test_copy_file_and_attachments(tmp_path):
    bin_dir, clip = fake_tool(tmp_path)
    note, other = tmp_path / "note.txt", tmp_path / "other.txt"
    note.write_text(NOTE)
    other.write_text("Another file.\n")
    (tmp_path / "big.txt").write_text("twelve plus thirty " * 2000)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "WAYLAND_DISPLAY": "wayland-test"}
    term = Term(["-m", "demo", "--temp", "0", "--no-think", "-f", "note.txt"],
                tmp_path / "state", env=env, cwd=tmp_path)  # fmt: skip
    term.prompt()
    term.send("/copy")
    term.expect("no answer to copy yet")
    term.send("/file")
    term.expect("attached to the next message: note.txt")
    for name, reply in [("image.png", "not a UTF-8 text file"), ("big.txt", "tokens, but only"),
                        ("nope.txt", "no such file")]:  # fmt: skip
        term.send(f"/file {name}")
        term.expect(reply)
    term.send("/file other.txt")
    term.expect(r"attached other.txt \(\d+ tokens\) to the next message")
    term.ask(QUESTION)
    term.ask("What is 8 + 9?")
    term.send("/copy")
    term.expect(r"\x1b\]52;c;([A-Za-z0-9+/=]*)\x07")
    copied = base64.b64decode(term.child.match.group(1)).decode()
    term.expect(rf"copied {len(copied)} characters via terminal \(OSC 52\), wl-copy")
    path = tmp_path / "saves" / "c.json"  # a folder that does not exist yet: made, and said
    term.send("/save saves/c.json")  # relative to cwd (tmp_path): the line fits the screen
    term.expect(r"saved 4 messages to saves/c\.json \(created the folder saves\)")
    term.send("/exit")
    assert term.close() == 0
    msgs = json.loads(path.read_text())["messages"]
    assert msgs[0]["content"] == (f"note.txt:\n```\n{NOTE.rstrip()}\n```\n\n"
                                  f"other.txt:\n```\nAnother file.\n```\n\n{QUESTION}")  # fmt: skip
    assert msgs[2]["content"] == "What is 8 + 9?"  # attachments go with one message only
    assert copied == msgs[3]["content"] == clip.read_text()


def test_one_shot_file_attachment(tmp_path, demo):
    from qwen3_chat.cli.app import app

    note = tmp_path / "note.txt"
    note.write_text(NOTE)
    result = CliRunner().invoke(app, ["chat", "-m", "demo", "--json", "--no-think", "-f",
                                      str(note), QUESTION])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    tok = demo[1]
    expected = f"note.txt:\n```\n{NOTE.rstrip()}\n```\n\n{QUESTION}"
    prompt = tok.apply_chat_template([{"role": "user", "content": expected}],
                                     enable_thinking=False)  # fmt: skip
    assert json.loads(result.stdout)["usage"]["prompt_tokens"] == len(tok.encode(prompt))
    (tmp_path / "x.bin").write_bytes(b"\0\1\2")
    result = CliRunner().invoke(app, ["chat", "-m", "demo", "-f", str(tmp_path / "x.bin"), "hi"])
    assert result.exit_code == 1 and "not a UTF-8 text file" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["chat", "-m", "demo", "--resume", "hi"])
    assert result.exit_code == 2 and "--resume" in result.stderr
