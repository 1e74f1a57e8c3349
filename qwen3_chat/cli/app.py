"""The `qwen3` command line: `qwen3 chat` (REPL or one-shot), `qwen3 show` and the model commands.

Nothing heavy is imported at module level: `qwen3 --help` must not load MLX. The engine,
registry and REPL are imported inside the command that needs them.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from qwen3_chat import __version__
from qwen3_chat.cli import conversations as cli_conversations
from qwen3_chat.cli import hosts as cli_hosts
from qwen3_chat.cli import models as cli_models
from qwen3_chat.cli import serve as cli_serve
from qwen3_chat.cli import show as cli_show
from qwen3_chat.cli.usage import BITS_HELP, check_bits_option, usage_exit
from qwen3_chat.engine.defaults import (  # MLX-free: `qwen3 --help` stays fast
    ALWAYS,
    DEFAULT_BUDGET,
    DEFAULT_MAX_TOKENS,
    NEVER,
    NON_THINKING,
    PRESENCE_PENALTY_MAX,
    PRESENCE_PENALTY_MIN,
    QWEN_SAMPLING,
    SEED_MAX,
    THINKING,
)
from qwen3_chat.errors import Qwen3ChatError, RepoNotFoundError


class _Group(TyperGroup):
    """Errors become one line on stderr: usage errors exit 2, Qwen3ChatError and I/O exit 1."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:  # `qwen3 --nope`: the root's own options fail before invoke
            return super().parse_args(ctx, args)
        except typer.TyperException as e:
            raise _one_line(e) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a full disk must fail here, not in the interpreter's exit
            return result
        except typer.TyperException as e:  # click's usage errors of the subcommands
            raise _one_line(e) from None
        except Qwen3ChatError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except BrokenPipeError:
            # `qwen3 chat ... | head -1`: the reader is gone, which is not an error. Point
            # stdout at devnull so the flush at exit does not complain again.
            _silence_stdout()
            raise typer.Exit(0) from None
        except OSError as e:  # stdout on a full disk, closed or a broken device
            raise _os_error_exit(e) from None


def _one_line(e: Any) -> typer.Exit:
    """click prints usage, a hint and the error on four lines; we print one."""
    ctx = getattr(e, "ctx", None)
    hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
    typer.echo(f"error: {e.format_message()}{hint}", err=True)
    return typer.Exit(getattr(e, "exit_code", 2))


def _os_error_exit(e: OSError) -> typer.Exit:
    """An I/O error no library call turned into a Qwen3ChatError: writing our own output."""
    _silence_stdout()
    where = f"{e.filename}: " if e.filename else "cannot write the output: "
    typer.echo(f"error: {where}{e.strerror or e}", err=True)
    return typer.Exit(1)


class _ClosedStdout:
    """sys.stdout when qwen3 starts with it closed (`>&-`): fails like a file, when written."""

    def _fail(self, *args: Any) -> Any:
        raise OSError(errno.EBADF, "stdout is closed")

    write = fileno = _fail

    def flush(self) -> None:
        pass  # nothing is ever buffered; the interpreter flushes stdout at exit

    def isatty(self) -> bool:
        return False


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (tests): nothing will flush to a closed pipe


