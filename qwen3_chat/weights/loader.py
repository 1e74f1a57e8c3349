"""Load a Hugging Face-layout Qwen3 folder (safetensors only) into our MLX model.

Weights are memory-mapped lazily and evaluated layer by layer, so peak memory stays near
the size of the (possibly quantized) weights. Every problem becomes a ModelLoadError that
names the file and tensor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from qwen3_chat.errors import ModelLoadError, Qwen3ChatError
from qwen3_chat.files import read_json, write_json
from qwen3_chat.models import build_model, config_from_dict
from qwen3_chat.models.config import EXPERT_KEY, QUANT_BITS, check_bits
from qwen3_chat.models.qwen3 import Model
from qwen3_chat.weights.quantize import (
    RowReader,
    apply_quantization_config,
    check_quantization_block,
    quantize_model,
    quantize_weights,
)
from qwen3_chat.weights.verify import INDEX_FILE, HeaderError, parse_header, shard_list

if TYPE_CHECKING:
    from qwen3_chat.chat.tokenizer import Tokenizer

SHARD_BYTES = 5 * 1024**3
FLOAT_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def default_dtype() -> mx.Dtype:
    """float32 on the CPU (bf16 is ~9x slower there and CPU gather_mm needs float32), else bf16."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def check_safetensors(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file holds every byte it promises."""
    try:
        header, needed = parse_header(path)
    except HeaderError as e:
        raise ModelLoadError(str(e)) from None
    size = path.stat().st_size
    if needed > size:
        raise ModelLoadError(
            f"{path.name}: truncated safetensors file ({size} bytes, header needs {needed})"
        )
    return header


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (via its index when sharded)."""
    try:
        return shard_list(path)[0]
    except HeaderError as e:
        raise ModelLoadError(str(e)) from None


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
        # Packed quantized weights are uint32, everything else a float we cast: anything else
        # (an int norm, a float where packed bits belong) would only fail deep inside MLX.
        want_float = mx.issubdtype(expected[k].dtype, mx.floating)
        if want_float != mx.issubdtype(v.dtype, mx.floating) or (
            not want_float and v.dtype != expected[k].dtype
        ):
            raise ModelLoadError(
                f"{_where(k, origin)}: tensor {k} has dtype {v.dtype}, "
                f"expected {'a float type' if want_float else expected[k].dtype}"
            )


def _eval_by_layer(model: Model) -> None:
    """Materialise weights one layer at a time to keep peak memory near the final size."""
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def _resolve_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise ModelLoadError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, not {dtype!r}")
        return FLOAT_DTYPES[dtype]
    if dtype not in FLOAT_DTYPES.values():
        raise ModelLoadError(f"dtype must be a floating type, not {dtype}")
    return dtype


def _check_experts(weights: dict[str, mx.array], origin: dict[str, str]) -> None:
    """Per-expert tensors must agree in shape before Model.sanitize stacks them (mx.stack
    would otherwise fail with a bare ValueError that names no tensor)."""
    first: dict[tuple[str, str], tuple[str, tuple[int, ...]]] = {}
    for key in sorted(weights):
        m = EXPERT_KEY.match(key)
        if m is None:
            continue
        group = (m.group(1), m.group(3), m.group(4))
        shape = tuple(weights[key].shape)
        ref = first.setdefault(group, (key, shape))
        if shape != ref[1]:
            raise ModelLoadError(
                f"{origin.get(key, 'checkpoint')}: tensor {key} has shape {shape}, "
                f"expected {ref[1]} like {ref[0]}"
            )


def _expert_weights(weights: dict[str, mx.array]) -> dict[str, list[mx.array]]:
    """Per-expert float weights by the stacked module they become (in expert order), so
    quantizing on load can quantize each expert before stacking."""
    found: dict[str, dict[int, mx.array]] = {}
    for key, value in weights.items():
        m = EXPERT_KEY.match(key)
        if m is not None and m.group(4) == "weight":
            found.setdefault(f"{m.group(1)}.switch_mlp.{m.group(3)}", {})[int(m.group(2))] = value
    return {path: [by[e] for e in sorted(by)] for path, by in found.items()}


# safetensors dtypes we can read rows of straight from the file (bf16 via its bit pattern).
ROW_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None),
              "BF16": (np.uint16, mx.bfloat16)}  # fmt: skip


def _row_reader(path: Path, origin: dict[str, str]) -> RowReader:
    """Reads rows of a 2-D tensor from its safetensors file through a memory map, so a
    chunk is all that is held in memory (mx.load would materialise the whole tensor)."""
    headers: dict[str, tuple[dict[str, Any], int]] = {}

    def read(key: str, start: int, stop: int) -> mx.array | None:
        name = origin.get(key)
        if name is None:
            return None
        if name not in headers:
            with (path / name).open("rb") as f:
                data_start = 8 + int.from_bytes(f.read(8), "little")
            headers[name] = (parse_header(path / name)[0], data_start)
        header, data_start = headers[name]
        info = header.get(key, {})
        kind = ROW_DTYPES.get(info.get("dtype"))
        shape = info.get("shape")
        if kind is None or not isinstance(shape, list) or len(shape) != 2:
            return None
        np_dtype, view = kind
        rows = np.memmap(path / name, dtype=np_dtype, mode="r", shape=tuple(shape),
                         offset=data_start + info["data_offsets"][0])  # fmt: skip
        chunk = mx.array(np.ascontiguousarray(rows[start:stop]))
        return chunk.view(view) if view is not None else chunk

    return read


def in_compute_dtype(model: nn.Module, weights: dict[str, mx.array],
                     dtype: mx.Dtype) -> list[tuple[str, mx.array]]:  # fmt: skip
    """`weights` as `model.load_weights` takes them: floats in `dtype`, but the parameters the
    model names in `float32_params` stay float32 whatever the dtype (the hybrid's A_log)."""
    keep = getattr(model, "float32_params", ())
    return [(k, v.astype(mx.float32 if k.endswith(keep) else dtype))
            if mx.issubdtype(v.dtype, mx.floating) else (k, v)
            for k, v in weights.items()]  # fmt: skip


def load_model(
    path: str | Path, *, bits: int | None = None, dtype: mx.Dtype | str | None = None
) -> Model:
    """Build a Model from a local Hugging Face-layout folder (float or MLX pre-quantized).

    `bits=4|8` quantizes a float checkpoint on load (group size 64, router at 8 bits).
    """
    path = Path(path)
    if bits is not None:
        check_bits(bits, QUANT_BITS, error=ModelLoadError)
    compute_dtype = _resolve_dtype(dtype)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a model folder")
    # model_type picks the architecture: Qwen3 (dense/MoE) or the hybrid family.
    config = config_from_dict(read_json(path / "config.json", error=ModelLoadError))
    if config.quantization:
        check_quantization_block(config.quantization)
        if bits is not None:
            raise ModelLoadError(f"{path}: already quantized; drop --bits")
    weights, origin = read_weights(path)
    model = build_model(config)
    _check_experts(weights, origin)
    experts = _expert_weights(weights) if bits is not None else {}
    loaded = weights
    try:
        weights = model.sanitize(weights)
    except (ValueError, RuntimeError) as e:  # anything sanitize did not phrase itself
        raise ModelLoadError(
            f"{path}: cannot map checkpoint tensors onto the model ({e})"
        ) from None
    # A hybrid folder without `mtp.*` (MLX-community conversions drop it) takes the head
    # fetched from its original repo before (hub/mtp_fetch.py), if any; no network here.
    if getattr(model, "mtp_weights", None) == {}:
        from qwen3_chat.hub.mtp_fetch import attach_head, head_file

        if (head := head_file(path)) is not None:
            attach_head(model, head)
    if config.quantization:
        apply_quantization_config(model, config.quantization, weights)
    _validate(model, weights, origin)
    if bits is not None:
        # The model takes its quantized layout first and the float tensors are quantized piece
        # by piece into it, so no whole float embedding or expert stack is ever built.
        quantize_model(model, bits)
        # Rows are read from the file only for tensors sanitize passed through unchanged.
        same = {k: origin[k] for k, v in weights.items() if loaded.get(k) is v and k in origin}
        weights = quantize_weights(model, weights, experts, _row_reader(path, same),
                                   compute_dtype)  # fmt: skip
    model.load_weights(in_compute_dtype(model, weights, compute_dtype), strict=True)
    # Drop our references to the (lazy) float tensors: otherwise evaluating the quantized
    # weights below would keep every float tensor alive and double the peak memory.
    del weights, experts, loaded
    try:
        _eval_by_layer(model)
    except Exception as e:  # a file changed or broke under us while mapping
        raise ModelLoadError(f"{path}: failed to read weights ({e})") from None
    model.eval()
    return model


def load(
    path: str | Path, *, bits: int | None = None, dtype: mx.Dtype | str | None = None
) -> tuple[Model, Tokenizer]:
    """Load a local Qwen3 folder: returns (model, tokenizer)."""
    # Imported here so load_model works (and imports fast) without the tokenizer module.
    from qwen3_chat.chat.tokenizer import Tokenizer

    try:
        model = load_model(path, bits=bits, dtype=dtype)
        return model, Tokenizer.from_dir(Path(path))
    except Qwen3ChatError as e:
        # A downloaded copy that passed its checks yet fails here is best fetched afresh.
        from qwen3_chat.hub.download import cache_repair_hint

        hint = cache_repair_hint(Path(path))
        if hint is None:
            raise
        raise type(e)(f"{e}; {hint}") from None


def _shard(params: dict[str, mx.array], max_bytes: int) -> list[dict[str, mx.array]]:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for k in sorted(params):
        if size and size + params[k].nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = params[k]
        size += params[k].nbytes
    return shards


def save_model(
    model: nn.Module,
    config: dict[str, Any] | None,
    out_dir: str | Path,
    *,
    extra_files: Iterable[str | Path] = (),
    max_shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write `model` as safetensors shards + config.json (+ `extra_files`, e.g. the tokenizer).

    `config` is the config.json to write (None: the one the model was loaded from). The
    quantization block comes from `config` or, failing that, from `model.config`
    (recorded by quantize_model) and is written as both `quantization` and
    `quantization_config`, as MLX-community folders do. The folder is assembled beside
    `out_dir` and renamed into place, so an interrupted save never leaves a half-written
    model that looks complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelLoadError(f"{out_dir}: exists and is not an empty folder")
    extra = [Path(f) for f in extra_files]
    for f in extra:
        if not f.is_file():
            raise ModelLoadError(f"{f}: no such file to copy into {out_dir}")
    # None: the config.json the model was loaded from, kept on its ModelConfig.
    config = dict(config if config is not None else model.config.raw)
    quant = config.get("quantization") or getattr(
        getattr(model, "config", None), "quantization", None
    )
    if quant:
        config["quantization"] = config["quantization_config"] = quant
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise ModelLoadError(f"{out_dir}: cannot create ({e})") from None
    try:
        params = dict(tree_flatten(model.parameters()))
        # Tensors kept beside the modules as stored (the hybrid family's mtp.* head).
        params.update(getattr(model, "mtp_weights", {}))
        shards = _shard(params, max_shard_bytes)
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
            write_json(tmp / INDEX_FILE, index)
        write_json(tmp / "config.json", config, sort_keys=True)
        for f in extra:
            shutil.copyfile(f, tmp / f.name)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):  # disk full, permissions, MLX write errors
            raise ModelLoadError(f"{out_dir}: cannot write model ({e})") from None
        raise
    return out_dir
