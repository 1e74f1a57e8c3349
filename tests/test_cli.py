"""The `qwen3` CLI, one-shot and piped: real demo model, real subprocesses where it matters."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import REAL_VOCAB, make_checkpoint, tiny_config
from typer.testing import CliRunner

from qwen3_chat.cli.app import app

ANSI = re.compile(r"\x1b\[")
QUESTION = "What is 23 + 14?"
JSON_KEYS = {"answer", "reasoning", "model", "usage", "timings", "finish_reason", "budget_hit",
             "speculation"}  # fmt: skip


def run(*args: str, input: str | bytes | None = None, env: dict | None = None):
    return CliRunner().invoke(app, list(args), input=input, env=env)


def chat_json(*args: str, input: str | None = None) -> dict:
    result = run("chat", "-m", "demo", "--temp", "0", "--json", *args, input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def demo_reference() -> tuple[str, str]:
    """The demo model's greedy reply to QUESTION, computed through the library directly."""
    from qwen3_chat import ChatSession, SamplingParams, load
    from qwen3_chat.demo import DEMO_MODEL_DIR
    from qwen3_chat.engine.events import Finished

    model, tok = load(DEMO_MODEL_DIR)
    session = ChatSession(model, tok, sampling=SamplingParams(temperature=0), budget=4096)
    done = [e for e in session.send(QUESTION) if isinstance(e, Finished)][0]
    assert done.answer and done.reasoning
    return done.reasoning, done.answer


