"""The interactive chat: prompt-toolkit input (history, completion, toolbar), rich output.

All conversation state lives in ChatSession; this module maps keystrokes and slash commands
onto it and renders its events through render.LiveTurn.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.table import Table
from rich.text import Text

from qwen3_chat.cli.render import LiveTurn, make_console, reasoning_panel, stats_line
from qwen3_chat.cli.terminal import InterruptGuard, discard_typeahead, quiet_keyboard
from qwen3_chat.errors import Qwen3ChatError

COMMANDS: dict[str, str] = {
    "/think": "thinking mode on",
    "/no_think": "thinking mode off (also /nothink)",
    "/nothink": "same as /no_think",
    "/budget": "/budget N|off: most reasoning tokens per answer",
    "/system": "/system TEXT: set the system prompt (empty: remove it)",
    "/clear": "start a new conversation",
    "/retry": "generate the last answer again",
    "/undo": "remove the last question and answer",
    "/show": "/show [N]: expand the reasoning of the last (or Nth) answer",
    "/stats": "numbers for the last answer",
    "/save": "/save FILE: write the conversation as JSON",
    "/load": "/load FILE: restore a saved conversation and its settings",
    "/model": "/model NAME: switch model, keeping the conversation",
    "/help": "this list",
    "/exit": "quit (also /quit, Ctrl-D)",
    "/quit": "quit",
}
CONTEXT_WARN = 0.8  # warn once the conversation fills this share of the context
QUOTES = '"""'


