"""`qwen3 serve` through the official `openai` client: thinking, budget, tools, stop, usage.

The server is real (subprocess, uvicorn, our engine and the real Qwen3 tokenizer and
template); its model is `ScriptedModel`, whose logits spell a chosen reply, because a
random model never thinks or calls tools.
"""

from __future__ import annotations

import json

import pytest
from test_serve_support import Rule, request, scripted_cmd, start

openai = pytest.importorskip("openai")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}}]  # fmt: skip
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
XML_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nLyon\n</parameter>\n"
            "</function>\n</tool_call>")  # fmt: skip
LONG_REASONING = "step " * 1100
RULES = [
    Rule("", "Hello there.", "I should greet them."),
    Rule("LONGTHINK", "Done thinking.", LONG_REASONING.strip()),
    Rule("<tools>", CALL, "The user wants the weather."),  # only when tools were rendered
    Rule("<tool_response>", "It is sunny in Paris.", "The tool answered."),
    Rule("THINKCALL", "No call needed.", f"Maybe {CALL} but no."),
    Rule("CODERCALL", XML_CALL),
    Rule("STOPME", "alpha beta END gamma delta"),
    Rule("SWITCHED-ON", "The template saw the switch."),
]
SWITCH = "{%- if my_switch is defined and my_switch %}SWITCHED-ON{%- endif %}"


@pytest.fixture(scope="module")
def server(qwen3_tokenizer_dir):
    srv = start(scripted_cmd(qwen3_tokenizer_dir, RULES, template_prefix=SWITCH))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir):
    from qwen3_chat.chat.tokenizer import Tokenizer

    return Tokenizer.from_dir(qwen3_tokenizer_dir)


def ask(client, text: str, **kw):
    return client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": text}], **kw)


def extra(obj, name: str):
    """A field OpenAI's types do not declare (reasoning_content), as the client exposes it."""
    return (obj.model_extra or {}).get(name)


def scripted_counts(tok, reasoning: str | None, answer: str) -> tuple[int, int]:
    """(reasoning, answer) tokens of the scripted reply, counted as the engine counts them."""
    if reasoning is None:
        return 0, len(tok.encode(answer))
    ids = tok.encode(f"<think>\n{reasoning}\n</think>\n\n{answer}")
    end = ids.index(tok.think_end_id)
    return end - 1, len(ids) - end - 1


def test_reasoning_is_split_from_the_answer_with_exact_usage(client, tok):
    r = ask(client, "Hi!")
    msg = r.choices[0].message
    assert msg.content == "Hello there."
    assert extra(msg, "reasoning_content") == "I should greet them."
    assert extra(msg, "reasoning") == "I should greet them."
    assert r.choices[0].finish_reason == "stop" and r.model == "scripted"
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi!"}]))
    n_reasoning, n_answer = scripted_counts(tok, "I should greet them.", "Hello there.")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == n_reasoning + n_answer
    assert r.usage.completion_tokens_details.reasoning_tokens == n_reasoning
    assert r.usage.total_tokens == len(prompt) + n_reasoning + n_answer


def test_streamed_deltas_keep_reasoning_out_of_content(client):
    stream = ask(client, "Hi there", stream=True, stream_options={"include_usage": True})
    reasoning, content, finishes, usage = [], [], [], None
    for c in stream:
        if c.usage is not None:
            usage = c.usage
        for choice in c.choices:
            reasoning.append(extra(choice.delta, "reasoning_content") or "")
            content.append(choice.delta.content or "")
            finishes.append(choice.finish_reason)
    assert "".join(reasoning) == "I should greet them."
    assert "".join(content) == "Hello there."
    assert not any("greet" in c or "think>" in c for c in content)
    assert [f for f in finishes if f] == ["stop"]
    assert usage is not None and usage.completion_tokens_details.reasoning_tokens > 0


