"""Support for the server tests: real servers in subprocesses, and a scripted test model.

The server runs in its own process, as in production: MLX work on the server's worker
thread, real uvicorn on a free port of 127.0.0.1. `qwen3 serve` serves tiny random
checkpoints; for what a random model never does (think, call tools) this file, run as a
script, serves `ScriptedModel`, a stand-in for the *model* only, whose logits spell a
chosen reply. Everything else (tokenizer, template, engine, budget, HTTP) is the real code.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"on (http://[\d.]+:\d+)/v1")


# -- the scripted model ---------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """When `needle` is in the conversation so far, reply with this reasoning and answer."""

    needle: str
    answer: str
    reasoning: str | None = None


def _make_ids_cache():
    from qwen3_chat.models.cache import KVCache

    class IdsCache(KVCache):
        """A KV cache that keeps token ids instead of keys/values; offset/trim as usual."""

        def __init__(self) -> None:
            super().__init__()
            self.ids: list[int] = []

    return IdsCache()


@dataclass
class ScriptedModel:
    """Logits that put all mass on the next token of a scripted assistant reply.

    The reply is picked by the rules from the decoded conversation and continued from
    what the assistant turn holds so far, so forced tokens (the budget's closing) and a
    thinking-off prompt's empty think block are followed like a real model would.
    """

    tokenizer: Any
    rules: list[Rule]
    context: int = 4096
    config: Any = field(init=False)

    def __post_init__(self) -> None:
        from types import SimpleNamespace

        vocab = self.tokenizer.vocab_size
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=self.context)
        self.header = self.tokenizer.encode("<|im_start|>assistant\n")
        self.im_end = self.tokenizer.token_to_id("<|im_end|>")
        self.think_end = self.tokenizer.think_end_id

    def make_cache(self) -> list:
        return [_make_ids_cache()]

    def _reply(self, context: list[int]) -> tuple[list[int], list[int], list[int]]:
        n = len(self.header)
        start = max(i for i in range(len(context) - n + 1) if context[i : i + n] == self.header)
        prompt = self.tokenizer.decode(context[:start])
        rule = [r for r in self.rules if r.needle in prompt][-1]
        answer = self.tokenizer.encode("\n\n" + rule.answer) + [self.im_end]
        full = (
            self.tokenizer.encode(f"<think>\n{rule.reasoning}\n</think>\n\n{rule.answer}")
            + [self.im_end]
            if rule.reasoning is not None
            else answer[1:]
        )
        return context[start + n :], full if rule.reasoning is not None else answer, answer

    def next_token(self, context: list[int]) -> int:
        so_far, full, answer = self._reply(context)
        if so_far == full[: len(so_far)] and len(so_far) < len(full):
            return full[len(so_far)]
        if self.think_end in so_far:  # thinking closed (by the budget or the template)
            after = so_far[len(so_far) - so_far[::-1].index(self.think_end) :]
            if after == answer[: len(after)] and len(after) < len(answer):
                return answer[len(after)]
        return self.im_end

    def __call__(self, inputs, cache=None, last_only: bool = False):
        import mlx.core as mx

        rows = inputs.tolist()[0]
        c = cache[0]
        c.ids = c.ids[: c.offset] + rows
        c.offset += len(rows)
        token = self.next_token(c.ids)
        one_hot = mx.where(mx.arange(self.config.vocab_size) == token, 0.0, -1e9)
        return mx.broadcast_to(one_hot, (1, 1 if last_only else len(rows), one_hot.shape[0]))


# -- servers in subprocesses ----------------------------------------------------------------
@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: list[str]

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start(cmd: list[str], env: dict[str, str] | None = None) -> Server:
    """Run a server command; wait for its "on http://HOST:PORT/v1" line on stderr."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    log: list[str] = []
    url = None
    for line in proc.stderr:
        log.append(line)
        if m := READY.search(line):
            url = m.group(1)
            break
    if url is None:
        proc.wait()
        raise RuntimeError(f"server did not start (exit {proc.returncode}):\n{''.join(log)}")

    def drain() -> None:  # keep reading so the server never blocks on a full pipe
        for line in proc.stderr:
            log.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return Server(proc, url, log)


def scripted_cmd(tokenizer_dir: Path, rules: list[Rule], **options: Any) -> list[str]:
    spec = {"tokenizer": str(tokenizer_dir), "rules": [r.__dict__ for r in rules], **options}
    return [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)]


def request(server: Server, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
    """One raw HTTP request; returns (status, parsed JSON body or the raw text)."""
    conn = http.client.HTTPConnection(*server.host_port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read().decode()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw


def main(spec: dict[str, Any]) -> None:
    from qwen3_chat.chat.tokenizer import Tokenizer
    from qwen3_chat.serve.app import bind, serve
    from qwen3_chat.serve.engine import ServeConfig, ServeEngine

    tokenizer = Tokenizer.from_dir(spec.pop("tokenizer"))
    # A template switch of our own (as Qwen3.5's preserve_thinking), to see kwargs reach it.
    tokenizer.chat_template = spec.pop("template_prefix", "") + tokenizer.chat_template
    rules = [Rule(**r) for r in spec.pop("rules")]
    model = ScriptedModel(tokenizer, rules, spec.pop("context", 4096))
    api_key, max_body = spec.pop("api_key", None), spec.pop("max_body", 1 << 20)
    engine = ServeEngine(model, tokenizer, ServeConfig(model_id="scripted", **spec))
    sock = bind("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    print(f"scripted model on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    serve(engine, sock, model_ids=["scripted"], api_key=api_key, max_body=max_body)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(json.loads(sys.argv[1]))
