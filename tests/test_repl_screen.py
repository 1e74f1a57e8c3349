"""What the REPL leaves on a real screen: a pty (pexpect) read through a terminal emulator (pyte).

The models are built so their output is known: one layer that adds nothing to the residual
makes the logits a function of the current token alone, so a "script" of token ids can be
laid down as a chain (each token points at the next); tokens off the script get random
directions (random text) or none.
"""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path

import pyte
import pytest
from checkpoints import REAL_VOCAB, hf_weights, make_checkpoint, tiny_config
from pty_term import Term

ROWS, COLS = 12, 60
THINK_START, IM_END = 151667, 151645  # <think>, <|im_end|> (an eos)
THINK_PROMPT_END, NO_THINK_PROMPT_END = 198, 271  # last prompt token: "\n" / "\n\n"
ANSWER = "Hi \x1b]0;pwned\x07 there done"  # sets the window title if it reaches the screen
REASONING = "Plan:\x9b2J\x7f\x08ok"  # an 8-bit CSI "clear screen", DEL, BS


def chain_checkpoint(path: Path, tokenizer_dir: Path, scripts: list[list[int]], *,
                     hidden: int, random_rest: bool) -> Path:  # fmt: skip
    """A real checkpoint whose greedy (or sampled: the margin is huge) output follows `scripts`."""
    cfg = tiny_config(vocab_size=REAL_VOCAB, hidden_size=hidden, head_dim=8,
                      intermediate_size=16, num_hidden_layers=1, tie_word_embeddings=False)
    w = hf_weights(cfg, seed=1)
    w["model.layers.0.self_attn.o_proj.weight"][:] = 0  # the layer adds nothing:
    w["model.layers.0.mlp.down_proj.weight"][:] = 0  # logits depend on the current token only
    w["model.norm.weight"][:] = 1
    emb, head = w["model.embed_tokens.weight"], w["lm_head.weight"]
    links = [(a, b) for s in scripts for a, b in pairwise(s)]
    assert len({a for a, _ in links}) == len(links) < hidden, "script tokens must not repeat"
    k = len(links)  # one private dimension per link; random text lives in the others
    emb[:, :k] = head[:, :k] = 0
    if not random_rest:
        emb[:] = 0  # off-script: all logits equal
    for i, (a, b) in enumerate(links):
        emb[a] = 0
        emb[a, i] = 1
        head[b, i] = 50.0
    return make_checkpoint(path, cfg, weights=w, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """No-think: answers ANSWER. Think: reasons REASONING, then ends (eos) inside <think>."""
    from qwen3_chat.chat.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(qwen3_tokenizer_dir)
    scripts = [[NO_THINK_PROMPT_END, *tok.encode(ANSWER), IM_END],
               [THINK_PROMPT_END, THINK_START, *tok.encode(REASONING), IM_END]]  # fmt: skip
    return chain_checkpoint(tmp_path_factory.mktemp("scripted"), qwen3_tokenizer_dir, scripts,
                            hidden=32, random_rest=False)  # fmt: skip


@pytest.fixture(scope="module")
def rambler(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """Random text without end: the answer (no-think), or reasoning after <think> (think)."""
    return chain_checkpoint(tmp_path_factory.mktemp("rambler"), qwen3_tokenizer_dir,
                            [[THINK_PROMPT_END, THINK_START]], hidden=16, random_rest=True)


class Screen(Term):
    """A small-screen REPL (colours on) whose transcript is replayed through a terminal."""

    def __init__(self, args: list[str], state: Path):
        super().__init__(args, state, timeout=60,
                         env={"COLUMNS": str(COLS), "LINES": str(ROWS), "NO_COLOR": ""})
        self.child.setwinsize(ROWS, COLS)

    def prompt(self) -> None:
        self.expect(r"│ (no_)?think │")  # the toolbar (cut short on this narrow screen)

    def screen(self) -> pyte.HistoryScreen:
        screen = pyte.HistoryScreen(COLS, ROWS, history=5000)
        pyte.Stream(screen).feed(self.transcript)
        return screen

    def lines(self) -> list[str]:
        """Scrollback and screen, as text."""
        screen = self.screen()
        rows = [*screen.history.top, *(screen.buffer[y] for y in range(ROWS))]
        return ["".join(row[x].data for x in range(COLS)).rstrip() for row in rows]

    def between(self, start: str, end: str) -> list[str]:
        """The lines after the last line starting with `start`, up to one containing `end`."""
        lines = self.lines()
        first = max(i for i, ln in enumerate(lines) if ln.startswith(start))
        last = next(i for i in range(first, len(lines)) if end in lines[i])
        return lines[first + 1:last]


def assert_each_line_once(lines: list[str]) -> None:
    text = [ln for ln in lines if ln.strip()]
    repeated = {ln for ln in text if text.count(ln) > 1}
    assert text and not repeated, f"{len(repeated)} line(s) shown more than once: {repeated}"


def test_long_answer_reaches_the_scrollback_once(tmp_path, rambler):
    term = Screen(["-m", str(rambler), "--no-think", "--seed", "3", "--max-tokens", "400"],
                  tmp_path)  # fmt: skip
    term.prompt()
    term.send("hello")
    term.expect("tok/s")
    term.prompt()
    answer = term.between("› hello", "tok/s")
    assert len(answer) > 2 * ROWS  # taller than the terminal: the case that flooded
    assert_each_line_once(answer)
    term.send("/exit")
    assert term.close() == 0


def test_model_escape_sequences_never_reach_the_terminal(tmp_path, scripted):
    term = Screen(["-m", str(scripted), "--no-think", "--temp", "0"], tmp_path)
    term.prompt()
    term.send("hi")
    term.expect("tok/s")
    term.send("/think")
    term.expect("thinking on")
    term.send("why?")
    term.expect("tok/s")
    term.send("/show")
    term.expect("reasoning of answer 2")
    term.prompt()
    term.send("/exit")
    assert term.close() == 0
    shown = "\n".join(term.lines())
    assert "Hi ]0;pwned there done" in shown  # the text is shown, its controls are not
    assert "Plan:2Jok" in shown  # a backspace that reached the screen would eat the J
    assert term.screen().title == ""  # OSC 0 would have set it
    for seq in ("\x1b]0;pwned", "\x07", "\x9b"):  # (prompt-toolkit itself sends BS and DEL)
        assert seq not in term.transcript, f"{seq!r} reached the terminal"


def test_eos_inside_thinking_is_not_blamed_on_max_tokens(tmp_path, scripted):
    term = Screen(["-m", str(scripted), "--think", "--temp", "0"], tmp_path)
    term.prompt()
    term.send("why?")
    term.expect("tok/s")
    term.prompt()
    said = "\n".join(term.lines())
    assert "the model stopped while thinking, without an answer" in said
    assert "max-tokens" not in said
    term.send("/exit")
    assert term.close() == 0


@pytest.mark.parametrize("think", [False, True], ids=["answer", "thinking"])
def test_ctrl_c_with_type_ahead_leaves_a_clean_screen(tmp_path, rambler, think):
    state = tmp_path / "state"
    mode = "--think" if think else "--no-think"
    term = Screen(["-m", str(rambler), mode, "--seed", "5", "--no-budget",
                   "--max-tokens", "100000"], state)  # fmt: skip
    term.prompt()
    term.send("hello")
    # The live part is being drawn: the reply is streaming (random weights never stop).
    term.expect("thinking · " if think else r"\x1b\[\?25l")
    if not think:
        term.expect(r"(?s).{3000}")  # a few screens' worth of answer drawn
    term.child.send("typed ahead")
    term.child.send("\x03")
    term.expect(r"\[interrupted\]")
    term.prompt()
    term.send("/save " + str(tmp_path / "c.json"))  # the type-ahead would prefix this
    term.expect("saved 2 messages")
    term.prompt()
    term.send("/exit")
    assert term.close() == 0
    shown = term.lines()
    said = "\n".join(shown)
    assert "^C" not in said and "typed ahead" not in said
    assert not any(ln.lstrip().startswith(("╭", "╰", "│")) for ln in shown)  # no panel left
    if think:
        assert re.search(r"▸ Thinking interrupted after \d+ tokens?", said)
    else:
        partial = term.between("› hello", "[interrupted]")
        assert_each_line_once(partial)
    reply = json.loads((tmp_path / "c.json").read_text())["messages"][1]
    assert reply["interrupted"] and (reply.get("reasoning_content") if think else reply["content"])


def test_keys_typed_during_an_answer_wait_for_the_next_prompt(tmp_path, rambler):
    term = Screen(["-m", str(rambler), "--no-think", "--seed", "7", "--max-tokens", "300"],
                  tmp_path)  # fmt: skip
    term.prompt()
    term.send("hello")
    term.expect(r"\x1b\[\?25l")  # the answer is streaming
    term.child.send("next question")  # not echoed into the answer...
    term.expect("tok/s")
    term.prompt()  # ...but waiting in the next prompt
    shown = term.lines()
    assert [ln for ln in shown if "next question" in ln] == ["› next question"]
    term.child.send("\x15/exit\r")  # Ctrl-U clears the line
    assert term.close() == 0