@pytest.mark.parametrize("how", [
    {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
    {"reasoning_effort": "none"},
    {"extra_body": {"thinking_budget": 0}},
    {"soft_switch": " /no_think"},
])  # fmt: skip
def test_thinking_can_be_switched_off_per_request(client, how):
    how = dict(how)
    r = ask(client, "Hi!" + how.pop("soft_switch", ""), **how)
    msg = r.choices[0].message
    assert msg.content == "Hello there."
    assert extra(msg, "reasoning_content") is None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_explicit_enable_thinking_beats_the_soft_switch(client):
    r = ask(client, "Hi! /no_think", extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert extra(r.choices[0].message, "reasoning_content") == "I should greet them."


def test_chat_template_kwargs_reach_the_template(client):
    on = ask(client, "Hi /no_think", extra_body={"chat_template_kwargs": {"my_switch": True}})
    assert on.choices[0].message.content == "The template saw the switch."
    off = ask(client, "Hi /no_think", extra_body={"chat_template_kwargs": {"my_switch": False}})
    assert off.choices[0].message.content == "Hello there."


def test_thinking_budget_and_reasoning_effort_cap_the_reasoning(client):
    cut = ask(client, "LONGTHINK", extra_body={"thinking_budget": 20})
    reasoning = extra(cut.choices[0].message, "reasoning_content")
    assert "Considering the limited time" in reasoning  # Qwen's closing was fed
    assert cut.choices[0].message.content == "Done thinking."
    spent = cut.usage.completion_tokens_details.reasoning_tokens
    assert 20 <= spent <= 20 + 32 + 40  # budget + grace + the closing sentence
    low = ask(client, "LONGTHINK", reasoning_effort="low")  # 1024 tokens
    assert "Considering the limited time" in extra(low.choices[0].message, "reasoning_content")
    assert 1024 <= low.usage.completion_tokens_details.reasoning_tokens <= 1024 + 72
    high = ask(client, "LONGTHINK", reasoning_effort="high")
    assert extra(high.choices[0].message, "reasoning_content") == LONG_REASONING.strip()
    assert high.choices[0].message.content == "Done thinking."


def test_tools_round_trip(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    assert extra(choice.message, "reasoning_content") == "The user wants the weather."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The result goes back as a tool message; the template wraps it in <tool_response>.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    r2 = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
    assert r2.choices[0].message.content == "It is sunny in Paris."
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls


def test_streamed_tool_calls_never_leak_as_content(client):
    stream = client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
        stream=True)  # fmt: skip
    calls, content, finish = [], "", None
    for c in stream:
        d = c.choices[0].delta
        content += d.content or ""
        calls += d.tool_calls or []
        finish = c.choices[0].finish_reason or finish
    assert content == "" and finish == "tool_calls"
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        (0, "get_weather", {"city": "Paris"})]


def test_a_tool_call_inside_reasoning_is_not_a_call(client):
    r = ask(client, "THINKCALL", tools=TOOLS)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    assert "<tool_call>" in extra(r.choices[0].message, "reasoning_content")
    assert r.choices[0].message.content == "No call needed."


def test_qwen3_coder_xml_calls_are_parsed(client):
    r = ask(client, "CODERCALL", tools=TOOLS)
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather",
                                                                         {"city": "Lyon"})


def test_stop_strings_end_the_answer_and_are_never_sent(client):
    r = ask(client, "STOPME /no_think", stop=["END", "zzz"])
    assert r.choices[0].message.content == "alpha beta"
    assert r.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in ask(
        client, "STOPME /no_think", stop="END", stream=True) if c.choices)  # fmt: skip
    assert text.strip() == "alpha beta"


def test_max_tokens_bounds_the_answer(client):
    r = ask(client, "STOPME /no_think", max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 2


def test_a_conversation_prefills_only_what_is_new(client, tok):
    first = [{"role": "user", "content": "CACHE check, hello"}]
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    r1 = client.chat.completions.create(model="scripted", messages=first, extra_body=off)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And again?"}]  # fmt: skip
    r2 = client.chat.completions.create(model="scripted", messages=second, extra_body=off)
    # The cache holds the first prompt and the reply as generated; the second prompt
    # shares all of it up to where the template renders the old turn differently.
    p1 = tok.encode(tok.apply_chat_template(first, enable_thinking=False))
    held = p1 + tok.encode("Hello there.") + [tok.token_to_id("<|im_end|>")]
    p2 = tok.encode(tok.apply_chat_template(second, enable_thinking=False))
    shared = next(i for i, (a, b) in enumerate(zip(held, p2, strict=False)) if a != b)
    assert r2.usage.prompt_tokens == len(p2)
    assert r2.usage.prompt_tokens_details.cached_tokens == shared
    assert shared >= len(p1) - 4  # all of the first prompt but its empty think block
    assert r1.usage.prompt_tokens_details.cached_tokens < len(p1) - 4


def test_n_above_one_and_unknown_models_are_refused(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Hi", n=2)
    assert e.value.status_code == 400 and "n = 1" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert [m.id for m in client.models.list().data] == ["scripted"]
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["prompt_cache"]["entries"] >= 1
