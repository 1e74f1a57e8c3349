"""The interactive REPL in a real pseudo-terminal (pexpect), plus its small helpers."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest
from pty_term import DEMO, Term, make_never_model

from qwen3_chat.cli.commands import closest_command
from qwen3_chat.cli.conversations import write_private_json
from qwen3_chat.cli.history import history_path
from qwen3_chat.cli.repl import unquote

QUESTION = "What is 23 + 14?"


@pytest.fixture(scope="module")
def never_model(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    return make_never_model(tmp_path_factory.mktemp("never"), qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def demo_reasoning() -> str:
    from qwen3_chat import ChatSession, SamplingParams, load
    from qwen3_chat.demo import DEMO_MODEL_DIR
    from qwen3_chat.engine.events import Finished

    model, tok = load(DEMO_MODEL_DIR)
    session = ChatSession(model, tok, sampling=SamplingParams(temperature=0), budget=4096)
    return [e for e in session.send(QUESTION) if isinstance(e, Finished)][0].reasoning


def test_demo_session_think_show_no_think_budget_save_load(tmp_path, demo_reasoning):
    term = Term(["-m", "demo", "--temp", "0"], tmp_path / "state")
    term.expect(r"demo │ think │ budget 4096 │ context 0/2048")

    term.send(QUESTION)
    term.expect(r"▸ Thought for \d+ tokens \(\d+\.\d s\) · /show to expand")
    thought = int(re.search(r"Thought for (\d+)", term.seen).group(1))
    term.expect(rf" {thought} thinking · ")  # the stats line counts the same tokens
    term.expect("tok/s")
    term.prompt()

    term.send("/show")
    term.expect("reasoning of answer 1")
    term.expect(re.escape(demo_reasoning[:30]))
    term.prompt()

    term.send("/no_think")
    term.expect("thinking off")
    term.expect("no_think │ budget 4096")
    term.ask("What is 8 + 9?")
    assert "Thought for" not in term.seen and "thinking ·" not in term.seen

    term.send("/think")
    term.expect("thinking on")
    term.send("/budget 5")
    term.expect("thinking budget 5 tokens")
    term.send(QUESTION)
    term.expect("stopped by the thinking budget")
    term.expect("tok/s")
    term.prompt()

    saved = tmp_path / "chat.json"
    term.send(f"/save {saved}")
    term.expect("saved 6 messages")
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] * 3
    assert data["messages"][1]["reasoning_content"] == demo_reasoning
    assert "reasoning_content" not in data["messages"][3] and data["budget"] == 5
    assert data["messages"][1]["reasoning_tokens"] == thought  # counted once, when generated

    term.send("/clear")
    term.expect("new conversation")
    term.send("/show")
    term.expect("no answer yet")
    term.send(f"/load {saved}")
    term.expect("loaded 6 messages")
    term.expect(r"think │ budget 5 │ context [1-9]\d*/2048")
    term.send("/show 1")
    term.expect(re.escape(demo_reasoning[:30]))
    term.send("/history")  # the count the stats line said, not a re-tokenization (77 vs 79)
    term.expect(rf"▸ reasoning, {thought} tokens · /show 1 to expand")

    term.send("/stats")
    term.expect("no answer yet")  # a loaded conversation has no fresh numbers
    term.send("/retry")
    term.expect("stopped by the thinking budget")
    term.expect("tok/s")
    term.send("/stats")
    term.expect(r"finish stop · budget hit")
    term.send("/undo")
    term.expect("removed the last exchange")
    term.expect(r"context [1-9]\d*/2048")
    term.send("/system Be brief.")
    term.expect("system prompt set")
    term.send(f"/save {saved}")
    term.expect("saved 4 messages")
    assert json.loads(saved.read_text())["system"] == "Be brief."
    term.send("/help")
    term.expect("/budget N\\|off")
    term.send("/thnk")
    term.expect("did you mean /think")
    term.send("/exit")
    assert term.close() == 0


def test_context_warning_then_oldest_turns_dropped(tmp_path):
    term = Term(["-m", "demo", "--temp", "0", "--no-think", "--max-tokens", "8"],
                tmp_path / "state")  # fmt: skip
    long = "What is 12 + 30? " * 40  # ~440 tokens of the demo's 2048
    term.prompt()
    for _ in range(3):
        term.ask(long)
        term.prompt()
    term.send(long)
    term.expect(r"context \d+/2048 tokens: the oldest exchanges will be dropped soon")
    term.prompt()
    term.send(long)
    term.expect(r"dropped the \d+ oldest exchange\(s\)")
    term.expect("tok/s")
    term.send("/exit")
    assert term.close() == 0


def test_multiline_block_history_and_ctrl_c_at_prompt(tmp_path):
    state = tmp_path / "state"
    term = Term(DEMO, state)
    term.prompt()
    term.send('"""')
    term.send("What is")
    term.ask('12 + 30?"""')
    term.prompt()
    term.child.send("half a line")
    time.sleep(0.3)
    term.child.send("\x03")  # clears the line instead of quitting
    term.send("/quit")
    assert term.close() == 0
    history = (state / "qwen3-chat" / "history").read_text()
    assert '"""\n+What is\n+12 + 30?"""' in history and "half a line" not in history