@pytest.fixture(scope="module")
def random_model(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """Random weights + the real tokenizer: never says <|im_end|>, so it runs to max-tokens.

    Full Qwen3 vocabulary (the template's special ids must exist) on a tiny tied body.
    """
    cfg = tiny_config(vocab_size=REAL_VOCAB, tie_word_embeddings=True, hidden_size=16,
                      head_dim=8, intermediate_size=32, num_hidden_layers=1)
    path = tmp_path_factory.mktemp("random") / "tiny"
    return make_checkpoint(path, cfg, tokenizer_dir=qwen3_tokenizer_dir)


def test_help_and_version_do_not_import_mlx():
    code = ("import sys\nfrom qwen3_chat.cli.app import app\nfrom typer.testing import CliRunner\n"
            "r = CliRunner().invoke(app, ['--help'])\n"
            "assert r.exit_code == 0 and 'chat' in r.stdout, r.output\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', "
            "'transformers', 'numpy'))\nprint(heavy)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # The installed entry point, as a user runs it; -X importtime lists every module loaded.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qwen3_chat", "--help"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "chat" in proc.stdout
    # Deterministic stand-in for a wall-clock bound: nothing heavy is imported at all.
    loaded = set(re.findall(r"\|\s+([\w.]+)\s*$", proc.stderr, re.M))
    heavy = {"mlx", "numpy", "huggingface_hub", "tokenizers", "jinja2", "safetensors",
             "transformers", "prompt_toolkit"}  # fmt: skip
    assert loaded and not {m.split(".")[0] for m in loaded} & heavy
    version = run("--version")
    assert version.exit_code == 0 and re.fullmatch(r"qwen3-chat \d+\.\d+\.\d+\s*", version.stdout)


def test_chat_help_lists_every_option():
    result = run("chat", "--help")
    assert result.exit_code == 0
    for opt in ("--model", "-m", "--think", "--no-think", "--budget", "--max-tokens", "--temp",
                "--top-p", "--top-k", "--min-p", "--presence-penalty", "--seed", "--system",
                "--show-thinking", "--hide-thinking", "--json", "--bits"):  # fmt: skip
        assert opt in result.stdout, opt


def _bits_options(command, path=()):
    """(command path, help) of every --bits option in the click tree under `command`."""
    for param in command.params:
        if "--bits" in getattr(param, "opts", ()):
            yield " ".join(path), param.help
    for name, sub in getattr(command, "commands", {}).items():
        yield from _bits_options(sub, (*path, name))


def test_every_bits_help_names_the_bits_models_config_allows():
    # Each --bits help says what models.config allows, in the same words (before: chat, show,
    # serve, hosts and the model commands each spelled "4, 8, 16" their own way).
    import typer

    from qwen3_chat.cli.usage import BITS_HELP
    from qwen3_chat.models.config import BITS, QUANT_BITS

    options = dict(_bits_options(typer.main.get_command(app)))
    assert {"chat", "show", "serve", "download", "rm", "hosts check"} <= set(options)
    for where, text in options.items():
        allowed = QUANT_BITS if where == "convert" else BITS  # convert only quantizes
        assert set(re.findall(r"\d+", text)) == set(map(str, allowed)), where
        assert where == "convert" or BITS_HELP in text, where


def test_one_shot_prints_only_the_answer_plain(demo_reference):
    reasoning, answer = demo_reference
    result = run("chat", "-m", "demo", "--temp", "0", QUESTION)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == answer + "\n"  # the same reply the library gives, nothing else
    assert not ANSI.search(result.stdout) and reasoning not in result.stderr


def test_piped_stdin_is_the_prompt_and_prompt_arg_is_prepended(demo_reference):
    _, answer = demo_reference
    piped = run("chat", "-m", "demo", "--temp", "0", input=QUESTION + "\n")
    assert piped.exit_code == 0 and piped.stdout == answer + "\n"
    both = chat_json("Please answer.", input=QUESTION)
    alone = chat_json(QUESTION)
    assert both["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"]


def test_show_thinking_sends_reasoning_to_stderr_only(demo_reference):
    reasoning, answer = demo_reference
    result = run("chat", "-m", "demo", "--temp", "0", "--show-thinking", QUESTION)
    assert result.exit_code == 0
    assert result.stdout == answer + "\n"
    assert reasoning in result.stderr and "Thought for" in result.stderr
    assert not ANSI.search(result.stderr)


def test_json_schema(demo_reference):
    reasoning, answer = demo_reference
    out = chat_json(QUESTION)
    assert set(out) == JSON_KEYS
    assert out["answer"] == answer and out["reasoning"] == reasoning and out["model"] == "demo"
    assert set(out["usage"]) == {"prompt_tokens", "reasoning_tokens", "answer_tokens"}
    assert all(isinstance(v, int) and v > 0 for v in out["usage"].values())
    assert {"ttft_s", "total_s"} <= set(out["timings"])
    assert 0 < out["timings"]["ttft_s"] <= out["timings"]["total_s"]
    assert out["finish_reason"] == "stop" and out["budget_hit"] is False


def test_no_think_and_budget_and_max_tokens():
    plain = chat_json("--no-think", QUESTION)
    assert plain["reasoning"] == "" and plain["usage"]["reasoning_tokens"] == 0 and plain["answer"]
    cut = chat_json("--budget", "5", QUESTION)
    assert cut["budget_hit"] is True and cut["answer"]
    short = chat_json("--max-tokens", "3", "--no-think", QUESTION)
    assert short["finish_reason"] == "length" and short["usage"]["answer_tokens"] == 3


def test_sampling_options_and_seed_are_reproducible():
    args = ("--temp", "1.0", "--top-p", "0.9", "--top-k", "50", "--min-p", "0.05",
            "--presence-penalty", "0.5", "--seed", "7", QUESTION)  # fmt: skip
    assert chat_json(*args)["answer"] == chat_json(*args)["answer"]


def test_system_prompt_reaches_the_model():
    bare = chat_json("--no-think", QUESTION)
    with_system = chat_json("--no-think", "--system", "You are terse.", QUESTION)
    assert with_system["usage"]["prompt_tokens"] > bare["usage"]["prompt_tokens"]


def test_model_from_environment(demo_reference):
    result = run("chat", "--temp", "0", "--json", QUESTION, env={"QWEN3_MODEL": "demo"})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "demo"


@pytest.mark.parametrize("stdin", ["", "  \n\n"])
def test_empty_prompt_exits_2_with_one_line(stdin):
    result = run("chat", "-m", "demo", input=stdin)
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "empty prompt" in result.stderr


def test_prompt_longer_than_context_exits_2():
    result = run("chat", "-m", "demo", input="12 + 30 " * 2000)
    assert result.exit_code == 2 and result.stdout == ""
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "longer than the model's context of 2048" in line


def _usage_error(*args: str) -> str:
    """A usage error: exit 2, nothing on stdout, one line on stderr (returned)."""
    result = run(*args)
    assert result.exit_code == 2 and result.stdout == "", (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_bad_bits_exits_2():
    assert "--bits must be 4, 8 or 16" in _usage_error("chat", "-m", "demo", "--bits", "3", "hi")


def test_bits_16_means_the_original_weights():
    out = chat_json("--bits", "16", "--no-think", QUESTION)
    assert out["answer"] and out["model"] == "demo"


@pytest.mark.parametrize("seed", ["-5", str(2**64), "x"])
def test_bad_seed_is_a_usage_error(seed):
    assert "--seed" in _usage_error("chat", "-m", "demo", "--seed", seed, "hi")


@pytest.mark.parametrize("option, value", [("--top-p", "0"), ("--min-p", "1")])
def test_a_sampling_value_the_library_refuses_is_a_usage_error(option, value):
    # Before: the model loaded first, then ChatSession refused it with exit status 1.
    line = _usage_error("chat", "-m", "demo", option, value, "hi")
    assert option[2:].replace("-", "_") in line


def test_resume_without_a_terminal_says_why_not_empty_prompt():
    # Before: `qwen3 chat --resume < /dev/null` (a script, cron) said "empty prompt".
    assert "--resume continues a conversation in the REPL" in _usage_error(
        "chat", "-m", "demo", "--resume", "latest")


def test_seed_limits_are_accepted():
    assert chat_json("--seed", "0", "--no-think", "--max-tokens", "2", "--temp", "1", QUESTION)
    assert chat_json("--seed", str(2**64 - 1), "--no-think", "--max-tokens", "2", "--temp", "1",
                     QUESTION)  # fmt: skip


def test_budget_with_no_budget_is_rejected():
    line = _usage_error("chat", "-m", "demo", "--budget", "5", "--no-budget", "hi")
    assert "--budget" in line and "--no-budget" in line


def test_option_errors_are_one_line():
    assert "--top-p" in _usage_error("chat", "-m", "demo", "--top-p", "2", "hi")
    assert "--nope" in _usage_error("chat", "--nope")


@pytest.mark.parametrize("args", [[], ["chat"], ["models"], ["download"], ["rm"], ["convert"]])
def test_dash_h_is_help(args):
    short, long = run(*args, "-h"), run(*args, "--help")
    assert short.exit_code == 0 and short.stdout == long.stdout and "Usage:" in short.stdout


def test_bare_qwen3_with_nothing_piped_prints_help():
    result = run(input="")
    assert result.exit_code == 0 and "Usage:" in result.stdout and "chat" in result.stdout


def test_bare_qwen3_with_piped_text_answers_it():
    result = run(input=QUESTION, env={"QWEN3_MODEL": "demo"})
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and not ANSI.search(result.stdout)  # like `qwen3 chat`


def _closed_stdout(*args: str) -> subprocess.CompletedProcess:
    """Run qwen3 with file descriptor 1 closed, as `qwen3 ... >&-` does."""
    return subprocess.run([sys.executable, "-m", "qwen3_chat", *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1))  # fmt: skip


@pytest.mark.parametrize("args", [["chat", "-m", "demo", "--no-think", "hi"],
                                  ["chat", "-m", "demo", "--json", "--no-think", "hi"],
                                  ["show", "demo"], ["-h"]])  # fmt: skip
def test_closed_stdout_is_one_line_not_a_traceback(args):
    proc = _closed_stdout(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "error: cannot write the output: stdout is closed"


def test_stdout_full_is_one_line_not_a_traceback():
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "qwen3_chat", "chat", "-m", "demo",
                               "--temp", "0", QUESTION], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr


def test_invalid_utf8_is_replaced_with_a_warning():
    result = run("chat", "-m", "demo", "--temp", "0", "--json", input=b"What is 2 + 3?\xff\xfe\n")
    assert result.exit_code == 0
    assert "not valid UTF-8" in result.stderr
    assert json.loads(result.stdout)["usage"]["prompt_tokens"] > 0


def _one_line_error(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "qwen3_chat", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_model_is_one_stderr_line_exit_1(tmp_path):
    assert "not found" in _one_line_error(["chat", "-m", str(tmp_path / "missing"), "hi"])
    broken = tmp_path / "llama"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(tiny_config(model_type="llama")))
    line = _one_line_error(["chat", "-m", str(broken), "hi"])
    assert line.startswith("error: ") and "llama" in line


def test_piped_into_head_ends_quietly(random_model):
    cmd = [sys.executable, "-m", "qwen3_chat", "chat", "-m", str(random_model), "--seed", "0",
           "--max-tokens", "100000", "hi"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(64)  # text is streaming; now the reader goes away, like head
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err


@pytest.fixture(scope="module")
def family_models(random_model, qwen3_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """The random model under Qwen's Thinking-2507 (always) and Instruct-2507 (never) templates."""
    out = {}
    for capability, template in (("always", "Qwen3-4B-Thinking-2507"),
                                 ("never", "Qwen3-Instruct-2507")):  # fmt: skip
        path = tmp_path_factory.mktemp(capability) / template
        shutil.copytree(random_model, path)
        shutil.copyfile(qwen3_tokenizer_dir / "family" / template / "chat_template.jinja",
                        path / "chat_template.jinja")  # fmt: skip
        out[capability] = path
    return out


@pytest.mark.parametrize("capability, flag, says", [
    ("always", "--no-think", "always thinks"),
    ("never", "--think", "cannot think"),
])  # fmt: skip
def test_thinking_flag_the_model_cannot_honour_is_reported(family_models, capability, flag, says):
    args = ("chat", "-m", str(family_models[capability]), "--json", "--seed", "0",
            "--budget", "2", "--max-tokens", "2", "hi")  # fmt: skip
    told = run(*args[:3], flag, *args[3:])
    assert told.exit_code == 0, told.output
    warnings = [ln for ln in told.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and says in warnings[0] and flag in warnings[0]
    reasoning = json.loads(told.stdout)["usage"]["reasoning_tokens"]
    assert (reasoning > 0) == (capability == "always")  # the model did what it must
    quiet = run(*args)  # without the flag there is nothing to say
    assert quiet.exit_code == 0 and "warning:" not in quiet.stderr
