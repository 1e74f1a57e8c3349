"""Peak memory while quantizing a float checkpoint on load, against mlx-lm, same files.

    python bench/load_peak.py            # ~2 minutes on a 2-core CPU

Each load runs in a fresh process (a peak is per process), alternating ours and mlx-lm's,
on the same float32 safetensors folder with the real 151,936-token vocabulary:
- ours: `qwen3_chat.load_model(folder, bits=4)` (the model takes its quantized layout first;
  the embedding and lm_head are quantized in row chunks read through a memory map, MoE
  experts one by one before stacking);
- mlx-lm: what its `convert --quantize` does, `load_model(folder, lazy=True)` then
  `quantize_model(..., bits=4, group_size=64)` and evaluating the parameters.
Reported: MLX's peak allocation (`mx.get_peak_memory`) and the size of the quantized
weights each ends with. Prints a table; writes JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# Widths of released models (config.json), 2 layers each (or 1 MoE layer): the peak is set by
# the largest single tensors (embedding, lm_head, an expert stack), not by the depth.
SHAPES = {
    "Qwen3-0.6B widths, tied": {"hidden_size": 1024, "intermediate_size": 3072,
                                "num_attention_heads": 16, "num_key_value_heads": 8,
                                "head_dim": 128, "num_hidden_layers": 2,
                                "tie_word_embeddings": True},
    "Qwen3-4B widths, tied": {"hidden_size": 2560, "intermediate_size": 9728,
                              "num_attention_heads": 32, "num_key_value_heads": 8,
                              "head_dim": 128, "num_hidden_layers": 2,
                              "tie_word_embeddings": True},
    "Qwen3-30B-A3B widths, 1 MoE layer of 64 experts, untied": {
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_hidden_layers": 1, "num_experts": 64, "num_experts_per_tok": 8,
        "tie_word_embeddings": False},
}  # fmt: skip


def child(engine: str, folder: str) -> None:
    """One load in this process; prints {"peak": bytes, "weights": bytes}."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if engine == "ours":
        from qwen3_chat.weights.loader import load_model

        model = load_model(folder, bits=4, dtype=mx.float32)
    else:
        from mlx_lm.utils import load_model, quantize_model

        model, config = load_model(Path(folder), lazy=True)
        model, _ = quantize_model(model, config, group_size=64, bits=4)
        mx.eval(model.parameters())
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    print(json.dumps({"peak": mx.get_peak_memory(), "weights": size}))


def measure(engine: str, folder: Path) -> dict:
    run = subprocess.run([sys.executable, __file__, "--child", engine, str(folder)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from checkpoints import REAL_VOCAB, make_checkpoint, tiny_config

    rows = []
    for name, shape in SHAPES.items():
        print(f"# {name} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            moe = "num_experts" in shape
            cfg = tiny_config(moe=moe, vocab_size=REAL_VOCAB, **shape)
            folder = make_checkpoint(Path(tmp) / "m", cfg)
            file_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            runs: dict[str, list[dict]] = {"ours": [], "mlx_lm": []}
            for r in range(args.reps):  # alternating, each in a fresh process
                for engine in ("ours", "mlx_lm") if r % 2 == 0 else ("mlx_lm", "ours"):
                    runs[engine].append(measure(engine, folder))
        peak = {e: max(x["peak"] for x in v) for e, v in runs.items()}
        rows.append({"shape": name, "float_file_bytes": file_bytes,
                     "peak_ours": peak["ours"], "peak_mlx_lm": peak["mlx_lm"],
                     "weights_ours": runs["ours"][0]["weights"],
                     "weights_mlx_lm": runs["mlx_lm"][0]["weights"],
                     "ratio": peak["ours"] / peak["mlx_lm"]})  # fmt: skip
    mb = 1e6
    lines = ["| shape (float32 file) | 4-bit weights MB (ours / mlx-lm) | load peak MB, ours | "
             "load peak MB, mlx-lm | ours / mlx-lm (target <= 0.5) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['float_file_bytes'] / mb:.0f} MB) | "
                     f"{r['weights_ours'] / mb:.0f} / {r['weights_mlx_lm'] / mb:.0f} | "
                     f"{r['peak_ours'] / mb:.0f} | {r['peak_mlx_lm'] / mb:.0f} | "
                     f"**{r['ratio']:.2f}x** |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_peak.json").write_text(json.dumps({"reps": args.reps, "rows": rows},
                                                        indent=2) + "\n")  # fmt: skip
    (args.out / "load_peak.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
