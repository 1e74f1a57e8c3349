"""Load a Hugging Face-layout Qwen3 folder (safetensors only) into our MLX model.

Weights are memory-mapped lazily and evaluated layer by layer, so peak memory stays near
the size of the (possibly quantized) weights. Every problem becomes a ModelLoadError that
names the file and tensor.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen3_chat.config import ModelConfig
from qwen3_chat.errors import ModelLoadError
from qwen3_chat.model import Model
from qwen3_chat.quantize import apply_quantization_config, quantize_model

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SHARD_BYTES = 5 * 1024**3


def default_dtype() -> mx.Dtype:
    """float32 on the CPU (bf16 is ~9x slower there and CPU gather_mm needs float32), else bf16."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path.name}: not valid JSON ({e})") from None


def check_safetensors(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file holds every byte it promises."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path.name}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 1024**2:
                raise ModelLoadError(f"{path.name}: corrupt safetensors header")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path.name}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name}: corrupt safetensors header")
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{path.name}: truncated safetensors file ({size} bytes, header needs {8 + n + end})"
        )
    return header


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (via its index when sharded)."""
    index = path / INDEX_FILE
    if index.exists():
        data = _read_json(index)
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ModelLoadError(f"{INDEX_FILE}: no weight_map")
        names = sorted(set(wmap.values()))
        for name in names:
            if Path(name).name != name:
                raise ModelLoadError(f"{INDEX_FILE}: bad shard name {name!r}")
            if not (path / name).exists():
                raise ModelLoadError(f"{INDEX_FILE} lists {name}, which is missing")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise ModelLoadError(
                f"{path}: only pickle weights (.bin/.pt) found; qwen3-chat loads safetensors only"
            )
        raise ModelLoadError(f"{path}: no .safetensors weights found")
    return files


def read_weights(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """All tensors (lazily mapped) and the file each came from."""
    weights: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for f in weight_files(path):
        check_safetensors(f)
        try:
            tensors = mx.load(str(f))
        except Exception as e:  # MLX raises bare RuntimeError/ValueError for bad files
            raise ModelLoadError(f"{f.name}: cannot read safetensors ({e})") from None
        for k, v in tensors.items():
            if k in weights:
                raise ModelLoadError(f"{f.name}: tensor {k} also appears in {origin[k]}")
            weights[k], origin[k] = v, f.name
    return weights, origin


def _where(key: str, origin: dict[str, str]) -> str:
    if key in origin:
        return origin[key]
    # Stacked experts come from per-expert keys: name the file of expert 0.
    stem = key.replace(".switch_mlp.", ".experts.0.")
    return origin.get(stem, "checkpoint")


def _validate(model: nn.Module, weights: dict[str, mx.array], origin: dict[str, str]) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        files = ", ".join(sorted(set(origin.values()))) or "checkpoint"
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{files}: missing tensor {missing[0]}{more}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ModelLoadError(f"{_where(extra[0], origin)}: unexpected tensor {extra[0]}{more}")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise ModelLoadError(
                f"{_where(k, origin)}: tensor {k} has shape {tuple(v.shape)}, "
                f"expected {tuple(expected[k].shape)}"
            )


def _eval_by_layer(model: Model) -> None:
    """Materialise weights one layer at a time to keep peak memory near the final size."""
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def load_model(
    path: str | Path, *, bits: int | None = None, dtype: mx.Dtype | None = None
) -> Model:
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a model folder")
    config = ModelConfig.from_dict(_read_json(path / "config.json"))
    if bits is not None and bits not in (4, 8):
        raise ModelLoadError(f"bits must be 4 or 8, not {bits}")
    weights, origin = read_weights(path)
    model = Model(config)
    weights = model.sanitize(weights)
    if config.quantization:
        apply_quantization_config(model, config.quantization, weights)
    _validate(model, weights, origin)
    dtype = dtype or default_dtype()
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }
    model.load_weights(list(weights.items()), strict=True)
    if bits is not None:
        if config.quantization:
            raise ModelLoadError(f"{path}: already quantized; drop --bits")
        quantize_model(model, bits)
    try:
        _eval_by_layer(model)
    except Exception as e:  # a file changed or broke under us while mapping
        raise ModelLoadError(f"{path}: failed to read weights ({e})") from None
    model.eval()
    return model


def load(path: str | Path, *, bits: int | None = None, dtype: mx.Dtype | None = None):
    """Load a local Qwen3 folder: returns (model, tokenizer)."""
    from qwen3_chat.tokenizer import Tokenizer

    model = load_model(path, bits=bits, dtype=dtype)
    return model, Tokenizer.from_dir(Path(path))


def save_model(model: nn.Module, config: dict, out_dir: str | Path) -> Path:
    """Write `model` as safetensors shards + config.json, atomically replacing nothing.

    The folder is assembled beside `out_dir` and renamed into place, so an interrupted
    save never leaves a half-written model that looks complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelLoadError(f"{out_dir}: exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    params = dict(tree_flatten(model.parameters()))
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for k in sorted(params):
        if size and size + params[k].nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = params[k]
        size += params[k].nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        total = sum(v.nbytes for v in params.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return out_dir
