"""Saved conversations: the private store, `--resume [ID]`, `qwen3 conversations`, and the
REPL saving before and after every turn (a crash mid-answer keeps the question)."""

from __future__ import annotations

import signal
import stat
from pathlib import Path

import pytest
from pty_term import DEMO, Term, make_never_model
from test_commands import saved
from test_repl import QUESTION
from typer.testing import CliRunner

from qwen3_chat.cli.conversations import ConversationStore, resume_args
from qwen3_chat.errors import Qwen3ChatError


@pytest.fixture(scope="module")
def never_model(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    return make_never_model(tmp_path_factory.mktemp("never"), qwen3_tokenizer_dir)


# -- the store --------------------------------------------------------------------------------
def test_store_saves_privately_lists_newest_first_and_rejects_paths(tmp_path):
    store = ConversationStore(tmp_path / "state" / "conversations")
    with pytest.raises(Qwen3ChatError, match="no saved conversations"):
        store.latest()
    first, second = "20260101-120000-aaaa", "20260102-120000-bbbb"
    store.save(first, saved())
    store.save(second, saved(messages=[{"role": "user", "content": "second\nquestion"}]))
    (store.root / "20260103-120000-cccc.json").write_text("{broken")  # skipped when listing
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in store.root.glob("2026*-????.json")
               if p.stem != "20260103-120000-cccc")  # fmt: skip
    listed = store.list()
    assert {c.id for c in listed} == {first, second}
    assert listed[0].id == store.latest()
    assert next(c for c in listed if c.id == second).title == "second question"
    assert store.load(first)["messages"] == saved()["messages"]
    store.delete(first)
    store.delete(first)  # already gone: nothing to do
    assert [c.id for c in store.list()] == [second]
    for bad in ("../../etc/passwd", "x", first + "/../y"):
        with pytest.raises(Qwen3ChatError, match="not a conversation id"):
            store.load(bad)
    # Before: "not valid saved conversation (...)", a sentence missing its article.
    with pytest.raises(Qwen3ChatError, match=r"20260103-120000-cccc.json: not valid JSON \("):
        store.load("20260103-120000-cccc")


def test_a_bare_resume_continues_with_the_conversations_own_model(tmp_path):
    # Before: it opened the default model (qwen3-4b), which offline cannot even be fetched.
    state = tmp_path / "state"
    conv = "20260101-120000-aaaa"
    ConversationStore(state / "qwen3-chat" / "conversations").save(conv, saved(model="demo"))
    term = Term(["--temp", "0", "--resume"], state, env={"HF_HUB_OFFLINE": "1"})
    term.expect(f"resumed conversation {conv}: 2 messages \\(")  # no "saved with": the same
    term.prompt()
    assert "demo │" in term.seen
    term.send("/exit")
    assert term.close() == 0


def test_resume_takes_an_optional_id():
    conv = "20260101-120000-aaaa"
    assert resume_args(["--resume"]) == ["--resume", "latest"]
    assert resume_args(["--resume", "-m", "demo"]) == ["--resume", "latest", "-m", "demo"]
    assert resume_args(["--resume", conv]) == ["--resume", conv]
    assert resume_args(["--", "--resume"]) == ["--", "--resume"]


# -- in the terminal --------------------------------------------------------------------------
def test_conversations_saved_each_turn_listed_and_resumed(tmp_path, monkeypatch, never_model):
    state = tmp_path / "state"
    folder = state / "qwen3-chat" / "conversations"
    term = Term(DEMO, state)
    term.prompt()
    term.send("What is 12 + 30? " * 400)  # too long for the demo's context: not kept
    term.expect("longer than the model's context")
    term.prompt()
    assert list(folder.glob("*.json")) == []
    term.ask(QUESTION)
    term.ask("What is 8 + 9?")
    term.send("/conversations")
    term.expect(r"(\d{8}-\d{6}-[0-9a-f]{4}) \(this one\)\s+4 messages\s+demo\s+What is 23")
    conv_id = term.child.match.group(1)
    term.send("/exit")
    assert term.close() == 0
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / f"{conv_id}.json").stat().st_mode) == 0o600

    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    from qwen3_chat.cli.app import app

    listed = CliRunner().invoke(app, ["conversations"])
    assert listed.exit_code == 0 and conv_id in listed.stdout
    assert "What is 23 + 14?" in listed.stdout

    # A crash mid-answer keeps the question: the model below never stops on its own.
    term = Term(["-m", str(never_model), "--seed", "0"], state)
    term.prompt()
    term.send("never lost")
    term.expect(r"\x1b\[\?2004l")  # prompt-toolkit let go of the terminal
    term.expect(r"\x1b\[\?25l")  # then the answer's live view started: the turn is running
    term.child.kill(signal.SIGKILL)
    term.child.close()
    crashed = ConversationStore(folder).latest()
    assert crashed != conv_id
    assert ConversationStore(folder).load(crashed)["messages"][-1]["content"] == "never lost"

    term = Term(["-m", "demo", "--temp", "0", "--no-think", "--resume"], state)
    term.expect(f"resumed conversation {crashed}: 1 messages, saved with")
    term.expect("/retry answers it")
    term.ask("/retry")
    term.send("/exit")
    assert term.close() == 0

    term = Term(["-m", "demo", "--temp", "0", "--no-think", "--resume", conv_id], state)
    term.expect(f"resumed conversation {conv_id}: 4 messages")
    term.send("/history")
    term.expect("› What is 8 \\+ 9\\?")
    term.ask("What is 1 + 1?")
    term.send("/exit")
    assert term.close() == 0
    assert len(ConversationStore(folder).load(conv_id)["messages"]) == 6
