"""Tokens/s and time per token against the rank count, on loopback, in one run.

    python bench/distributed_bench.py            # 1, 2 and 3 ranks, pipeline; 2 ranks tensor
    python bench/distributed_bench.py --layers 12 --hidden 512 --decode 64
    python bench/distributed_bench.py --hybrid   # the Qwen3-Next family's layers

A random-weight Qwen3 in float32 (the real 151,936 vocab) is written once as safetensors;
every configuration loads it the way `qwen3 chat --hosts` does (each rank its share) and
runs the same prefill and greedy decode. Ranks are real processes started by mlx.launch
with the ring backend over 127.0.0.1. Prints a Markdown table; writes JSON beside it.
On one machine the ranks share its cores: this measures the protocol's overhead, not
what several Macs would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 151936


def write_model(folder: Path, layers: int, hidden: int) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    heads, kv, hd = max(2, hidden // 64), max(2, hidden // 128), 64
    cfg = {"model_type": "qwen3", "hidden_size": hidden, "intermediate_size": 3 * hidden,
           "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": hd, "vocab_size": VOCAB,
           "max_position_embeddings": 4096, "tie_word_embeddings": False,
           "rms_norm_eps": 1e-6, "rope_theta": 1e6}  # fmt: skip
    rng = np.random.default_rng(0)

    def lin(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    w = {"model.embed_tokens.weight": lin(VOCAB, hidden), "lm_head.weight": lin(VOCAB, hidden),
         "model.norm.weight": np.ones(hidden, np.float32)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": lin(heads * hd, hidden),
              p + "self_attn.k_proj.weight": lin(kv * hd, hidden),
              p + "self_attn.v_proj.weight": lin(kv * hd, hidden),
              p + "self_attn.o_proj.weight": lin(hidden, heads * hd),
              p + "self_attn.q_norm.weight": np.ones(hd, np.float32),
              p + "self_attn.k_norm.weight": np.ones(hd, np.float32),
              p + "mlp.gate_proj.weight": lin(3 * hidden, hidden),
              p + "mlp.up_proj.weight": lin(3 * hidden, hidden),
              p + "mlp.down_proj.weight": lin(hidden, 3 * hidden),
              p + "input_layernorm.weight": np.ones(hidden, np.float32),
              p + "post_attention_layernorm.weight": np.ones(hidden, np.float32)}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(folder / "model.safetensors"))
    return folder


def write_hybrid(folder: Path, layers: int, hidden: int) -> Path:
    """A Qwen3-Next-shaped model (3 Gated DeltaNet layers to 1 gated attention, dense MLP),
    random weights in our own (MLX) layout, which loads as an MLX-converted folder does."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from qwen3_chat.models import build_model, config_from_dict

    heads = max(2, hidden // 64)
    cfg = {"model_type": "qwen3_next", "hidden_size": hidden, "intermediate_size": 3 * hidden,
           "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": max(2, hidden // 256), "head_dim": 64,
           "linear_num_key_heads": max(2, heads // 2), "linear_num_value_heads": heads,
           "linear_key_head_dim": 64, "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4,
           "full_attention_interval": 4, "num_experts": 0, "vocab_size": VOCAB,
           "max_position_embeddings": 4096, "tie_word_embeddings": False,
           "rms_norm_eps": 1e-6, "rope_theta": 1e6, "partial_rotary_factor": 0.25}  # fmt: skip
    mx.random.seed(0)
    model = build_model(config_from_dict(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


def measure(model, prompt: int, decode: int) -> dict:
    """Prefill `prompt` tokens, then `decode` greedy steps: seconds and tokens/s."""
    import mlx.core as mx

    cache = model.make_cache()
    ids = mx.array([[(7 * i) % 1000 + 10 for i in range(prompt)]], dtype=mx.int32)
    t0 = time.perf_counter()
    y = mx.argmax(model(ids, cache=cache, last_only=True)[:, -1], axis=-1)
    mx.eval(y)
    t1 = time.perf_counter()
    steps = []
    for _ in range(decode):
        s = time.perf_counter()
        y = mx.argmax(model(y.reshape(1, 1), cache=cache, last_only=True)[:, -1], axis=-1)
        mx.eval(y)
        steps.append(time.perf_counter() - s)
    return {"prefill_tps": prompt / (t1 - t0), "decode_tps": decode / sum(steps),
            "ms_per_token": 1000 * statistics.median(steps)}  # fmt: skip


def rank_main(model_dir: Path, out: Path, parallel: str, prompt: int, decode: int) -> None:
    """One rank under mlx.launch: rank 0 measures, the others follow."""
    import mlx.core as mx

    from qwen3_chat.distributed.hosts import model_digest
    from qwen3_chat.distributed.pipeline import PipelineModel
    from qwen3_chat.distributed.tensor import TensorModel
    from qwen3_chat.distributed.worker import follow, join

    group = mx.distributed.init(strict=True, backend="ring")
    names = [f"rank {r}" for r in range(group.size())]
    joined = join(group, model_dir, model_digest(model_dir), bits=None, dtype=mx.float32,
                  names=names, parallel=parallel)  # fmt: skip
    if group.rank():
        follow(joined.stage, joined.steps(mx.float32))
        return
    kind = TensorModel if parallel == "tensor" else PipelineModel
    model = kind(joined.stage, group, wire=mx.float32)
    try:
        measure(model, 16, 4)  # warm-up
        out.write_text(json.dumps(measure(model, prompt, decode)))
    finally:
        model.close()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(n: int, parallel: str, model_dir: Path, args: argparse.Namespace) -> dict:
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [launcher, "--backend", "ring", "-n", str(n), "-p", str(_port()), sys.executable,
           __file__, "--rank", str(model_dir), str(out), parallel,
           "--prompt", str(args.prompt), "--decode", str(args.decode)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    try:
        if not out.read_text():
            raise SystemExit(f"{n} ranks ({parallel}) failed:\n{run.stderr[-3000:]}")
        return json.loads(out.read_text())
    finally:
        out.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--decode", type=int, default=48)
    p.add_argument("--ranks", default="1,2,3")
    p.add_argument("--hybrid", action="store_true", help="a Qwen3-Next-shaped model instead")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--rank", nargs=3, metavar=("MODEL", "OUT", "PARALLEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank:
        rank_main(Path(args.rank[0]), Path(args.rank[1]), args.rank[2], args.prompt, args.decode)
        return
    from qwen3_chat.weights.loader import load_model

    with tempfile.TemporaryDirectory() as tmp:
        write = write_hybrid if args.hybrid else write_model
        model_dir = write(Path(tmp) / "model", args.layers, args.hidden)
        rows = []
        for n in [int(x) for x in args.ranks.split(",")]:
            modes = ["pipeline", "tensor"] if n == 2 else ["pipeline"]
            for mode in modes:
                if n == 1:
                    model = load_model(model_dir, dtype="float32")
                    measure(model, 16, 4)
                    r = measure(model, args.prompt, args.decode)
                    mode = "one process"
                    del model
                else:
                    r = run_ranks(n, mode, model_dir, args)
                rows.append({"ranks": n, "mode": mode, **r})
                print(f"{n} {mode}: {r}", file=sys.stderr, flush=True)
    kind = "Qwen3-Next-shaped (3 linear : 1 attention)" if args.hybrid else "Qwen3"
    head = (f"{kind}, {args.layers} layers, hidden {args.hidden}, vocab {VOCAB}, float32, "
            f"prompt {args.prompt}, {args.decode} decode steps; {platform.machine()}, "
            f"{os.cpu_count()} cores, ring over 127.0.0.1")  # fmt: skip
    lines = [head, "", "| ranks | mode | prefill tok/s | decode tok/s | ms/token (median) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['mode']} | {r['prefill_tps']:.0f} | "
                     f"{r['decode_tps']:.1f} | {r['ms_per_token']:.1f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "distributed-hybrid" if args.hybrid else "distributed"
    (args.out / f"{name}.json").write_text(json.dumps({"setup": head, "rows": rows}, indent=1))
    (args.out / f"{name}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
