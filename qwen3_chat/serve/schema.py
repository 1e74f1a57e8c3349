"""The OpenAI chat-completions wire format: request validation and response shapes (no MLX).

Every bad request becomes an `ApiError` with the HTTP status and OpenAI's error body, so the
routes never let a KeyError or TypeError reach the client as a 500 or a traceback.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwen3_chat.engine.defaults import SEED_MAX

# reasoning_effort → thinking budget (reasoning tokens). "medium" is the server's default
# budget (the REPL's, 4096 unless `--budget` says otherwise); "none" turns thinking off.
EFFORT_BUDGETS: dict[str, int | None] = {"none": 0, "low": 1024, "high": 16384}
EFFORT_LEVELS = ("none", "minimal", "low", "medium", "high")  # "minimal" (OpenAI's) = "low"
MAX_STOP = 16
ROLES = ("system", "developer", "user", "assistant", "tool")
# Template variables a client must not override: they are ours to set.
RESERVED_TEMPLATE_KEYS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
SAMPLING_FIELDS = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float,
    "presence_penalty": float, "repetition_penalty": float, "seed": int,
}  # fmt: skip
_UNSET = object()


class ApiError(Exception):
    """An error response: HTTP status plus OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    """A validated request; None means "not given": the server's defaults apply."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    enable_thinking: bool | None = None
    # An explicit budget (None = unbounded) when `budget_given`, else the server's default.
    thinking_budget: int | None = None
    budget_given: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: Mapping, name: str, kind: type) -> Any:
    v = body.get(name)
    if v is None:
        return None
    if kind is int and not _is_int(v):
        raise bad(f"'{name}' must be an integer", name)
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))
                          or not math.isfinite(v)):  # json.loads accepts NaN and Infinity
        raise bad(f"'{name}' must be a finite number", name)
    return kind(v)


def _text_content(content: Any, where: str) -> str | None:
    """OpenAI content: a string, null, or a list of {"type": "text"} parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise bad(f"{where}: only text content parts are supported", "messages")
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}: a text part needs a string 'text'", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where}: 'content' must be a string or a list of text parts", "messages")


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Assistant tool calls as the template expects them: arguments as a dict when JSON."""
    if not isinstance(calls, list):
        raise bad(f"{where}: 'tool_calls' must be a list", "messages")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise bad(f"{where}: each tool call needs function.name", "messages")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                parsed = json.loads(args) if args.strip() else {}
            except ValueError:
                parsed = None
            args = parsed if isinstance(parsed, dict) else args
        elif not isinstance(args, Mapping):
            raise bad(f"{where}: function.arguments must be a JSON string or object", "messages")
        out.append({"type": "function", "id": call.get("id"),
                    "function": {"name": fn["name"], "arguments": args}})  # fmt: skip
    return out


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise bad("'messages' must be a list", "messages")
    if not raw:
        raise bad("'messages' must not be empty", "messages")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise bad(f"{where} must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}: 'role' must be one of {', '.join(ROLES)}", "messages")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _text_content(m.get("content"), where)}  # fmt: skip
        if role == "assistant":
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise bad(f"{where}: 'reasoning_content' must be a string", "messages")
                msg["reasoning_content"] = reasoning
            if m.get("tool_calls"):
                msg["tool_calls"] = _tool_calls(m["tool_calls"], where)
        elif msg["content"] is None:
            raise bad(f"{where}: a {role} message needs 'content'", "messages")
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        messages.append(msg)
    if all(m["role"] == "system" for m in messages):
        raise bad("'messages' needs at least one user message", "messages")
    return messages


def _parse_tools(body: Mapping) -> list[dict[str, Any]] | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or choice == "none":
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, Mapping) and t.get("type", "function") == "function"
        and isinstance(t.get("function"), Mapping) and isinstance(t["function"].get("name"), str)
        for t in tools
    ):  # fmt: skip
        raise bad("'tools' must be a list of {type: function, function: {name, ...}}", "tools")
    if isinstance(choice, Mapping):  # a named function: offer only that one
        name = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise bad(f"tool_choice names an unknown function {name!r}", "tool_choice")
    elif choice not in (None, "auto", "required"):
        raise bad("'tool_choice' must be none, auto, required or a function", "tool_choice")
    return [dict(t) for t in tools] or None


def _parse_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' may hold at most {MAX_STOP} strings", "stop")
    return stops


def _parse_thinking(body: Mapping, req: ChatRequest) -> None:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        clash = RESERVED_TEMPLATE_KEYS & set(kwargs)
        if clash:
            raise bad(f"chat_template_kwargs may not set {sorted(clash)}", "chat_template_kwargs")
        kwargs = dict(kwargs)
        thinking = kwargs.pop("enable_thinking", None)
        if thinking is not None and not isinstance(thinking, bool):
            raise bad("'enable_thinking' must be true or false", "chat_template_kwargs")
        req.enable_thinking, req.template_kwargs = thinking, kwargs
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in EFFORT_LEVELS:
            raise bad(f"'reasoning_effort' must be one of {', '.join(EFFORT_LEVELS)}",
                      "reasoning_effort")  # fmt: skip
        if effort == "none" and req.enable_thinking is None:
            req.enable_thinking = False
        elif effort != "medium":
            req.thinking_budget = EFFORT_BUDGETS["low" if effort == "minimal" else effort]
            req.budget_given = True
    if "thinking_budget" in body:  # the extension field wins over reasoning_effort
        budget = body["thinking_budget"]
        if budget is not None and (not _is_int(budget) or budget < 0):
            raise bad("'thinking_budget' must be a non-negative integer or null",
                      "thinking_budget")  # fmt: skip
        req.thinking_budget, req.budget_given = budget, True


def parse_request(body: Any) -> ChatRequest:
    """Validate a /v1/chat/completions body; raises ApiError(400) naming the bad field."""
    if not isinstance(body, Mapping):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a non-empty string", "model")
    req = ChatRequest(model=model, messages=parse_messages(body.get("messages")))
    for name in ("stream", "logprobs"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise bad(f"'{name}' must be true or false", name)
    req.stream = bool(body.get("stream"))
    if body.get("logprobs"):
        raise bad("logprobs are not supported", "logprobs")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, Mapping):
            raise bad("'stream_options' must be an object", "stream_options")
        req.include_usage = bool(options.get("include_usage"))
    n = _number(body, "n", int)
    if n is not None and n != 1:
        raise bad("only n = 1 is supported", "n")
    for name in ("max_completion_tokens", "max_tokens"):
        value = _number(body, name, int)
        if value is not None:
            if value < 1:
                raise bad(f"'{name}' must be at least 1", name)
            req.max_tokens = value
            break
    for name, kind in SAMPLING_FIELDS.items():
        value = _number(body, name, kind)
        if value is not None:
            req.sampling[name] = value
    if not 0 <= req.sampling.get("seed", 0) <= SEED_MAX:
        raise bad(f"'seed' must be in 0..{SEED_MAX}", "seed")
    req.stop = _parse_stop(body.get("stop"))
    req.tools = _parse_tools(body)
    _parse_thinking(body, req)
    return req


# -- responses ------------------------------------------------------------------------------
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, cached: int, reasoning: int, answer: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": reasoning + answer,
        "total_tokens": prompt + reasoning + answer,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def reasoning_fields(text: str) -> dict[str, str]:
    """Reasoning under both names clients look for (OpenAI-compatible servers differ)."""
    return {"reasoning_content": text, "reasoning": text} if text else {}


def completion(cid: str, model: str, message: dict, finish: str, use: dict) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": use,
    }  # fmt: skip


def chunk(cid: str, model: str, delta: dict, finish: str | None = None,
          use: dict | None = None) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }  # fmt: skip
    if use is not None:  # the usage chunk of stream_options.include_usage has no choices
        out["choices"], out["usage"] = [], use
    return out
