"""Template switches (Qwen3.6's preserve_thinking): from ChatSession and the CLI to the template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoints import REAL_VOCAB, make_checkpoint, tiny_config
from typer.testing import CliRunner

from qwen3_chat.chat.template_args import check_template_kwargs, ignored_by_template
from qwen3_chat.chat.tokenizer import template_variables
from qwen3_chat.cli.app import app
from qwen3_chat.errors import Qwen3ChatError, SettingsError

# A small template in the way of Qwen3.6's: past reasoning is kept only with preserve_thinking
# (which also notes itself in a first line, so a one-shot prompt shows that it arrived).
TEMPLATE = """\
{%- if preserve_thinking %}<|im_start|>system
Earlier reasoning is kept.<|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.role == 'assistant' and m.reasoning_content and preserve_thinking %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content }}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% if not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""
PAST = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4.", "reasoning_content": "Two plus two is four."},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    cfg = tiny_config(vocab_size=REAL_VOCAB, tie_word_embeddings=True, hidden_size=16,
                      head_dim=8, intermediate_size=32, num_hidden_layers=1)  # fmt: skip
    path = make_checkpoint(tmp_path_factory.mktemp("tmpl") / "m", cfg,
                           tokenizer_dir=qwen3_tokenizer_dir)  # fmt: skip
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    from qwen3_chat import load

    return load(folder)


def _session(loaded, **kwargs):
    from qwen3_chat import ChatSession

    model, tok = loaded
    s = ChatSession(model, tok, **kwargs)
    s.load_messages(PAST)
    return s


def test_template_kwargs_reach_every_render(loaded):
    tok = loaded[1]
    plain = tok.decode(_session(loaded).render(True))
    kept = _session(loaded, template_kwargs={"preserve_thinking": True})
    assert "Two plus two" not in plain
    assert "Two plus two is four." in tok.decode(kept.render(True))
    assert kept.context_used > _session(loaded).context_used
    kept.template_kwargs = {"preserve_thinking": False}  # changed mid-conversation
    assert tok.decode(kept.render(True)) == plain


def test_template_kwargs_are_saved_and_restored(loaded):
    from qwen3_chat import ChatSession

    d = _session(loaded, template_kwargs={"preserve_thinking": True}).to_dict()
    assert json.loads(json.dumps(d))["template_kwargs"] == {"preserve_thinking": True}
    back = ChatSession.from_dict(*loaded, d)
    assert back.template_kwargs == {"preserve_thinking": True}
    with pytest.raises(Qwen3ChatError, match="template"):
        ChatSession.from_dict(*loaded, {**d, "template_kwargs": {"x": [1]}})


@pytest.mark.parametrize("bad", [["preserve_thinking"], {"a b": True}, {"x": 1.5},
                                 {"enable_thinking": True}, {"x": None}, {"_x": 1}])  # fmt: skip
def test_bad_template_kwargs_are_refused(bad):
    with pytest.raises(SettingsError):
        check_template_kwargs(bad)


def test_unused_switches_are_found_from_the_template_source(loaded):
    assert {"preserve_thinking", "enable_thinking", "messages"} <= template_variables(TEMPLATE)
    assert ignored_by_template(loaded[1], ["preserve_thinking", "nope"]) == ["nope"]


def _cli(folder, *args):
    return CliRunner().invoke(app, ["chat", "-m", str(folder), "--temp", "0", "--max-tokens",
                                    "1", "--json", *args, "hi"])  # fmt: skip


def test_cli_template_arg_reaches_the_template_and_warns_on_unused(folder):
    plain = _cli(folder)
    assert plain.exit_code == 0, plain.stderr
    r = _cli(folder, "--template-arg", "preserve_thinking=true", "--template-arg", "nope=3")
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "nope" in line]
    assert len(warnings) == 1 and "preserve_thinking" not in r.stderr
    tokens = [json.loads(x.stdout)["usage"]["prompt_tokens"] for x in (plain, r)]
    assert tokens[1] > tokens[0]  # the template saw preserve_thinking


@pytest.mark.parametrize("arg", ["preserve_thinking", "enable_thinking=true", "a b=1"])
def test_cli_bad_template_arg_is_one_usage_line(folder, arg):
    r = _cli(folder, "--template-arg", arg)
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "template" in r.stderr and "Traceback" not in r.stderr


def test_set_template_arg_changes_the_session_and_a_refused_one_nothing(loaded):
    from qwen3_chat.cli.settings import set_template_arg

    s = _session(loaded)
    assert set_template_arg(s, "template.preserve_thinking", " true") == ("preserve_thinking", True)
    assert s.template_kwargs == {"preserve_thinking": True}
    with pytest.raises(Qwen3ChatError, match="session itself"):
        set_template_arg(s, "template.enable_thinking", "false")
    with pytest.raises(Qwen3ChatError, match="identifier"):
        set_template_arg(s, "template.", "1")
    assert s.template_kwargs == {"preserve_thinking": True}
    assert set_template_arg(s, "template.preserve_thinking", "default")[1] is None
    assert s.template_kwargs == {}


def test_repl_set_template_in_a_terminal(folder, tmp_path):
    from pty_term import Term

    term = Term(["-m", str(folder), "--temp", "0", "--max-tokens", "1"], tmp_path / "state")
    term.prompt()
    for line, reply in [
        ("/set template.preserve_thinking true", "template preserve_thinking True"),
        ("/set template.nope 1", "does not use nope"),
        ("/settings", r"template\s+preserve_thinking True · nope 1"),
        ("/set template.enable_thinking false", "set by the session itself"),
        ("/exit", "$"),
    ]:
        term.send(line)
        term.expect(reply)
    assert term.close() == 0
