"""The interactive chat: prompt-toolkit input (history, completion, toolbar), rich output.

All conversation state lives in ChatSession; this module maps keystrokes onto it, hands
slash commands to cli.commands, renders events through render.LiveTurn, and saves the
conversation after every turn (cli.conversations).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.text import Text

from qwen3_chat.cli import settings
from qwen3_chat.cli.attachments import Attachment, with_attachments
from qwen3_chat.cli.commands import COMMANDS, run_command
from qwen3_chat.cli.conversations import ConversationStore
from qwen3_chat.cli.history import open_history
from qwen3_chat.cli.render import LiveTurn, make_console
from qwen3_chat.cli.speculation import SpeculationRequest, resolve
from qwen3_chat.cli.terminal import (
    InterruptGuard,
    discard_typeahead,
    quiet_keyboard,
    sanitize,
)
from qwen3_chat.errors import Qwen3ChatError

CONTEXT_WARN = 0.8  # warn once the conversation fills this share of the context
QUOTES = '"""'


def block_open(text: str) -> bool:
    """Inside a `\"\"\"` block: the text starts with the quotes and has not closed them.

    Counting every `\"\"\"` (not only a trailing one) lets a paste that holds its own
    closing quotes, or Python docstrings, be submitted with Enter."""
    s = text.strip()
    return s.startswith(QUOTES) and s.count(QUOTES) % 2 == 1


def unquote(text: str) -> str:
    """The message in a `\"\"\"` block; any other text as typed (outer blank lines dropped).

    Quotes are removed only from a real block: `\"\"\"` alone on the first line, or exactly
    one pair around the whole text; pasted code with several docstrings is sent as is."""
    s = text.strip()
    if len(s) >= 6 and s.startswith(QUOTES) and s.endswith(QUOTES):
        if s.split("\n", 1)[0].strip() == QUOTES or s.count(QUOTES) == 2:
            return s[3:-3].strip("\n")
    return s


class _SlashCompleter(Completer):
    """Command names after `/`, and setting names after `/set `."""

    def get_completions(self, document: Any, complete_event: Any) -> Iterator[Completion]:
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text:
            for cmd in COMMANDS:
                if cmd.startswith(text):
                    yield Completion(cmd, start_position=-len(text), display_meta=COMMANDS[cmd])
        elif text.startswith("/set ") and text.count(" ") == 1:
            word = text[5:]
            for name in settings.SETTINGS:
                if name.startswith(word):
                    yield Completion(name, start_position=-len(word))


