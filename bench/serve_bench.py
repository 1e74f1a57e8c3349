"""Benchmark `qwen3 serve` against `mlx_lm.server` in one run: TTFT and tokens/s under load.

    python bench/serve_bench.py                 # 1, 4 and 8 concurrent streams, CPU test model
    python bench/serve_bench.py --tokens 32 --concurrency 1 4

Both servers load the same checkpoint (random weights, the real Qwen3 tokenizer and
vocabulary) and stay up side by side; rounds alternate between them (never both at once)
and medians over `--reps` rounds are reported. Each stream
asks a different question (no shared prompt cache), greedy, thinking off, a fixed number
of tokens. Reported per concurrency: median time to first token, median per-stream decode
tokens/s, and total tokens/s over the wall time of the whole batch. Not a test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from checkpoints import make_checkpoint, tiny_config  # noqa: E402

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "qwen3-tokenizer"
# A small model in Qwen3's layout with the real 151,936 vocabulary: the lm_head dominates,
# as it does for the 0.6B model, and a CPU step takes milliseconds.
BENCH_MODEL = dict(vocab_size=151936, hidden_size=256, intermediate_size=768,
                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=32, tie_word_embeddings=False)  # fmt: skip


@dataclass
class Stream:
    ttft: float
    tokens: int
    decode_tps: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not come up")


def stream_once(port: int, model: str, question: str, tokens: int) -> Stream:
    body = {"model": model, "stream": True, "max_tokens": tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": question}],
            "chat_template_kwargs": {"enable_thinking": False},
            "stream_options": {"include_usage": True}}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    first = last = None
    pieces, usage = 0, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line.endswith("[DONE]"):
            continue
        data = json.loads(line[5:])
        usage = data.get("usage") or usage
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                now = time.perf_counter()
                first = first or now
                last = now
                pieces += 1
    conn.close()
    n = (usage or {}).get("completion_tokens") or pieces
    first = first or time.perf_counter()
    span = (last or first) - first
    return Stream(first - start, n, (n - 1) / span if n > 1 and span > 0 else 0.0)


def load(port: int, model: str, concurrency: int, tokens: int, round_: int) -> dict:
    results: list[Stream] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = stream_once(port, model, f"Question {round_}-{i}: tell me about number {i * 7}.",
                        tokens)  # fmt: skip
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "ttft_ms": statistics.median(r.ttft for r in results) * 1000,
        "ttft_max_ms": max(r.ttft for r in results) * 1000,
        "stream_tps": statistics.median(r.decode_tps for r in results),
        "total_tps": sum(r.tokens for r in results) / wall,
        "tokens": sum(r.tokens for r in results),
    }


def start_server(kind: str, path: Path) -> tuple[subprocess.Popen, int, str]:
    port = free_port()
    if kind == "ours":
        cmd = [sys.executable, "-m", "qwen3_chat", "serve", "-m", str(path), "--port", str(port)]
        model = path.name
    else:
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--port",
               str(port), "--log-level", "ERROR"]  # fmt: skip
        model = str(path)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, proc)
    stream_once(port, model, "warm up", 8)  # compile kernels, fill allocator caches
    return proc, port, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--reps", type=int, default=2, help="alternating rounds; medians")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = ap.parse_args()

    path = make_checkpoint(Path(tempfile.mkdtemp(prefix="serve-bench-")),
                           tiny_config(**BENCH_MODEL), tokenizer_dir=args.tokenizer)  # fmt: skip
    servers: dict[str, tuple[subprocess.Popen, int, str]] = {}
    runs: dict[tuple[str, int], list[dict]] = {}
    try:  # both stay up; rounds alternate between them so load on the host hits both alike
        for kind in ("ours", "mlx_lm"):
            servers[kind] = start_server(kind, path)
        for rep in range(args.reps):
            for c in args.concurrency:
                for kind, (_, port, model) in servers.items():
                    r = load(port, model, c, args.tokens, rep * 100 + c)
                    runs.setdefault((kind, c), []).append(r)
                    print(json.dumps({"server": kind, "concurrency": c, **r}), file=sys.stderr,
                          flush=True)  # fmt: skip
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    rows = [{"server": kind, "concurrency": c,
             **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
            for (kind, c), rs in runs.items()]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": args.tokens, "reps": args.reps, "model": BENCH_MODEL,
                                    "rows": rows}, indent=2))  # fmt: skip
    print("| streams | server | TTFT median ms (max) | per-stream tok/s | total tok/s |")
    print("|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["server"] != "ours")):
        name = "qwen3 serve" if r["server"] == "ours" else "mlx_lm.server"
        print(f"| {r['concurrency']} | {name} | {r['ttft_ms']:.0f} ({r['ttft_max_ms']:.0f})"
              f" | {r['stream_tps']:.1f} | {r['total_tps']:.1f} |")


if __name__ == "__main__":
    main()
