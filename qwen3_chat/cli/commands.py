"""The REPL's slash commands: one handler per command, all state changes through ChatSession.

Handlers take the Repl (for its session, model and console) and the text after the command.
A Qwen3ChatError from a handler is shown as one red line and the REPL goes on.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from qwen3_chat.cli import clipboard, settings
from qwen3_chat.cli.attachments import read_attachments
from qwen3_chat.cli.conversations import ConversationStore, write_private_json
from qwen3_chat.cli.models import human_size
from qwen3_chat.cli.render import count_tokens, reasoning_panel, speculation_line, stats_line
from qwen3_chat.cli.terminal import sanitize
from qwen3_chat.engine.defaults import allows_thinking
from qwen3_chat.engine.events import REASONING_TOKENS
from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.files import missing_folder, read_json

if TYPE_CHECKING:
    from qwen3_chat.cli.repl import Repl

COMMANDS: dict[str, str] = {
    "/think": "/think [TEXT]: thinking mode on (and send TEXT)",
    "/no_think": "/no_think [TEXT]: thinking mode off (also /nothink)",
    "/nothink": "same as /no_think",
    "/budget": "/budget N|off: most reasoning tokens per answer",
    "/set": "/set NAME VALUE: " + ", ".join(settings.SETTINGS) + ", template.NAME (VALUE "
            "default: back to the default)",
    "/settings": "model, mode, sampling per mode, limits, system prompt (also /set alone)",
    "/system": "/system TEXT: set the system prompt (empty: remove it)",
    "/file": "/file PATH: attach a UTF-8 text file to the next message",
    "/clear": "start a new conversation",
    "/retry": "generate the last answer again",
    "/undo": "remove the last question and answer",
    "/history": "the conversation so far, reasoning folded",
    "/show": "/show [N]: expand the reasoning of the last (or Nth) answer",
    "/copy": "copy the last answer to the clipboard",
    "/stats": "numbers for the last answer",
    "/save": "/save FILE: write the conversation as JSON",
    "/load": "/load FILE: restore a saved conversation and its settings",
    "/conversations": "conversations saved so far (qwen3 chat --resume ID continues one)",
    "/model": "/model NAME: switch model, keeping the conversation",
    "/help": "this list",
    "/exit": "quit (also /quit, Ctrl-D)",
    "/quit": "quit",
}
# Shown under the commands in /help: input that is not a command.
INPUT_HELP = (
    ("//TEXT", "send a message that starts with / (//etc/hosts sends /etc/hosts)"),
    ('"""', 'start and end a multi-line message (or Esc+Enter for a new line)'),
    ("… /think", "a message ending in /think or /no_think sets the mode for that turn"),
)


def closest_command(word: str) -> str | None:
    match = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.5)
    return match[0] if match else None


def run_command(repl: Repl, line: str) -> bool:
    """Run a slash command; False means quit."""
    name, _, arg = line.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/exit", "/quit"):
        return False
    handler = HANDLERS.get(name)
    if handler is None:
        hint = closest_command(name)
        repl.say(f"unknown command {sanitize(name)}" + (f" — did you mean {hint}?" if hint else
                 " — /help lists the commands; //TEXT sends /TEXT as a message"),
                 "yellow")  # fmt: skip
    else:
        handler(repl, arg)
    return True


def _help(repl: Repl, arg: str) -> None:
    table = Table(show_header=False, box=None, padding=(0, 2))
    for cmd, text in (*COMMANDS.items(), *INPUT_HELP):
        table.add_row(cmd, text)
    repl.console.print(table)


def _mode(repl: Repl, arg: str, *, thinking: bool) -> None:
    """/think and /no_think; with TEXT, also send it. A model that cannot switch says so
    and TEXT is sent anyway: what was typed is never dropped."""
    s = repl.session
    if allows_thinking(s.capability, thinking):
        s.thinking = thinking
        repl.say(f"thinking {'on' if thinking else 'off'}")
    else:
        what = "cannot think" if thinking else "always thinks"
        repl.say(f"{repl.loaded.name} {what} (capability: {s.capability})", "yellow")
    if arg:
        repl.send_message(arg)


def _budget(repl: Repl, arg: str) -> None:
    if not arg:
        raise Qwen3ChatError("usage: /budget N (tokens, 0 or more) or /budget off")
    _set(repl, f"budget {arg}")


