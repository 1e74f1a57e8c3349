"""`qwen3 serve` as a user runs it, on a tiny random checkpoint with the real tokenizer:
seeds, concurrent clients, a client that drops mid-stream, safety flags, clean shutdown."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading

import pytest
from test_serve_support import request, start

openai = pytest.importorskip("openai")

SERVE = [sys.executable, "-m", "qwen3_chat", "serve"]


@pytest.fixture(scope="module")
def checkpoint(qwen3_tokenizer_dir, tmp_path_factory):
    from checkpoints import make_checkpoint, tiny_config

    # Untied: with tied embeddings a random model mostly repeats its last input token.
    cfg = tiny_config(vocab_size=151936, tie_word_embeddings=False)
    return make_checkpoint(tmp_path_factory.mktemp("serve"), cfg, tokenizer_dir=qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = start([*SERVE, "-m", str(checkpoint), "--port", "0", "--max-queue", "8"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def model_id(checkpoint) -> str:
    return checkpoint.name


def ask(client, checkpoint, text: str, **kw):
    kw.setdefault("extra_body", {"chat_template_kwargs": {"enable_thinking": False}})
    return client.chat.completions.create(
        model=model_id(checkpoint), messages=[{"role": "user", "content": text}], **kw)


def test_seeds_reproduce_and_differ(client, checkpoint):
    runs = [ask(client, checkpoint, "Tell me a story", seed=s, temperature=1.0, max_tokens=12)
            for s in (7, 7, 8)]  # fmt: skip
    texts = [r.choices[0].message.content for r in runs]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    assert [r.usage.completion_tokens for r in runs] == [12, 12, 12]
    assert all(r.choices[0].finish_reason == "length" for r in runs)


def test_eight_concurrent_clients_all_complete(client, checkpoint, server):
    results: dict[int, tuple] = {}

    def one(i: int) -> None:
        text, finish = "", None
        for c in ask(client, checkpoint, f"Client {i} says hi", max_tokens=6, seed=i,
                     stream=True, stream_options={"include_usage": True}):  # fmt: skip
            for choice in c.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            usage = c.usage or None
        results[i] = (text, finish, usage)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(8))
    for i, (text, finish, usage) in results.items():
        assert finish == "length" and usage.completion_tokens == 6, (i, text)
        # Each stream got its own answer: the same request alone gives the same text.
        alone = ask(client, checkpoint, f"Client {i} says hi", max_tokens=6, seed=i)
        assert alone.choices[0].message.content == text.strip()


def test_a_dropped_client_frees_the_model(server, checkpoint):
    conn = http.client.HTTPConnection(*server.host_port, timeout=60)
    payload = {"model": model_id(checkpoint), "stream": True, "max_tokens": 100000,
               "messages": [{"role": "user", "content": "Go on forever /no_think"}]}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(payload),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    seen = 0
    while seen < 3:  # a few answer tokens: it is generating
        seen += b'"content"' in resp.readline()
    conn.sock.shutdown(2)
    conn.close()
    # The next request is served: FIFO, so the dropped one has ended by then.
    code, data = request(server, "POST", "/v1/chat/completions", {
        "model": model_id(checkpoint), "max_tokens": 3,
        "messages": [{"role": "user", "content": "Next /no_think"}]})  # fmt: skip
    assert code == 200 and data["usage"]["completion_tokens"] == 3
    _, health = request(server, "GET", "/health")
    dropped = [r for r in health["recent"] if r["finish_reason"] == "cancelled"]
    # It was cancelled at once, far from the ~4000 tokens the context still had room for.
    assert len(dropped) == 1 and dropped[0]["completion_tokens"] < 1000


def test_binding_beyond_loopback_needs_a_key(checkpoint):
    out = subprocess.run([*SERVE, "-m", str(checkpoint), "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert "--api-key" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_shut_down_cleanly(checkpoint, sig):
    srv = start([*SERVE, "-m", str(checkpoint), "--port", "0"])
    conn = http.client.HTTPConnection(*srv.host_port, timeout=60)  # a stream in flight
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"model": model_id(checkpoint), "stream": True,
                                  "max_tokens": 100000,
                                  "messages": [{"role": "user", "content": "Hi /no_think"}]}))
    resp = conn.getresponse()
    seen = 0
    while seen < 5:  # past the first steps: on CPU, MLX compiles kernels there by running
        seen += b'"content"' in resp.readline()  # a compiler via system(), which ignores SIGINT
    srv.proc.send_signal(sig)
    assert srv.proc.wait(timeout=30) == 0
    assert "stopped" in "".join(srv.log) and "Traceback" not in "".join(srv.log)
    # The client still listening is told, in OpenAI's shape, and the stream ends.
    rest = resp.read().decode()
    assert '"code": "cancelled"' in rest and rest.rstrip().endswith("[DONE]")
    conn.close()