def history_path() -> Path:
    """$XDG_STATE_HOME/qwen3-chat/history (default ~/.local/state)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "qwen3-chat" / "history"


def closest_command(word: str) -> str | None:
    match = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.5)
    return match[0] if match else None


def save_conversation(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically: a temp file in the same folder, fsync, then rename over."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_conversation(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise Qwen3ChatError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise Qwen3ChatError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise Qwen3ChatError(f"{path} is not a saved qwen3-chat conversation")
    return data


def unquote(text: str) -> str:
    """A `\"\"\"` block: the text between the quotes."""
    s = text.strip()
    if s.startswith(QUOTES):
        s = s[3:]
        if s.endswith(QUOTES):
            s = s[:-3]
    return s.strip("\n")


class _SlashCompleter(Completer):
    def get_completions(self, document: Any, complete_event: Any) -> Iterator[Completion]:
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text:
            for cmd in COMMANDS:
                if cmd.startswith(text):
                    yield Completion(cmd, start_position=-len(text), display_meta=COMMANDS[cmd])


def _key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("enter")
    def _submit(event: Any) -> None:
        buf = event.current_buffer
        text = buf.text.strip()
        # Inside an open """ block Enter adds a line; the closing """ submits.
        if text.startswith(QUOTES) and (len(text) < 6 or not text.endswith(QUOTES)):
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    @kb.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    return kb


@dataclass
class Repl:
    session: Any
    loaded: Any  # cli.LoadedModel
    open_model: Callable[..., Any]
    show_thinking: bool = False
    console: Console = field(default_factory=make_console)
    _toolbar: str = ""

    # -- status ------------------------------------------------------------------------
    def _refresh_toolbar(self) -> None:
        s = self.session
        mode = "think" if s.thinking else "no_think"
        budget = "off" if s.budget is None else str(s.budget)
        self._toolbar = (f" {self.loaded.name} │ {mode} │ budget {budget} │ "
                         f"context {s.context_used}/{s.context_length} ")  # fmt: skip

    def say(self, message: str, style: str = "cyan") -> None:
        self.console.print(Text(message, style=style))

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        path = history_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        prompt: PromptSession[str] = PromptSession(
            history=FileHistory(str(path)), completer=_SlashCompleter(),
            complete_while_typing=True, multiline=True, key_bindings=_key_bindings(),
            bottom_toolbar=lambda: self._toolbar, enable_open_in_editor=False,
        )  # fmt: skip
        self.say(f"qwen3-chat · {self.loaded.name} ({self.loaded.capability}) · "
                 "/help for commands · Esc+Enter or \"\"\" for several lines · Ctrl-D to quit",
                 "dim")  # fmt: skip
        while True:
            self._refresh_toolbar()
            try:
                line = prompt.prompt("› ")
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                break
            if not line.strip():
                continue
            if line.lstrip().startswith("/"):
                try:
                    if not self.command(line.strip()):
                        break
                except Qwen3ChatError as e:
                    self.say(f"error: {e}", "red")
                continue
            self.generate(lambda text=unquote(line): self.session.send(text))
        self.say("bye", "dim")

    def generate(self, start: Callable[[], Iterator[Any]]) -> None:
        """Stream one reply; Ctrl-C stops it at once and keeps the partial answer.

        Keys typed meanwhile are not echoed; Ctrl-C can land anywhere (prefill, decode, a
        redraw) and leaves a sound screen, a sound conversation and no type-ahead."""
        turn = LiveTurn(self.console, show_thinking=self.show_thinking,
                        budget=self.session.budget)  # fmt: skip
        events: Iterator[Any] | None = None
        with quiet_keyboard(), InterruptGuard() as guard:
            try:
                events = start()
                for ev in events:
                    with guard.hold():  # a redraw finishes before Ctrl-C is raised
                        turn.on_event(ev)
            except KeyboardInterrupt:
                with guard.hold(defer=False):  # a second Ctrl-C must not cut the cleanup
                    self._stop(events)
                    turn.interrupt()
                discard_typeahead()
            except Qwen3ChatError as e:
                with guard.hold(defer=False):
                    self._stop(events)
                    if turn.answer or turn.reasoning:
                        turn.interrupt()
                    self.say(f"error: {e}", "red")
            else:
                with guard.hold(defer=False):
                    used, size = self.session.context_used, self.session.context_length
                    if used > CONTEXT_WARN * size:
                        self.say(f"⚠ context {used}/{size} tokens: the oldest exchanges will be "
                                 "dropped soon (/clear starts afresh)", "yellow")  # fmt: skip

    def _stop(self, events: Any) -> None:
        """After Ctrl-C or an error mid-turn: end the stream; the session keeps itself sound
        (abort() keeps a partial reply and drops a question that got none)."""
        close = getattr(events, "close", None)
        if close is not None:
            close()  # runs the engine's cleanup (finally blocks) now, not at GC
        self.session.abort()

    # -- slash commands ----------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, arg = line.partition(" ")
        name, arg = name.lower(), arg.strip()
        s = self.session
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            table = Table(show_header=False, box=None, padding=(0, 2))
            for cmd, text in COMMANDS.items():
                table.add_row(cmd, text)
            self.console.print(table)
        elif name == "/think":
            if not s.can_think:
                self.say(f"{self.loaded.name} cannot think (capability: never)", "yellow")
            else:
                s.thinking = True
                self.say("thinking on")
        elif name in ("/no_think", "/nothink"):
            if s.capability == "always":
                self.say(f"{self.loaded.name} always thinks (capability: always)", "yellow")
            else:
                s.thinking = False
                self.say("thinking off")
        elif name == "/budget":
            self._budget(arg)
        elif name == "/system":
            s.system = arg or None
            self.say(f"system prompt {'set' if arg else 'removed'}")
        elif name == "/clear":
            s.clear()
            self.say("new conversation")
        elif name == "/retry":
            self.generate(s.retry)
        elif name == "/undo":
            self.say("removed the last exchange" if s.undo() else "nothing to undo")
        elif name == "/show":
            self._show(arg)
        elif name == "/stats":
            self._stats()
        elif name == "/save":
            self._save(arg)
        elif name == "/load":
            self._load(arg)
        elif name == "/model":
            self._switch_model(arg)
        else:
            hint = closest_command(name)
            self.say(f"unknown command {name}" + (f" — did you mean {hint}?" if hint else
                     " — /help lists the commands"), "yellow")  # fmt: skip
        return True

    def _budget(self, arg: str) -> None:
        if arg.lower() in ("off", "none"):
            self.session.budget = None
            self.say("thinking budget off")
            return
        try:
            value = int(arg)
            if value < 0:
                raise ValueError
        except ValueError:
            raise Qwen3ChatError("usage: /budget N (tokens, 0 or more) or /budget off") from None
        self.session.budget = value
        self.say(f"thinking budget {value} tokens")

    def _show(self, arg: str) -> None:
        answers = [m for m in self.session.messages if m["role"] == "assistant"]
        if not answers:
            raise Qwen3ChatError("no answer yet")
        try:
            n = int(arg) if arg else len(answers)
        except ValueError:
            raise Qwen3ChatError("usage: /show [N] (N counts answers from 1)") from None
        if not 1 <= n <= len(answers):
            raise Qwen3ChatError(f"answer {n} does not exist (there are {len(answers)})")
        reasoning = answers[n - 1].get("reasoning_content", "")
        self.console.print(reasoning_panel(reasoning, f"reasoning of answer {n}"))

    def _stats(self) -> None:
        st = self.session.last_stats
        if st is None:
            raise Qwen3ChatError("no answer yet")
        self.say(stats_line(st), "dim")
        self.say(f"prefill {st.prefill_tokens} tokens at {st.prefill_tps:.0f} tok/s · peak "
                 f"memory {st.peak_memory_gb:.2f} GB · finish {st.finish_reason}"
                 + (" · budget hit" if st.budget_hit else ""), "dim")  # fmt: skip

    def _save(self, arg: str) -> None:
        if not arg:
            raise Qwen3ChatError("usage: /save FILE")
        data = self.session.to_dict()
        data["model"] = self.loaded.name
        try:
            save_conversation(Path(arg), data)
        except OSError as e:
            raise Qwen3ChatError(f"cannot write {arg}: {e.strerror or e}") from None
        self.say(f"saved {len(data['messages'])} messages to {arg}")

    def _rebuild(self, data: dict[str, Any]) -> None:
        from qwen3_chat.chat.session import ChatSession

        self.session = ChatSession.from_dict(
            self.loaded.model, self.loaded.tokenizer, data,
            capability=self.loaded.capability, context_length=self.session.context_length,
        )  # fmt: skip

    def _load(self, arg: str) -> None:
        if not arg:
            raise Qwen3ChatError("usage: /load FILE")
        data = load_conversation(Path(arg))
        self._rebuild(data)
        saved_with = data.get("model")
        other = saved_with and saved_with != self.loaded.name
        note = f" (saved with {saved_with})" if other else ""
        self.say(f"loaded {len(self.session.messages)} messages from {arg}{note}")

    def _switch_model(self, arg: str) -> None:
        if not arg:
            raise Qwen3ChatError("usage: /model NAME")
        self.say(f"loading {arg} …", "dim")
        data = self.session.to_dict()
        loaded = self.open_model(arg)
        from qwen3_chat.chat.session import ChatSession

        self.loaded = loaded
        self.session = ChatSession.from_dict(loaded.model, loaded.tokenizer, data,
                                             capability=loaded.capability,
                                             context_length=loaded.context_length,
                                             mode_sampling=loaded.mode_sampling)  # fmt: skip
        self.say(f"now chatting with {loaded.name} ({loaded.capability})")
