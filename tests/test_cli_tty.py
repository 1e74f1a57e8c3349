"""The `qwen3` command in a real pseudo-terminal (pexpect): what only a terminal gets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect

BIN = Path(sys.executable).parent  # the venv's `qwen3` entry point lives beside python


def spawn(args: list[str], tmp_path: Path) -> pexpect.spawn:
    # PROMPT_TOOLKIT_NO_CPR: no cursor-position request, so nothing has to answer it.
    env = {**os.environ, "TERM": "xterm-256color", "XDG_STATE_HOME": str(tmp_path),
           "QWEN3_MODEL": "demo", "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}  # fmt: skip
    return pexpect.spawn(sys.executable, ["-m", "qwen3_chat", *args], env=env, timeout=60,
                         encoding="utf-8", codec_errors="replace", dimensions=(30, 100))


def finish(child: pexpect.spawn) -> tuple[str, int]:
    child.expect(pexpect.EOF)
    child.close()
    return child.before, child.exitstatus


def test_bare_qwen3_in_a_terminal_starts_the_chat(tmp_path):
    child = spawn([], tmp_path)
    child.expect("qwen3-chat · demo")  # the REPL's banner
    child.expect("›")  # the prompt is drawn: input is read now
    child.sendeof()
    rest, status = finish(child)
    assert status == 0 and "bye" in rest and "Usage" not in rest


def test_a_spinner_shows_while_the_model_loads_on_a_terminal_only(tmp_path):
    child = spawn(["chat", "--no-think", "--temp", "0", "hi"], tmp_path)
    child.expect("loading demo")
    _, status = finish(child)
    assert status == 0
    piped = subprocess.run([sys.executable, "-m", "qwen3_chat", "chat", "-m", "demo",
                            "--no-think", "hi"], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert piped.returncode == 0 and piped.stdout.strip()
    assert "loading" not in piped.stderr and "\x1b" not in piped.stderr


def test_bash_completion_completes_commands_and_options(tmp_path):
    """The script `--show-completion bash` prints, sourced by a real bash, completes."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    script = ('source <(qwen3 --show-completion bash)\n'
              'complete -p qwen3\n'
              'COMP_WORDS=(qwen3 ch); COMP_CWORD=1; _qwen3_completion qwen3\n'
              'echo "commands: ${COMPREPLY[*]}"\n'
              'COMP_WORDS=(qwen3 chat --no-t); COMP_CWORD=2; _qwen3_completion qwen3\n'
              'echo "options: ${COMPREPLY[*]}"\n')  # fmt: skip
    out = subprocess.run(["bash", "--norc", "-c", script], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout  # fmt: skip
    assert "-F _qwen3_completion qwen3" in out
    assert "commands: chat\n" in out and "options: --no-think\n" in out
    installed = subprocess.run(["qwen3", "--install-completion", "bash"], env=env,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    assert "qwen3" in (tmp_path / ".bashrc").read_text()