def test_ctrl_c_mid_answer_keeps_partial_and_next_question_works(tmp_path, never_model):
    term = Term(["-m", str(never_model), "--seed", "0", "--max-tokens", "100000"],
                tmp_path / "state")  # fmt: skip
    term.expect("no_think │ budget 4096")  # capability "never": starts without thinking
    term.send("/think")
    term.expect("cannot think")
    for question in ("hello", "and again"):
        term.send(question)
        term.expect(r"\x1b\[\?2004l")  # prompt-toolkit let go of the terminal: generating
        time.sleep(1.0)  # random weights never stop: the answer is streaming now
        term.child.send("\x03")
        term.expect(r"\[interrupted\]")
        term.prompt()
    saved = tmp_path / "partial.json"
    term.send(f"/save {saved}")
    term.expect("saved 4 messages")
    term.send("/model demo")
    term.expect(r"now chatting with demo \(hybrid\)")
    term.expect("demo │ no_think")
    term.send("/exit")
    assert term.close() == 0
    msgs = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 2
    assert all(m.get("interrupted") and m["content"] for m in msgs[1::2])


def test_helpers(tmp_path, monkeypatch):
    assert closest_command("/thnk") == "/think" and closest_command("/xyzzy") is None
    assert unquote('"""\nline one\nline two\n"""') == "line one\nline two"
    assert unquote("plain") == "plain"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert history_path() == tmp_path / "qwen3-chat" / "history"
    target = tmp_path / "sub" / "c.json"
    write_private_json(target, {"messages": []})
    write_private_json(target, {"messages": [{"role": "user", "content": "é"}]})
    assert json.loads(target.read_text(encoding="utf-8"))["messages"][0]["content"] == "é"
    assert [p.name for p in target.parent.iterdir()] == ["c.json"]  # no temp files left
    with pytest.raises(TypeError):
        write_private_json(target, {"bad": object()})
    assert json.loads(target.read_text())["messages"][0]["content"] == "é"  # old file intact
    assert [p.name for p in target.parent.iterdir()] == ["c.json"]


def saved_messages(term: Term, path: Path, n: int) -> list[dict]:
    term.send(f"/save {path}")
    term.expect(f"saved {n} messages")
    return json.loads(path.read_text(encoding="utf-8"))["messages"]


def test_think_and_no_think_with_text_switch_mode_and_send_it(tmp_path):
    term = Term(DEMO, tmp_path / "state")
    term.expect("demo │ no_think │")
    term.send(f"/think {QUESTION}")
    term.expect("thinking on")
    term.expect(r"▸ Thought for \d+ tokens")
    term.expect("tok/s")
    term.expect("demo │ think │")
    term.send("/no_think What is 8 + 9?")
    term.expect("thinking off")
    term.expect("tok/s")
    assert "Thought for" not in term.seen
    term.expect("demo │ no_think │")
    msgs = saved_messages(term, tmp_path / "c.json", 4)
    assert [m["content"] for m in msgs[::2]] == [QUESTION, "What is 8 + 9?"]
    assert "reasoning_content" in msgs[1] and "reasoning_content" not in msgs[3]
    term.send("/exit")
    assert term.close() == 0


