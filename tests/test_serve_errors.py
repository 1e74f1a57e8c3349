"""Bad requests get the right status and an OpenAI-shaped error, and the server keeps serving.

One real server (scripted model, subprocess) with an API key, a queue of one, a small
body limit and a small context, so every limit is reachable with a small request.
"""

from __future__ import annotations

import http.client
import json

import pytest
from test_serve_support import Rule, request, scripted_cmd, start

openai = pytest.importorskip("openai")

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 16384
CONTEXT = 1024
DEFAULT_BUDGET = 40  # this server's --budget: requests that say nothing get it
RULES = [Rule("", "Fine."), Rule("LONGANSWER", "word " * 900),
         Rule("THINKLONG", "Done.", "step " * 300)]


@pytest.fixture(scope="module")
def server(qwen3_tokenizer_dir):
    srv = start(scripted_cmd(qwen3_tokenizer_dir, RULES, api_key=KEY, max_queue=1,
                             max_body=MAX_BODY, context=CONTEXT, budget=DEFAULT_BUDGET))
    yield srv
    srv.stop()


def body(**extra):
    return {"model": "scripted", "messages": [{"role": "user", "content": "hi /no_think"}],
            **extra}  # fmt: skip


def still_serving(server) -> None:
    status, data = request(server, "POST", "/v1/chat/completions", body(), AUTH)
    assert status == 200, data
    assert data["choices"][0]["message"]["content"] == "Fine."


def assert_error(status: int, data, expected: int, param: str | None = None) -> dict:
    assert status == expected, data
    assert isinstance(data, dict) and set(data) == {"error"}, data
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize("payload, status, param", [
    (b'{"model": "scripted", "messages": [', 400, None),  # malformed JSON
    (b"\xff\xfe not utf-8", 400, None),
    (b"[" * 5000 + b"]" * 5000, 400, None),  # nesting too deep for the parser
    (b'["a list"]', 400, None),
    (body(messages="hi"), 400, "messages"),  # wrong types
    (body(temperature="warm"), 400, "temperature"),
    (body(max_tokens="10"), 400, "max_tokens"),
    (body(top_k=1.5), 400, "top_k"),
    (body(top_p=0), 400, "top_p"),  # a valid number, refused by the sampler's own rule
    (body(presence_penalty=2.5), 400, "presence_penalty"),  # OpenAI's range is -2..2
    (body(messages=[]), 400, "messages"),  # empty messages
    (body(messages=[{"role": "system", "content": "only a system prompt"}]), 400, "messages"),
    (body(model="no-such-model"), 404, "model"),  # unknown model
])  # fmt: skip
def test_bad_requests_get_openai_errors(server, payload, status, param):
    code, data = request(server, "POST", "/v1/chat/completions", payload, AUTH)
    assert_error(code, data, status, param)
    still_serving(server)


