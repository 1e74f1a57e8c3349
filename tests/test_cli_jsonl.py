"""`qwen3 chat --jsonl`: one JSON object per engine event on stdout, flushed line by line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from checkpoints import REAL_VOCAB, make_checkpoint, tiny_config
from typer.testing import CliRunner

from qwen3_chat.cli.app import app
from qwen3_chat.cli.oneshot import event_object
from qwen3_chat.engine.events import ContextTrimmed

QUESTION = "What is 23 + 14?"


def jsonl(*args: str) -> list[dict]:
    result = CliRunner().invoke(app, ["chat", "-m", "demo", "--temp", "0", "--jsonl", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_events_in_order_add_up_to_the_json_answer():
    events = jsonl(QUESTION)
    types = [e["type"] for e in events]
    assert types[-1] == "finished" and types.count("finished") == 1
    assert types.count("thinking_done") == 1
    done = types.index("thinking_done")
    assert set(types[:done]) == {"reasoning"} and set(types[done + 1:-1]) == {"answer"}
    final = events[-1]
    # The summary strips the whitespace around </think>; the deltas are the raw stream.
    streamed = {t: "".join(e["text"] for e in events if e["type"] == t)
                for t in ("reasoning", "answer")}  # fmt: skip
    assert streamed["reasoning"].strip() == final["reasoning"] != ""
    assert streamed["answer"].strip() == final["answer"] != ""
    assert events[done]["tokens"] == final["usage"]["reasoning_tokens"]
    one = json.loads(CliRunner().invoke(app, ["chat", "-m", "demo", "--temp", "0", "--json",
                                              QUESTION]).stdout)  # fmt: skip
    assert {k: v for k, v in final.items() if k not in ("type", "timings")} == {
        k: v for k, v in one.items() if k != "timings"}  # the same answer as --json


def test_budget_and_no_think_show_in_events():
    cut = jsonl("--budget", "5", QUESTION)
    done = [e for e in cut if e["type"] == "thinking_done"]
    assert len(done) == 1 and done[0]["budget_hit"] is True and cut[-1]["budget_hit"] is True
    plain = jsonl("--no-think", QUESTION)
    assert {e["type"] for e in plain} == {"answer", "finished"}


def test_context_trimmed_record():
    assert event_object(ContextTrimmed(2, 900, 2048), "m") == {
        "type": "context_trimmed", "dropped_turns": 2, "context_used": 900,
        "context_length": 2048}  # fmt: skip


def test_json_and_jsonl_together_is_a_usage_error():
    result = CliRunner().invoke(app, ["chat", "-m", "demo", "--json", "--jsonl", "hi"])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1


def test_lines_arrive_while_generating(tmp_path, qwen3_tokenizer_dir):
    """A tool reading the pipe gets each event as it happens, not at exit."""
    cfg = tiny_config(vocab_size=REAL_VOCAB, tie_word_embeddings=True, hidden_size=16,
                      head_dim=8, intermediate_size=32, num_hidden_layers=1)
    model = make_checkpoint(tmp_path / "m", cfg, tokenizer_dir=qwen3_tokenizer_dir)
    cmd = [sys.executable, "-m", "qwen3_chat", "chat", "-m", str(model), "--seed", "0",
           "--jsonl", "--max-tokens", "100000", "hi"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "0"})  # fmt: skip
    try:
        first = json.loads(proc.stdout.readline())
        assert first["type"] in ("reasoning", "answer")
        assert proc.poll() is None  # still generating: the line was flushed, not buffered
    finally:
        proc.kill()
        proc.communicate()


def test_json_lines_never_carry_terminal_controls():
    """json escapes only C0; DEL and C1 (U+009B is a one-character CSI) must be escaped too."""
    from qwen3_chat.cli.oneshot import json_line

    text = "ok\x1b]0;title\x07\x9b2J\x7f\x85 é ✓"
    line = json_line({"answer": text})
    assert json.loads(line) == {"answer": text}
    assert not [c for c in line if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F]
    assert "é ✓" in line  # non-ASCII stays readable