def test_think_text_is_sent_even_when_the_model_cannot_think(tmp_path, never_model):
    term = Term(["-m", str(never_model), "--seed", "0", "--max-tokens", "3"], tmp_path / "state")
    term.prompt()
    term.send("/think hello there")
    term.expect("cannot think")
    term.expect("tok/s")
    assert saved_messages(term, tmp_path / "c.json", 2)[0]["content"] == "hello there"
    term.send("/exit")
    assert term.close() == 0


def test_double_slash_sends_a_message_that_starts_with_a_slash(tmp_path):
    term = Term(DEMO, tmp_path / "state")
    term.prompt()
    term.send("/help")
    term.expect("//TEXT")
    term.ask("//etc/hosts is a file?")
    assert "unknown command" not in term.seen
    assert saved_messages(term, tmp_path / "c.json", 2)[0]["content"] == "/etc/hosts is a file?"
    term.send("/exit")
    assert term.close() == 0


def test_pasted_text_that_starts_with_triple_quotes_can_be_submitted(tmp_path):
    term = Term(DEMO, tmp_path / "state")
    term.prompt()
    quoted = '"""Quoted""" is what I read. What is 12 + 30?'
    code = '"""Module doc."""\n\ndef f():\n    """Inner."""\n    return 12 + 30'
    for text in (quoted, code):
        term.paste(text)
        term.child.send("\r")
        term.expect("tok/s")
        term.prompt()
    msgs = saved_messages(term, tmp_path / "c.json", 4)
    assert [m["content"] for m in msgs[::2]] == [quoted, code]  # sent as pasted
    term.send("/exit")
    assert term.close() == 0


def test_load_rejects_bad_settings_and_keeps_the_conversation(tmp_path):
    term = Term(DEMO, tmp_path / "state", cwd=tmp_path)  # short paths: messages fit a line
    term.prompt()
    term.ask(QUESTION)
    good = saved_messages(term, tmp_path / "good.json", 2)
    data = json.loads((tmp_path / "good.json").read_text())
    bad = tmp_path / "bad.json"
    for key, value, message in [
        ("max_tokens", -5, "max_tokens must be"),
        ("budget", "lots", "budget must be"),
        ("thinking", "no", "thinking must be"),
        ("sampling_overrides", {"temperature": -1}, "temperature"),
        ("sampling_overrides", {"top_k": True}, "top_k must be a whole number"),
        ("mode_sampling", {"dreaming": {"top_k": 3}}, "mode_sampling must map"),
    ]:
        bad.write_text(json.dumps({**data, key: value, "messages": []}))
        term.send("/load bad.json")
        term.expect(message)
        assert "loaded" not in term.seen and "Traceback" not in term.seen
    assert saved_messages(term, tmp_path / "after.json", 2) == good
    term.send("/exit")
    assert term.close() == 0


def test_ctrl_c_while_a_model_loads_keeps_the_model_and_conversation(tmp_path, never_model):
    # A model folder whose weights are a FIFO: opening it blocks until Ctrl-C.
    slow = tmp_path / "slow"
    slow.mkdir()
    for f in never_model.iterdir():
        if f.suffix != ".safetensors":
            (slow / f.name).write_bytes(f.read_bytes())
    os.mkfifo(slow / "model.safetensors")
    term = Term(DEMO, tmp_path / "state")
    term.prompt()
    term.ask(QUESTION)
    term.prompt()
    term.send(f"/model {slow}")
    term.expect("loading")
    term.child.send("\x03")
    term.expect("cancelled")
    term.expect("demo │ no_think │")
    assert len(saved_messages(term, tmp_path / "c.json", 2)) == 2
    term.ask("What is 8 + 9?")
    term.send("/exit")
    assert term.close() == 0


def test_unusable_history_folder_warns_once_and_chats_on(tmp_path):
    state = tmp_path / "state"
    state.write_text("a file where the state folder should be")
    term = Term(DEMO, state)
    term.prompt()
    term.ask(QUESTION)
    term.ask(QUESTION)
    term.send("/exit")
    assert term.close() == 0
    assert "Traceback" not in term.transcript
    assert term.transcript.count("warning: cannot keep history") == 1


def test_history_is_private(tmp_path):
    state = tmp_path / "state"
    term = Term(DEMO, state)
    term.prompt()
    term.ask(QUESTION)
    term.send("/exit")
    assert term.close() == 0
    assert stat.S_IMODE((state / "qwen3-chat").stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "qwen3-chat" / "history").stat().st_mode) == 0o600
