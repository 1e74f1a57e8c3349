"""The interactive REPL in a real pseudo-terminal (pexpect), plus its small helpers."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pexpect
import pytest
from checkpoints import REAL_VOCAB, make_checkpoint, tiny_config

from qwen3_chat.cli.repl import closest_command, history_path, save_conversation, unquote

QUESTION = "What is 23 + 14?"
ROWS, COLS = 30, 100
# Chat template with no enable_thinking switch: the CLI must treat the model as "never".
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Term:
    """A REPL in a pty that answers prompt-toolkit's cursor-position requests like a terminal."""

    def __init__(self, args: list[str], state: Path, timeout: float = 30):
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLS),
               "LINES": str(ROWS), "XDG_STATE_HOME": str(state), "NO_COLOR": "1"}  # fmt: skip
        # Ctrl-C makes the tty driver flush its output queue, which can cut a UTF-8
        # character in half: decode leniently, as a terminal would.
        self.child = pexpect.spawn(sys.executable, ["-m", "qwen3_chat", "chat", *args], env=env,
                                   encoding="utf-8", codec_errors="replace",
                                   dimensions=(ROWS, COLS), timeout=timeout)  # fmt: skip
        self.seen = ""  # everything printed since the last send

    def expect(self, pattern: str) -> str:
        while True:
            i = self.child.expect([r"\x1b\[6n", pattern])
            self.seen += self.child.before
            if i == 0:
                self.child.send("\x1b[5;1R")  # row 5: the rest of the screen is below us
                continue
            self.seen += self.child.after
            return self.child.after

    def prompt(self) -> None:
        self.expect("context \\d+/\\d+")  # the bottom toolbar is drawn with each prompt

    def send(self, line: str) -> None:
        self.seen = ""
        self.child.send(line + "\r")

    def close(self) -> int:
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


@pytest.fixture(scope="module")
def demo_reasoning() -> str:
    from qwen3_chat import ChatSession, SamplingParams, load
    from qwen3_chat.demo import DEMO_MODEL_DIR
    from qwen3_chat.engine.events import Finished

    model, tok = load(DEMO_MODEL_DIR)
    session = ChatSession(model, tok, sampling=SamplingParams(temperature=0), budget=4096)
    return [e for e in session.send(QUESTION) if isinstance(e, Finished)][0].reasoning


@pytest.fixture(scope="module")
def never_model(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """Random weights + real tokenizer, with a template that cannot switch thinking on.

    The full Qwen3 vocabulary (so the template's special tokens are valid ids) on a tiny,
    tied 16-wide body: ~10 MB, and it practically never samples <|im_end|>.
    """
    cfg = tiny_config(vocab_size=REAL_VOCAB, tie_word_embeddings=True, hidden_size=16,
                      head_dim=8, intermediate_size=32, num_hidden_layers=1)
    path = make_checkpoint(tmp_path_factory.mktemp("never") / "m", cfg,
                           tokenizer_dir=qwen3_tokenizer_dir)  # fmt: skip
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = PLAIN_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def test_demo_session_think_show_no_think_budget_save_load(tmp_path, demo_reasoning):
    term = Term(["-m", "demo", "--temp", "0"], tmp_path / "state")
    term.expect(r"demo │ think │ budget 4096 │ context 0/2048")

    term.send(QUESTION)
    term.expect(r"▸ Thought for \d+ tokens \(\d+\.\d s\) · /show to expand")
    term.expect("tok/s")
    term.prompt()

    term.send("/show")
    term.expect("reasoning of answer 1")
    term.expect(re.escape(demo_reasoning[:30]))
    term.prompt()

    term.send("/no_think")
    term.expect("thinking off")
    term.expect("no_think │ budget 4096")
    term.send("What is 8 + 9?")
    term.expect("tok/s")
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

    term.send("/clear")
    term.expect("new conversation")
    term.send("/show")
    term.expect("no answer yet")
    term.send(f"/load {saved}")
    term.expect("loaded 6 messages")
    term.expect(r"think │ budget 5 │ context [1-9]\d*/2048")
    term.send("/show 1")
    term.expect(re.escape(demo_reasoning[:30]))

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
        term.send(long)
        term.expect("tok/s")
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
    term = Term(["-m", "demo", "--temp", "0", "--no-think"], state)
    term.prompt()
    term.send('"""')
    term.send("What is")
    term.send('12 + 30?"""')
    term.expect("tok/s")
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
    save_conversation(target, {"messages": []})
    save_conversation(target, {"messages": [{"role": "user", "content": "é"}]})
    assert json.loads(target.read_text(encoding="utf-8"))["messages"][0]["content"] == "é"
    assert [p.name for p in target.parent.iterdir()] == ["c.json"]  # no temp files left
    with pytest.raises(TypeError):
        save_conversation(target, {"bad": object()})
    assert json.loads(target.read_text())["messages"][0]["content"] == "é"  # old file intact
    assert [p.name for p in target.parent.iterdir()] == ["c.json"]