def _set(repl: Repl, arg: str) -> None:
    if not arg:
        _settings(repl, arg)
        return
    name, _, value = arg.partition(" ")
    if name.lower().startswith(settings.TEMPLATE_PREFIX):
        _set_template(repl, name, value)
        return
    name, parsed = settings.parse_setting(name, value)
    settings.apply_setting(repl.session, name, parsed)
    if name == "budget":
        repl.say("thinking budget off" if parsed is None else f"thinking budget {parsed} tokens")
    else:
        repl.say(f"{name} {parsed}" if parsed is not None else f"{name} back to the default")


def _set_template(repl: Repl, name: str, value: str) -> None:
    from qwen3_chat.chat.template_args import ignored_by_template

    name, parsed = settings.set_template_arg(repl.session, name, value)
    if parsed is not None and ignored_by_template(repl.session.tokenizer, [name]):
        repl.say(settings.template_arg_warning(name), "yellow")
    repl.say(f"template {name} {parsed}" if parsed is not None else f"template {name} unset")


def _settings(repl: Repl, arg: str) -> None:
    table = Table(show_header=False, box=None, padding=(0, 2))
    for label, value in settings.describe(repl.session, repl.loaded.name):
        table.add_row(label, Text(sanitize(value)))
    repl.console.print(table)


def _system(repl: Repl, arg: str) -> None:
    repl.session.set_system(arg or None)
    repl.say(f"system prompt {'set' if arg else 'removed'}")


def _file(repl: Repl, arg: str) -> None:
    path = arg.strip().strip("'\"")
    if not path:
        names = ", ".join(a.name for a in repl.attachments)
        raise Qwen3ChatError(f"attached to the next message: {names}" if names
                             else "usage: /file PATH (a UTF-8 text file)")  # fmt: skip
    att = read_attachments([path], repl.session, repl.attachments)[0]
    repl.attachments.append(att)
    repl.say(f"attached {sanitize(att.name)} ({att.tokens} tokens) to the next message")


def _clear(repl: Repl, arg: str) -> None:
    repl.session.clear()
    repl.attachments.clear()
    repl.conversation_id = ConversationStore.new_id()
    repl.say("new conversation")


def _retry(repl: Repl, arg: str) -> None:
    repl.generate(repl.session.retry)
    repl.autosave()


def _undo(repl: Repl, arg: str) -> None:
    repl.say("removed the last exchange" if repl.session.undo() else "nothing to undo")
    repl.autosave()


def _answers(repl: Repl) -> list[dict]:
    return [m for m in repl.session.messages if m["role"] == "assistant"]


def _show(repl: Repl, arg: str) -> None:
    answers = _answers(repl)
    if not answers:
        raise Qwen3ChatError("no answer yet")
    try:
        n = int(arg) if arg else len(answers)
    except ValueError:
        raise Qwen3ChatError("usage: /show [N] (N counts answers from 1)") from None
    if not 1 <= n <= len(answers):
        raise Qwen3ChatError(f"answer {n} does not exist (there are {len(answers)})")
    reasoning = sanitize(answers[n - 1].get("reasoning_content", ""))
    repl.console.print(reasoning_panel(reasoning, f"reasoning of answer {n}"))


def _history(repl: Repl, arg: str) -> None:
    s = repl.session
    if not s.messages:
        raise Qwen3ChatError("nothing said yet")
    if s.system:
        repl.say(f"system: {sanitize(s.system)}", "dim")
    n = 0
    for m in s.messages:
        if m["role"] == "user":
            repl.console.print(Text("› " + sanitize(m["content"]), style="bold"))
            continue
        n += 1
        if m.get("reasoning_content"):  # the count as generated; re-encoded for older files
            tokens = m.get(REASONING_TOKENS) or len(s.tokenizer.encode(m["reasoning_content"]))
            repl.say(f"▸ reasoning, {count_tokens(tokens)} · /show {n} to expand", "dim")
        repl.console.print(Text(sanitize(m["content"])))
        if m.get("interrupted"):
            repl.say("[interrupted]", "yellow")
        elif m.get("truncated"):
            repl.say("[stopped at max_tokens]", "yellow")


def _copy(repl: Repl, arg: str) -> None:
    answers = _answers(repl)
    if not answers or not answers[-1]["content"]:
        raise Qwen3ChatError("no answer to copy yet")
    text = answers[-1]["content"]
    used = clipboard.copy(text, sys.stdout)
    if not used:
        raise Qwen3ChatError("cannot copy: no terminal for OSC 52 and no clipboard tool "
                             "(pbcopy, wl-copy, xclip, xsel) works; try /save FILE")  # fmt: skip
    only_osc = used == [clipboard.OSC52_NAME]
    note = " (if nothing arrives, your terminal ignores OSC 52)" if only_osc else ""
    repl.say(f"copied {len(text)} characters via {', '.join(used)}{note}")