app = typer.Typer(
    cls=_Group,
    name="qwen3",
    help="Chat with Qwen3 models locally, on MLX. Without a command: `qwen3 chat`.",
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
    add_completion=True,
    pretty_exceptions_enable=False,  # never dump locals (prompts, paths) in a traceback
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qwen3-chat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Chat with Qwen3 models locally, on MLX. Without a command: `qwen3 chat`."""
    if ctx.invoked_subcommand is not None or ctx.resilient_parsing:
        return
    # Bare `qwen3`: chat in a terminal, answer piped text; with nothing at all piped in
    # (`qwen3 < /dev/null`, cron) there is nothing to answer, so show the help.
    args: list[str] = []
    if not sys.stdin.isatty():
        text = _read_prompt(None)
        if not text.strip():
            typer.echo(ctx.get_help())
            raise typer.Exit(0)
        args = ["--", text]  # "--": piped text that starts with "-" is not an option
    command = ctx.command.get_command(ctx, "chat")
    with command.make_context("chat", args, parent=ctx) as sub:
        command.invoke(sub)


def _read_prompt(prompt: str | None) -> str:
    """PROMPT plus all of stdin when stdin is not a terminal; bad UTF-8 is replaced."""
    parts = [prompt] if prompt else []
    if not sys.stdin.isatty():
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        if isinstance(raw, bytes):
            text = raw.decode("utf-8", errors="replace")
            if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
                typer.echo("warning: stdin is not valid UTF-8; bad bytes were replaced", err=True)
        else:
            text = raw
        if text.strip():
            parts.append(text)
    return "\n\n".join(p.strip("\n") for p in parts)


def _overrides(**given: Any) -> dict[str, Any]:
    """The sampling options the user set; each mode's defaults fill in the rest. Checked
    before any model loads: a value SamplingParams refuses is a usage error like a bad flag."""
    from qwen3_chat.cli.settings import check_knob

    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        for name, value in overrides.items():
            check_knob(name, value)
    except Qwen3ChatError as e:
        raise usage_exit(str(e)) from None
    return overrides


@app.command(cls=cli_conversations.ChatCommand)
def chat(
    prompt: str | None = typer.Argument(None, help="Ask once and exit (stdin is appended)."),
    model_name: str | None = typer.Option(None, "--model", "-m", metavar="NAME|PATH",
        help="Alias from models.toml, Hugging Face repo id, or local folder [env: QWEN3_MODEL]."),
    think: bool | None = typer.Option(None, "--think/--no-think",
        help="Thinking mode (default: on for models that can think)."),
    budget: int | None = typer.Option(None, "--budget", min=0,
        help=f"Most reasoning tokens before the answer is forced [default: {DEFAULT_BUDGET}]."),
    no_budget: bool = typer.Option(False, "--no-budget", help="Let the model think unbounded."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", min=1,
                                   help="Most answer tokens."),
    temp: float | None = typer.Option(None, "--temp", min=0.0,
        help=f"Temperature [default: {QWEN_SAMPLING[THINKING]['temperature']} thinking, "
             f"{QWEN_SAMPLING[NON_THINKING]['temperature']} not]."),
    top_p: float | None = typer.Option(None, "--top-p", min=0.0, max=1.0),
    top_k: int | None = typer.Option(None, "--top-k", min=0),
    min_p: float | None = typer.Option(None, "--min-p", min=0.0, max=1.0),
    presence_penalty: float | None = typer.Option(None, "--presence-penalty",
                                                    min=PRESENCE_PENALTY_MIN,
                                                    max=PRESENCE_PENALTY_MAX),
    seed: int | None = typer.Option(None, "--seed", min=0, max=SEED_MAX,
                                    help="Seed for reproducible sampling (0 to 2**64-1)."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    show_thinking: bool = typer.Option(False, "--show-thinking/--hide-thinking",
        help="Keep the reasoning visible (one-shot: on stderr)."),
    as_json: bool = typer.Option(False, "--json", help="One-shot: print one JSON object."),
    as_jsonl: bool = typer.Option(False, "--jsonl",
        help="One-shot: stream JSON Lines events (reasoning, answer, thinking_done, "
             "context_trimmed, finished)."),
    bits: int | None = typer.Option(None, "--bits", help=f"{BITS_HELP}."),
    files: list[str] | None = typer.Option(None, "--file", "-f", metavar="FILE",
        help="Attach a UTF-8 text file to the first message (repeatable)."),
    resume: str | None = typer.Option(None, "--resume", metavar="[ID]",
        help="Continue the latest saved conversation, or ID (`qwen3 conversations`)."),
    hosts: str | None = typer.Option(None, "--hosts", metavar="FILE", help=cli_hosts.HOSTS_HELP),
    parallel: str | None = typer.Option(None, "--parallel", help=cli_hosts.PARALLEL_HELP),
    backend: str | None = typer.Option(None, "--backend", help=cli_hosts.BACKEND_HELP),
    speculate: str = typer.Option("auto", "--speculate", metavar="auto|off|lookup|draft|mtp",
        help="Speculative decoding (exact: the same output, faster when drafts are right); "
             "mtp drafts with the model's own multi-token-prediction head."),
    draft: str | None = typer.Option(None, "--draft", metavar="MODEL",
        help="Draft model for --speculate draft (sharing the tokenizer)."),
    template_args: list[str] | None = typer.Option(None, "--template-arg", metavar="NAME=VALUE",
        help="A switch of the model's chat template, e.g. preserve_thinking=true (repeatable)."),
) -> None:
    """Chat with a model: a REPL in a terminal, one answer when PROMPT or stdin is given."""
    check_bits_option(bits)
    overrides = _overrides(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                           presence_penalty=presence_penalty, seed=seed)  # fmt: skip
    template_kwargs = _template_kwargs(template_args or [])
    from qwen3_chat.cli.speculation import parse_request, start_speculation

    request = parse_request(speculate, draft, bits=bits, distributed=hosts is not None)
    if budget is not None and no_budget:
        raise usage_exit("--budget and --no-budget cannot be used together")
    if as_json and as_jsonl:
        raise usage_exit("--json and --jsonl cannot be used together")
    output = "json" if as_json else "jsonl" if as_jsonl else "text"
    interactive = prompt is None and sys.stdin.isatty() and output == "text"
    if resume and not interactive:  # said first: "empty prompt" would mislead here
        raise usage_exit("--resume continues a conversation in the REPL: drop PROMPT and stdin")
    text = "" if interactive else _read_prompt(prompt)
    if not interactive and not text.strip() and not files:
        raise usage_exit("empty prompt: give PROMPT or pipe text on stdin")

    from qwen3_chat.chat.session import ChatSession
    from qwen3_chat.cli.progress import open_with_status

    if model_name is None and resume:  # the conversation's own model, unless -m says otherwise
        model_name = cli_conversations.saved_model(resume)
    loaded = _open_chat_model(model_name, bits=bits, hosts=hosts, parallel=parallel,
                              backend=backend)  # fmt: skip
    _warn_unhonoured(think, loaded.name, loaded.capability)
    warn_ignored_template_args(loaded.tokenizer, template_kwargs)
    thinking = (loaded.capability != NEVER) if think is None else think
    session = ChatSession(
        loaded.model, loaded.tokenizer, system=system,
        thinking=thinking or loaded.capability == ALWAYS,
        budget=None if no_budget else (DEFAULT_BUDGET if budget is None else budget),
        max_tokens=max_tokens, capability=loaded.capability,
        sampling_overrides=overrides,
        mode_sampling=loaded.mode_sampling,
        context_length=loaded.context_length,
        template_kwargs=template_kwargs,
    )  # fmt: skip
    session.speculation = start_speculation(request, loaded)
    from qwen3_chat.cli.attachments import read_attachments, with_attachments

    attached = read_attachments(files or [], session)
    if interactive:
        from qwen3_chat.cli.repl import Repl

        switch = open_with_status if hosts is None else cli_hosts.refuse_model_switch
        Repl(session, loaded, open_model=switch, show_thinking=show_thinking,
             attachments=attached, resume=resume, speculate=request).run()  # fmt: skip
        return
    text = with_attachments(text, attached)
    from qwen3_chat.cli.oneshot import one_shot

    one_shot(session, loaded.name, text, show_thinking=show_thinking, output=output)


def _template_kwargs(args: list[str]) -> dict[str, Any]:
    """--template-arg NAME=VALUE, each checked before any model loads (a usage error)."""
    from qwen3_chat.chat.template_args import parse_template_arg

    try:
        return dict(parse_template_arg(a) for a in args)
    except Qwen3ChatError as e:
        raise usage_exit(str(e)) from None


def warn_ignored_template_args(tokenizer: Any, names: Any) -> None:
    """A switch the template never reads does nothing: say so, once per name."""
    from qwen3_chat.chat.template_args import ignored_by_template
    from qwen3_chat.cli.settings import template_arg_warning

    for name in ignored_by_template(tokenizer, names):
        typer.echo(template_arg_warning(name), err=True)


def _open_chat_model(name: str | None, *, bits: int | None, **where: Any) -> Any:
    """-m NAME, or the default for this machine; a memory-chosen default whose repo the Hub
    does not have (a newer family's name may not be published yet) falls back to the
    registry's shipped default, with one line saying so."""
    if name is not None:
        return cli_hosts.open_chat_model(name, bits=bits, **where)
    chosen = cli_models.default_model(bits)
    try:
        return cli_hosts.open_chat_model(chosen, bits=bits, **where)
    except RepoNotFoundError as e:
        from qwen3_chat.hub.registry import load_registry

        fallback = load_registry().default
        if chosen == fallback:
            raise
        typer.echo(f"note: {e}; using {fallback} instead", err=True)
        return cli_hosts.open_chat_model(fallback, bits=bits, **where)


def _warn_unhonoured(think: bool | None, name: str, capability: str) -> None:
    """--think/--no-think that the model's template cannot honour: say so, once."""
    if think is False and capability == ALWAYS:
        typer.echo(f"warning: {name} always thinks; --no-think is ignored", err=True)
    elif think is True and capability == NEVER:
        typer.echo(f"warning: {name} cannot think; --think is ignored", err=True)


cli_show.register(app)
cli_models.register(app)
cli_serve.register(app)
cli_conversations.register(app)
cli_hosts.register(app)


def main() -> None:
    """Entry point: also ends quietly when stdout is closed early (`| head -1`)."""
    if sys.stdout is None:  # Python's stand-in for a closed descriptor 1
        sys.stdout = _ClosedStdout()  # type: ignore[assignment]
    try:
        app()
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(0)
    except OSError as e:  # while parsing, e.g. `qwen3 -h >&-`, before _Group.invoke
        sys.exit(_os_error_exit(e).exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