def _key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("enter")
    def _submit(event: Any) -> None:
        buf = event.current_buffer
        # Inside an open """ block Enter adds a line; the closing """ submits.
        if block_open(buf.text):
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
    loaded: Any  # hub.open.LoadedModel
    open_model: Callable[..., Any]
    show_thinking: bool = False
    console: Console = field(default_factory=make_console)
    attachments: list[Attachment] = field(default_factory=list)  # for the next message
    resume: str | None = None  # a conversation id, or "latest"
    speculate: SpeculationRequest = field(default_factory=SpeculationRequest)  # for /model
    store: ConversationStore = field(default_factory=ConversationStore)
    conversation_id: str = field(default_factory=ConversationStore.new_id)
    _toolbar: str = ""
    _save_failed: bool = False  # warned once that conversations cannot be saved

    # -- status ------------------------------------------------------------------------
    def _refresh_toolbar(self) -> None:
        s = self.session
        mode = "think" if s.thinking else "no_think"
        budget = "off" if s.budget is None else str(s.budget)
        self._toolbar = (f" {self.loaded.name} │ {mode} │ budget {budget} │ "
                         f"context {s.context_used}/{s.context_length} ")  # fmt: skip

    def say(self, message: str, style: str = "cyan") -> None:
        self.console.print(Text(message, style=style))

    # -- state -------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The conversation and its settings, as saved (/save and the autosave)."""
        return {**self.session.to_dict(), "model": self.loaded.name}

    def restore(self, data: dict[str, Any], *, check: bool = False) -> None:
        """Replace the session by a saved one, on the current model; `check` a file's data.

        The new session is built (and checked) before it replaces the current one; the
        speculation goes on (a saved conversation does not hold it)."""
        from qwen3_chat.chat.session import ChatSession

        if check:
            settings.check_saved(data)
        session = ChatSession.from_dict(
            self.loaded.model, self.loaded.tokenizer, data,
            capability=self.loaded.capability, context_length=self.loaded.context_length,
            mode_sampling=self.loaded.mode_sampling,
        )  # fmt: skip
        session.speculation = self.session.speculation
        self.session = session

    def switch(self, loaded: Any) -> str | None:
        """Chat on with `loaded`, keeping the conversation; the user's --speculate is
        resolved again for it (first: Ctrl-C while a draft loads changes nothing). Returns
        a note to show: a draft chosen from disk, or why speculation is off."""
        speculation, note = resolve(self.speculate, loaded, strict=False)
        data, old = self.session.to_dict(), self.loaded
        self.loaded = loaded
        try:
            self.restore(data)
        except BaseException:  # still the old model with its conversation, as /model says
            self.loaded = old
            raise
        self.session.speculation = speculation
        return note

    def autosave(self, pending: str | None = None) -> bool:
        """Save the conversation (plus a question about to be sent) under its id, atomically.

        Called before a turn with the question, so a crash mid-answer loses nothing typed,
        and after it with the answer; an empty conversation leaves no file. A failure warns
        once and chatting goes on. False when Ctrl-C stopped it (the old file stays whole)."""
        data = self.snapshot()
        if pending is not None:
            data["messages"].append({"role": "user", "content": pending})
        if self._save_failed:
            return True
        try:
            if data["messages"]:
                self.store.save(self.conversation_id, data)
            else:
                self.store.delete(self.conversation_id)
        except OSError as e:
            self._save_failed = True
            self.say(f"warning: cannot save conversations in {self.store.root} "
                     f"({e.strerror or e}); /save FILE still works", "yellow")  # fmt: skip
        except KeyboardInterrupt:
            return False
        return True

    def _resume(self) -> None:
        conv_id = self.store.latest() if self.resume == "latest" else self.resume
        try:
            data = self.store.load(conv_id)
            self.restore(data, check=True)
        except Qwen3ChatError as e:
            raise Qwen3ChatError(f"conversation {conv_id}: {e}") from None
        self.conversation_id = conv_id
        msgs = self.session.messages
        other = data.get("model") not in (None, self.loaded.name)
        note = f", saved with {sanitize(str(data['model']))}" if other else ""
        self.say(f"resumed conversation {conv_id}: {len(msgs)} messages{note} "
                 "(/history shows them)")  # fmt: skip
        if msgs and msgs[-1]["role"] == "user":
            self.say("its last question has no answer yet: /retry answers it", "yellow")

    def send_message(self, text: str) -> None:
        """Send a message (with any attached files) and stream the reply."""
        full = with_attachments(text, self.attachments)
        if not self.autosave(pending=full):
            self.say("[cancelled]", "yellow")  # Ctrl-C before the turn began: not sent
            return
        self.generate(lambda: self.session.send(full))
        msgs = self.session.messages
        if any(m["role"] == "user" and m["content"] == full for m in msgs[-2:]):
            self.attachments.clear()  # sent; a rejected message keeps them for the next try
        self.autosave()

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        history, warning = open_history()
        prompt: PromptSession[str] = PromptSession(
            history=history, completer=_SlashCompleter(),
            complete_while_typing=True, multiline=True, key_bindings=_key_bindings(),
            bottom_toolbar=lambda: self._toolbar, enable_open_in_editor=False,
        )  # fmt: skip
        self.say(f"qwen3-chat · {self.loaded.name} ({self.loaded.capability}) · "
                 "/help for commands · Esc+Enter or \"\"\" for several lines · Ctrl-D to quit",
                 "dim")  # fmt: skip
        if warning:
            self.say(warning, "yellow")
        if self.resume:
            self._resume()
        while True:
            self._refresh_toolbar()
            try:
                line = prompt.prompt("› ")
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                break
            failure = getattr(history, "failure", None)
            if failure and not warning:
                warning = f"warning: {failure}; going on without history"
                self.say(warning, "yellow")
            text = line.strip()
            if not text:
                continue
            if text.startswith("/") and not text.startswith("//"):
                try:
                    if not run_command(self, text):
                        break
                except Qwen3ChatError as e:
                    self.say(f"error: {sanitize(str(e))}", "red")
                continue
            message = unquote(line)
            self.send_message(message[1:] if message.startswith("//") else message)
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