def snapshot_line(snapshots: Any) -> str | None:
    """/stats on a hybrid model: the rewind points kept and their memory (None without)."""
    if not snapshots.points:
        return None
    at = ", ".join(str(offset) for offset, _ in snapshots.points)
    return (f"snapshots: {len(snapshots.points)} of at most {snapshots.max_count} · "
            f"{human_size(snapshots.nbytes)} · at tokens {at}")  # fmt: skip


def _stats(repl: Repl, arg: str) -> None:
    st = repl.session.last_stats
    if st is None:
        raise Qwen3ChatError("no answer yet")
    repl.say(stats_line(st), "dim")
    if (line := speculation_line(st)) is not None:
        repl.say(line, "dim")
    repl.say(f"prefill {st.prefill_tokens} tokens at {st.prefill_tps:.0f} tok/s · peak "
             f"memory {st.peak_memory_gb:.2f} GB · finish {st.finish_reason}"
             + (" · budget hit" if st.budget_hit else ""), "dim")  # fmt: skip
    if (line := snapshot_line(repl.session.snapshots)) is not None:
        repl.say(line, "dim")


def _save(repl: Repl, arg: str) -> None:
    if not arg:
        raise Qwen3ChatError("usage: /save FILE")
    data = repl.snapshot()
    missing = missing_folder(arg)  # made, as `qwen3 convert --out` does, and said
    try:
        write_private_json(Path(arg).expanduser(), data)
    except OSError as e:
        raise Qwen3ChatError(f"cannot write {arg}: {e.strerror or e}") from None
    made = f" (created the folder {missing})" if missing else ""
    repl.say(f"saved {len(data['messages'])} messages to {arg}{made}")


def _load(repl: Repl, arg: str) -> None:
    if not arg:
        raise Qwen3ChatError("usage: /load FILE")
    data = read_json(Path(arg))  # "not valid JSON (...)"; restore() says what else is wrong
    try:
        repl.restore(data, check=True)
    except Qwen3ChatError as e:
        raise Qwen3ChatError(f"{arg}: {e}; the conversation was not changed") from None
    repl.conversation_id = ConversationStore.new_id()
    saved_with = data.get("model")
    other = saved_with and saved_with != repl.loaded.name
    note = f" (saved with {sanitize(str(saved_with))})" if other else ""
    repl.say(f"loaded {len(repl.session.messages)} messages from {arg}{note}")


def _conversations(repl: Repl, arg: str) -> None:
    found = repl.store.list()
    if not found:
        raise Qwen3ChatError("no saved conversations yet")
    table = Table(show_header=False, box=None, padding=(0, 2))
    for c in found:
        current = " (this one)" if c.id == repl.conversation_id else ""
        table.add_row(c.id + current, f"{c.messages} messages", Text(sanitize(c.model)),
                      Text(sanitize(c.title)))  # fmt: skip
    repl.console.print(table)
    repl.say("continue one with: qwen3 chat --resume ID", "dim")


def _model(repl: Repl, arg: str) -> None:
    if not arg:
        raise Qwen3ChatError("usage: /model NAME")
    try:
        repl.say(f"loading {arg} … (Ctrl-C cancels)", "dim")
        note = repl.switch(repl.open_model(arg))
    except KeyboardInterrupt:
        repl.say(f"model switch cancelled; still chatting with {repl.loaded.name}", "yellow")
        return
    repl.say(f"now chatting with {repl.loaded.name} ({repl.loaded.capability})")
    if note:
        repl.say(sanitize(note), "yellow")


Handler = Callable[["Repl", str], None]
HANDLERS: dict[str, Handler] = {
    "/help": _help, "/think": partial(_mode, thinking=True),
    "/no_think": partial(_mode, thinking=False), "/nothink": partial(_mode, thinking=False),
    "/budget": _budget, "/set": _set, "/settings": _settings, "/system": _system,
    "/file": _file, "/clear": _clear, "/retry": _retry, "/undo": _undo, "/history": _history,
    "/show": _show, "/copy": _copy, "/stats": _stats, "/save": _save, "/load": _load,
    "/conversations": _conversations, "/model": _model,
}  # fmt: skip
