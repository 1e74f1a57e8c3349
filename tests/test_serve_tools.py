"""Tool-call parsing, the streaming answer filter, request validation and the prompt-cache LRU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen3_chat.serve.schema import EFFORT_BUDGETS, ApiError, parse_request
from qwen3_chat.serve.tools import AnswerFilter, parse_tool_calls

WEATHER = [{"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"}}},
}}]  # fmt: skip


def test_qwen3_json_form():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2


def test_qwen3_coder_xml_form_uses_the_schema_types():
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n<parameter=zip>\n10001\n</parameter>\n"
            "</function>\n</tool_call>")
    content, calls = parse_tool_calls(text, WEATHER)
    assert content == ""
    assert calls[0].name == "get_weather"
    # "zip" is a string in the schema: it stays "10001", not the number 10001.
    assert json.loads(calls[0].arguments) == {"city": "New York", "days": 3, "zip": "10001"}


def test_a_block_that_does_not_parse_stays_text():
    text = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(text) == (text, [])
    assert parse_tool_calls("no calls here") == ("no calls here", [])


def _run(chunks: list[str], stops: list[str], tools=None) -> tuple[str, str, list, bool]:
    f = AnswerFilter(stops, tools)
    sent = "".join(f.feed(c) for c in chunks)
    tail, calls = f.finish()
    return sent, tail, calls, f.stopped


def test_stop_strings_split_across_chunks_are_never_sent():
    sent, tail, _, stopped = _run(["The answer", " is 4", "2.\nEN", "D more"], ["\nEND"])
    assert (sent + tail, stopped) == ("The answer is 42.", True)
    assert "\n" not in sent + tail
    # A partial match is held, and released as soon as it cannot be the stop.
    f = AnswerFilter(["\nEND"], None)
    assert [f.feed("a\nE"), f.feed("N"), f.feed("x")] == ["a", "", "\nENx"]
    assert f.finish() == ("", []) and not f.stopped


def test_tool_calls_are_held_and_parsed_while_the_text_before_streams():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    chunks = ["Checking", " now. <tool", "_call>"] + [call[len("<tool_call>"):]]
    sent, tail, calls, _ = _run(chunks, [], WEATHER)
    assert sent == "Checking now. "
    assert tail == "" and [c.name for c in calls] == ["get_weather"]
    # Without tools, the same text is plain content.
    sent, tail, calls, _ = _run(chunks, [], None)
    assert sent + tail == "Checking now. " + call and calls == []


def _body(**extra):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize("extra, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"model": 7}, "model"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"seed": -1}, "seed"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"thinking_budget": -5}, "thinking_budget"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"tools": [{"type": "function"}]}, "tools"),
])  # fmt: skip
def test_bad_fields_are_named_in_a_400(extra, param):
    with pytest.raises(ApiError) as e:
        parse_request(_body(**extra))
    assert e.value.status == 400 and e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_thinking_controls_resolve_in_order():
    r = parse_request(_body(reasoning_effort="none"))
    assert r.enable_thinking is False
    r = parse_request(_body(reasoning_effort="low"))
    assert (r.thinking_budget, r.budget_given) == (EFFORT_BUDGETS["low"], True)
    r = parse_request(_body(reasoning_effort="medium"))
    assert r.budget_given is False  # medium is the server's default budget
    r = parse_request(_body(reasoning_effort="high", thinking_budget=7))
    assert r.thinking_budget == 7  # the explicit extension field wins
    r = parse_request(_body(chat_template_kwargs={"enable_thinking": True, "x": 1},
                            reasoning_effort="none"))  # fmt: skip
    assert r.enable_thinking is True and r.template_kwargs == {"x": 1}
    r = parse_request(_body(max_completion_tokens=5, max_tokens=9, stop="END"))
    assert (r.max_tokens, r.stop) == (5, ["END"])


def _filled_cache(n: int):
    """A one-layer real KVCache holding n tokens."""
    import mlx.core as mx

    from qwen3_chat.models.cache import KVCache

    c = KVCache()
    c.update_and_fetch(mx.zeros((1, 1, n, 4)), mx.zeros((1, 1, n, 4)))
    return [c]


def test_prompt_cache_reuses_the_longest_prefix_and_stays_bounded():
    from qwen3_chat.serve.prompt_cache import PromptCache, cache_bytes

    pc = PromptCache(lambda: _filled_cache(0), max_entries=2, max_bytes=1 << 30)
    a, b = list(range(10)), [1, 2, 3, 4, 5, 6]
    pc.put(a, _filled_cache(10))
    pc.put(b, _filled_cache(6))
    cache, reused = pc.take([0, 1, 2, 3, 4, 5, 99, 100])  # shares 6 tokens with `a`
    assert reused == 6 and cache[0].offset == 6  # trimmed to where they diverge
    cache, reused = pc.take(list(range(10)))  # `a` was taken out: `b` shares nothing
    assert reused == 0 and cache[0].offset == 0
    cache, reused = pc.take([1, 2, 3, 4, 5, 6])  # the whole prompt is cached: keep one to feed
    assert reused == 5
    for i in range(3):  # at most two entries: the oldest go first
        pc.put([50 + i] * 4, _filled_cache(4))
    assert pc.stats()["entries"] == 2
    assert pc.take([50, 50, 50, 1])[1] == 0 and pc.take([52, 52, 52, 1])[1] == 3
    # The byte cap evicts too, and a cache alone bigger than the cap is not kept.
    one = cache_bytes(_filled_cache(4))
    small = PromptCache(lambda: _filled_cache(0), max_entries=8, max_bytes=one)
    small.put([1] * 4, _filled_cache(4))
    small.put([2] * 4, _filled_cache(4))
    assert small.stats()["entries"] == 1 and small.stats()["bytes"] <= one
    small.put([3] * 600, _filled_cache(600))
    assert small.stats()["entries"] == 1 and small.take([3] * 600)[1] == 0


def test_the_wire_format_and_parsers_import_without_mlx():
    code = ("import sys, qwen3_chat.serve.schema, qwen3_chat.serve.tools, qwen3_chat.cli.serve; "
            "sys.exit('mlx' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
