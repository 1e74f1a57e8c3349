"""The `qwen3` command line: `qwen3 chat` (REPL or one-shot) plus the model commands.

Nothing heavy is imported at module level: `qwen3 --help` must not load MLX. The engine,
registry and REPL are imported inside the command that needs them.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from qwen3_chat import __version__
from qwen3_chat.cli import models as cli_models
from qwen3_chat.errors import Qwen3ChatError

# Thinking budget when none is given: long enough for Qwen3's usual reasoning on everyday
# questions, short enough that a runaway chain of thought ends within a minute or two.
DEFAULT_BUDGET = 4096
# Room for long answers (Qwen recommends 32768 for hard problems; this fits most chats).
DEFAULT_MAX_TOKENS = 8192


class _Group(TyperGroup):
    """Every command's Qwen3ChatError becomes one line on stderr and exit 1, no traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Qwen3ChatError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except BrokenPipeError:
            # `qwen3 chat ... | head -1`: the reader is gone, which is not an error. Point
            # stdout at devnull so the flush at exit does not complain again.
            _silence_stdout()
            raise typer.Exit(0) from None


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (tests): nothing will flush to a closed pipe


app = typer.Typer(
    cls=_Group,
    name="qwen3",
    help="Chat with Qwen3 models locally, on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # never dump locals (prompts, paths) in a traceback
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qwen3-chat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Chat with Qwen3 models locally, on MLX."""


cli_models.register(app)


# -- chat ---------------------------------------------------------------------------------
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
    """The sampling options the user set; each mode's defaults fill in the rest."""
    return {k: v for k, v in given.items() if v is not None}


def _usage_exit(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@app.command()
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
        help="Temperature [default: 0.6 thinking, 0.7 not]."),
    top_p: float | None = typer.Option(None, "--top-p", min=0.0, max=1.0),
    top_k: int | None = typer.Option(None, "--top-k", min=0),
    min_p: float | None = typer.Option(None, "--min-p", min=0.0, max=1.0),
    presence_penalty: float | None = typer.Option(None, "--presence-penalty", min=0.0, max=2.0),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    show_thinking: bool = typer.Option(False, "--show-thinking/--hide-thinking",
        help="Keep the reasoning visible (one-shot: on stderr)."),
    as_json: bool = typer.Option(False, "--json", help="One-shot: print one JSON object."),
    bits: int | None = typer.Option(None, "--bits", help="Quantize to 4 or 8 bits."),
) -> None:
    """Chat with a model: a REPL in a terminal, one answer when PROMPT or stdin is given."""
    if bits is not None and bits not in (4, 8):
        raise _usage_exit("--bits must be 4 or 8")
    interactive = prompt is None and sys.stdin.isatty() and not as_json
    text = "" if interactive else _read_prompt(prompt)
    if not interactive and not text.strip():
        raise _usage_exit("empty prompt: give PROMPT or pipe text on stdin")

    from qwen3_chat.chat.session import ChatSession
    from qwen3_chat.hub.open import default_model_name, open_model

    loaded = open_model(model_name or default_model_name(), bits=bits)

    thinking = (loaded.capability != "never") if think is None else think
    if thinking and loaded.capability == "never":
        typer.echo(f"warning: {loaded.name} cannot think; answering directly", err=True)
        thinking = False
    session = ChatSession(
        loaded.model, loaded.tokenizer, system=system, thinking=thinking,
        budget=None if no_budget else (DEFAULT_BUDGET if budget is None else budget),
        max_tokens=max_tokens, capability=loaded.capability,
        sampling_overrides=_overrides(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                                      presence_penalty=presence_penalty, seed=seed),
        mode_sampling=loaded.mode_sampling,
        context_length=loaded.context_length,
    )  # fmt: skip
    if interactive:
        from qwen3_chat.cli.repl import Repl

        Repl(session, loaded, open_model=open_model, show_thinking=show_thinking).run()
        return
    one_shot(session, loaded, text, show_thinking=show_thinking, as_json=as_json)


def one_shot(session: Any, loaded: Any, text: str, *, show_thinking: bool,
             as_json: bool) -> None:
    """Answer one prompt: plain text (or one JSON object) on stdout, the rest on stderr."""
    from qwen3_chat.chat.session import soft_switch
    from qwen3_chat.cli.render import PlainTurn, stats_line

    mode = soft_switch(text)
    thinking = session.thinking if mode is None else mode
    n = len(session.render(thinking, [{"role": "user", "content": text}]))
    if n >= session.context_length:
        raise _usage_exit(f"the prompt is {n} tokens, longer than the model's context of "
                          f"{session.context_length}")
    turn = PlainTurn(show_thinking=show_thinking, echo_answer=not as_json)
    done = None
    for ev in session.send(text):
        result = turn.on_event(ev)
        if result is not None:
            done = (ev, result)
    if done is None:  # the engine always ends with Finished; guard against a silent stop
        raise Qwen3ChatError("generation ended without a result")
    ev, result = done
    stats = result.stats
    if as_json:
        out = {
            "answer": ev.answer,
            "reasoning": ev.reasoning,
            "model": loaded.name,
            "usage": {"prompt_tokens": stats.prompt_tokens,
                      "reasoning_tokens": stats.reasoning_tokens,
                      "answer_tokens": stats.answer_tokens},
            "timings": {"ttft_s": stats.ttft_s, "total_s": stats.total_s,
                        "prefill_tps": stats.prefill_tps, "decode_tps": stats.decode_tps},
            "finish_reason": stats.finish_reason,
            "budget_hit": stats.budget_hit,
        }  # fmt: skip
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    elif sys.stderr.isatty():
        typer.echo(stats_line(stats), err=True)


def main() -> None:
    """Entry point: also ends quietly when stdout is closed early (`| head -1`)."""
    try:
        app()
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
