"""A qwen3 REPL in a real pseudo-terminal (pexpect), answering like a terminal would."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pexpect
from checkpoints import REAL_VOCAB, make_checkpoint, tiny_config

ROWS, COLS = 30, 100
DEMO = ["-m", "demo", "--temp", "0", "--no-think"]  # greedy, short answers
# Chat template with no enable_thinking switch: the CLI must treat the model as "never".
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Term:
    """`qwen3 chat ARGS` in a pty that answers prompt-toolkit's cursor-position requests."""

    def __init__(self, args: list[str], state: Path, timeout: float = 30,
                 env: dict[str, str] | None = None, cwd: Path | None = None):  # fmt: skip
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLS),
               "LINES": str(ROWS), "XDG_STATE_HOME": str(state), "NO_COLOR": "1",
               **(env or {})}  # fmt: skip
        # Ctrl-C makes the tty driver flush its output queue, which can cut a UTF-8
        # character in half: decode leniently, as a terminal would.
        self.child = pexpect.spawn(sys.executable, ["-m", "qwen3_chat", "chat", *args], env=env,
                                   encoding="utf-8", codec_errors="replace",
                                   dimensions=(ROWS, COLS), timeout=timeout,
                                   cwd=cwd)  # fmt: skip
        self.seen = ""  # everything printed since the last send
        self.transcript = ""  # everything printed

    def expect(self, pattern: str) -> str:
        while True:
            i = self.child.expect([r"\x1b\[6n", pattern])
            self.seen += self.child.before
            self.transcript += self.child.before + self.child.after
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

    def ask(self, line: str) -> None:
        """Send a message and wait for the reply's stats line."""
        self.send(line)
        self.expect("tok/s")

    def paste(self, text: str) -> None:
        """A bracketed paste, as a terminal sends it (newlines inside do not submit)."""
        self.seen = ""
        self.child.send(f"\x1b[200~{text}\x1b[201~")

    def close(self) -> int:
        self.child.expect(pexpect.EOF)
        self.transcript += self.child.before
        self.child.close()
        return self.child.exitstatus


def make_never_model(folder: Path, qwen3_tokenizer_dir: Path) -> Path:
    """Random weights + real tokenizer, with a template that cannot switch thinking on.

    The full Qwen3 vocabulary (so the template's special tokens are valid ids) on a tiny,
    tied 16-wide body: ~10 MB, and it practically never samples <|im_end|>.
    """
    cfg = tiny_config(vocab_size=REAL_VOCAB, tie_word_embeddings=True, hidden_size=16,
                      head_dim=8, intermediate_size=32, num_hidden_layers=1)
    path = make_checkpoint(folder / "m", cfg,
                           tokenizer_dir=qwen3_tokenizer_dir)  # fmt: skip
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = PLAIN_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path
