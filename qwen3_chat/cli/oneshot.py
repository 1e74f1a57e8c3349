"""One prompt, one answer: plain text, one JSON object (--json) or JSON Lines events (--jsonl).

stdout carries only the answer (or the JSON); reasoning with --show-thinking and the stats
line go to stderr.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, TextIO

import typer

from qwen3_chat.cli.usage import usage_exit
from qwen3_chat.engine.events import (
    AnswerText,
    ContextTrimmed,
    Finished,
    ReasoningText,
    ThinkingDone,
)
from qwen3_chat.errors import Qwen3ChatError


def result_object(ev: Finished, model: str) -> dict[str, Any]:
    """The summary of a finished answer: --json prints it, --jsonl's last event carries it."""
    stats = ev.stats
    extra = {} if stats.speculation is None else {"speculation": stats.speculation}
    return {
        "answer": ev.answer,
        "reasoning": ev.reasoning,
        "model": model,
        "usage": {"prompt_tokens": stats.prompt_tokens,
                  "reasoning_tokens": stats.reasoning_tokens,
                  "answer_tokens": stats.answer_tokens},
        "timings": {"ttft_s": stats.ttft_s, "total_s": stats.total_s,
                    "prefill_tps": stats.prefill_tps, "decode_tps": stats.decode_tps},
        "finish_reason": stats.finish_reason,
        "budget_hit": stats.budget_hit,
        **extra,
    }  # fmt: skip


def event_object(ev: Any, model: str) -> dict[str, Any] | None:
    """One JSON Lines record per engine event (None for events tools need not see)."""
    if isinstance(ev, ReasoningText):
        return {"type": "reasoning", "text": ev.text}
    if isinstance(ev, AnswerText):
        return {"type": "answer", "text": ev.text}
    if isinstance(ev, ThinkingDone):
        return {"type": "thinking_done", "tokens": ev.tokens, "seconds": ev.seconds,
                "budget_hit": ev.budget_hit}  # fmt: skip
    if isinstance(ev, ContextTrimmed):
        return {"type": "context_trimmed", "dropped_turns": ev.dropped_turns,
                "context_used": ev.context_used, "context_length": ev.context_length}  # fmt: skip
    if isinstance(ev, Finished):
        return {"type": "finished", **result_object(ev, model)}
    return None


# json escapes only U+0000-U+001F; DEL and the C1 range (e.g. U+009B, a one-character CSI)
# would still reach a terminal raw, so they are written as \u escapes too (same JSON value).
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f]")


def json_line(obj: dict[str, Any]) -> str:
    """One JSON object, readable (non-ASCII kept) yet free of any terminal control character."""
    text = json.dumps(obj, ensure_ascii=False)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _write_line(out: TextIO, obj: dict[str, Any]) -> None:
    out.write(json_line(obj) + "\n")
    out.flush()  # a tool reading the pipe sees each event as it happens


def check_fits(session: Any, text: str) -> None:
    """Refuse, before generating, a prompt that cannot fit the context at all."""
    from qwen3_chat.chat.session import soft_switch

    mode = soft_switch(text)
    thinking = session.thinking if mode is None else mode
    n = len(session.render(thinking, [{"role": "user", "content": text}]))
    if n >= session.context_length:
        raise usage_exit(f"the prompt is {n} tokens, longer than the model's context of "
                         f"{session.context_length}")  # fmt: skip


def one_shot(session: Any, model: str, text: str, *, show_thinking: bool, output: str) -> None:
    """Answer one prompt. `output` is "text", "json" or "jsonl"."""
    from qwen3_chat.cli.render import PlainTurn, stats_line

    check_fits(session, text)
    out = sys.stdout
    turn = PlainTurn(show_thinking=show_thinking, echo_answer=output == "text")
    done: Finished | None = None
    for ev in session.send(text):
        if output == "jsonl":
            record = event_object(ev, model)
            if record is not None:
                _write_line(out, record)
        else:
            turn.on_event(ev)
        if isinstance(ev, Finished):
            done = ev
    if done is None:  # the engine always ends with Finished; guard against a silent stop
        raise Qwen3ChatError("generation ended without a result")
    if output == "json":
        _write_line(out, result_object(done, model))
    elif output == "text" and sys.stderr.isatty():
        typer.echo(stats_line(done.stats), err=True)