def test_a_negative_presence_penalty_is_accepted_and_the_range_is_said(server):
    status, data = request(server, "POST", "/v1/chat/completions",
                           body(presence_penalty=-1.5), AUTH)  # fmt: skip
    assert status == 200, data  # before: 400, the library allowed only 0..2
    code, data = request(server, "POST", "/v1/chat/completions", body(presence_penalty=-3), AUTH)
    err = assert_error(code, data, 400, "presence_penalty")
    assert "[-2, 2]" in err["message"], err


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          None])  # fmt: skip
def test_only_json_bodies_are_read(server, content_type):
    """What a web page may POST to 127.0.0.1 without a CORS preflight is refused."""
    headers = {**AUTH, "Content-Type": content_type} if content_type else dict(AUTH)
    conn = http.client.HTTPConnection(*server.host_port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    for k, v in headers.items():
        conn.putheader(k, v)
    data = json.dumps(body()).encode()
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    resp = conn.getresponse()
    err = assert_error(resp.status, json.loads(resp.read()), 400)
    assert "application/json" in err["message"]
    conn.close()
    still_serving(server)


def test_a_prompt_longer_than_the_context(server):
    code, data = request(server, "POST", "/v1/chat/completions",
                         body(messages=[{"role": "user", "content": "hello " * 1500}]), AUTH)
    err = assert_error(code, data, 400, "messages")
    assert err["code"] == "context_length_exceeded" and str(CONTEXT) in err["message"]
    still_serving(server)


def test_a_body_over_the_limit(server):
    big = body(messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}])
    code, data = request(server, "POST", "/v1/chat/completions", big, AUTH)
    assert_error(code, data, 413)
    # Chunked uploads (no Content-Length) are cut off at the limit too.
    conn = http.client.HTTPConnection(*server.host_port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=iter([json.dumps(big).encode()]),
                 headers={**AUTH, "Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    assert_error(resp.status, json.loads(resp.read()), 413)
    conn.close()
    still_serving(server)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": KEY}])  # fmt: skip
def test_a_missing_or_wrong_key_is_refused(server, headers):
    code, data = request(server, "POST", "/v1/chat/completions", body(), headers)
    assert_error(code, data, 401)
    for path in ("/v1/models", "/health"):
        code, data = request(server, "GET", path, None, headers)
        assert_error(code, data, 401)
    still_serving(server)


def test_the_official_client_sees_the_same_errors(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x"}])
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert good.models.list().data[0].id == "scripted"


def test_unknown_routes_and_methods(server):
    assert_error(*request(server, "GET", "/v2/everything", None, AUTH), 404)
    assert_error(*request(server, "GET", "/v1/chat/completions", None, AUTH), 405)
    still_serving(server)


def test_a_full_queue_answers_429_and_frees_up(server):
    conn = http.client.HTTPConnection(*server.host_port, timeout=60)
    long = body(messages=[{"role": "user", "content": "LONGANSWER /no_think"}], stream=True)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(long),
                 headers={**AUTH, "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    while b'"content": "word' not in resp.readline():  # the long answer is being generated
        pass
    code, data = request(server, "POST", "/v1/chat/completions", body(), AUTH)
    err = assert_error(code, data, 429)
    assert err["type"] == "rate_limit_error"
    conn.close()  # the client leaves: its generation is cancelled, the queue frees up
    for _ in range(1000):  # until the server has seen the disconnect (no fixed sleep)
        _, health = request(server, "GET", "/health", None, AUTH)
        if health["queue"]["running"] + health["queue"]["waiting"] == 0:
            break
    assert health["requests"]["rejected"] >= 1 and health["requests"]["cancelled"] >= 1
    (dropped,) = [r for r in health["recent"] if r["finish_reason"] == "cancelled"]
    assert dropped["completion_tokens"] < 900  # cut short, not run to the end
    still_serving(server)


def test_requests_addressed_to_another_host_name_are_refused(server):
    """DNS rebinding: a page whose name now points at 127.0.0.1 sends its own Host."""
    code, data = request(server, "POST", "/v1/chat/completions", body(),
                         {**AUTH, "Host": "evil.example:8000"})  # fmt: skip
    assert assert_error(code, data, 400)["code"] == "bad_host"
    port = server.host_port[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        code, data = request(server, "GET", "/v1/models", None, {**AUTH, "Host": host})
        assert code == 200, (host, data)
    still_serving(server)


def test_the_servers_default_budget_applies_unless_the_request_says_otherwise(server):
    def reasoning_tokens(**extra) -> int:
        code, data = request(server, "POST", "/v1/chat/completions",
                             body(messages=[{"role": "user", "content": "THINKLONG"}], **extra),
                             AUTH)  # fmt: skip
        assert code == 200, data
        assert data["choices"][0]["message"]["content"] == "Done."
        return data["usage"]["completion_tokens_details"]["reasoning_tokens"]

    default = reasoning_tokens()
    assert DEFAULT_BUDGET <= default <= DEFAULT_BUDGET + 32 + 40  # budget + grace + closing
    assert reasoning_tokens(reasoning_effort="medium") == default  # medium = the default
    assert reasoning_tokens(thinking_budget=None) >= 300  # null: unbounded
