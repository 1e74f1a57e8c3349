"""Tool calls in the answer text, and the streaming filter that holds them and stop strings.

Qwen3 writes `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`; Qwen3-Coder writes
`<tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n</function>\n</tool_call>`.
Only the answer is ever parsed: a call inside the reasoning is the model thinking aloud.
MLX-free.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|\Z)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (what OpenAI clients json.loads)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_dict(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:  # streamed deltas carry the call's position
            out["index"] = index
        return out


def _param_type(tools: Sequence[dict] | None, function: str, param: str) -> str | None:
    for tool in tools or ():
        fn = tool.get("function", tool)
        if fn.get("name") == function:
            props = (fn.get("parameters") or {}).get("properties") or {}
            kind = (props.get(param) or {}).get("type")
            return kind if isinstance(kind, str) else None
    return None


def _xml_call(body: str, tools: Sequence[dict] | None) -> ToolCall | None:
    """Qwen3-Coder's form; values are JSON unless the tool's schema says string."""
    m = _FUNCTION.search(body)
    if m is None:
        return None
    name, args = m.group(1).strip(), {}
    for p in _PARAMETER.finditer(m.group(2)):
        key = p.group(1).strip()
        raw = p.group(2).removeprefix("\n").removesuffix("\n")
        if _param_type(tools, name, key) == "string":
            args[key] = raw
            continue
        try:
            args[key] = json.loads(raw)
        except ValueError:
            args[key] = raw
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _json_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, tools: Sequence[dict] | None = None) -> tuple[str, list[ToolCall]]:
    """(content without the parsed calls, the calls); a block that does not parse stays text."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for m in _BLOCK.finditer(text):
        body = m.group(1).strip()
        call = _xml_call(body, tools) if body.startswith("<function=") else _json_call(body)
        if call is None:
            continue
        kept.append(text[last : m.start()])
        last = m.end()
        calls.append(call)
    kept.append(text[last:])
    return "".join(kept).strip() if calls else text, calls


def _held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could start one of `markers`."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


class AnswerFilter:
    """Streams answer text, holding back what may be a stop string or a tool call.

    Stop strings are cut with everything after them (OpenAI never returns them); from the
    first `<tool_call>` on, text is held and parsed into calls at the end.
    """

    def __init__(self, stops: Sequence[str], tools: Sequence[dict] | None):
        self.stops = list(stops)
        self.tools = list(tools) if tools else None
        self.markers = self.stops + ([TOOL_OPEN] if self.tools else [])
        self.pending = ""  # undecided tail
        self.tool_text = ""  # from the first <tool_call> on
        self.stopped = False  # a stop string was found: generation should end

    def _cut_stop(self, text: str, since: int) -> str:
        hits = [i for s in self.stops if (i := text.find(s, max(0, since - len(s) + 1))) >= 0]
        if hits:
            self.stopped = True
            return text[: min(hits)]
        return text

    def feed(self, text: str) -> str:
        """Add answer text; returns what is safe to send now."""
        if self.stopped:
            return ""
        if self.tool_text:
            start = len(self.tool_text)
            self.tool_text = self._cut_stop(self.tool_text + text, start)
            return ""
        start = len(self.pending)
        buf = self._cut_stop(self.pending + text, start)
        if self.tools and (i := buf.find(TOOL_OPEN)) >= 0:
            self.pending, self.tool_text = "", buf[i:]
            return buf[:i]
        keep = 0 if self.stopped else _held_suffix(buf, self.markers)
        self.pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The held text, and the tool calls parsed from it."""
        tail, self.pending = self.pending, ""
        if not self.tool_text:
            return tail, []
        content, calls = parse_tool_calls(self.tool_text, self.tools)
        return tail + content, calls
