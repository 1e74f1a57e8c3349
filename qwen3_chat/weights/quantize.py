"""Affine weight quantization (MLX's formats), on load or for `qwen3 convert`.

Two directions: `quantize_model` turns a float model into a quantized one and returns the
`quantization` block for its config.json; `apply_quantization_config` rebuilds that
quantized layout from a pre-quantized (MLX-community) folder before its weights load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen3_chat.errors import ModelLoadError

DEFAULT_GROUP_SIZE = 64
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# The MoE router is tiny and routing is sensitive to its precision (mlx-lm keeps it at 8 bits);
# so is the hybrid family's shared-expert gate (a sigmoid scale on the shared expert).
ROUTER_PARAMS: dict[str, Any] = {"group_size": 64, "bits": 8}
EIGHT_BIT_SUFFIXES = ("mlp.gate", "shared_expert_gate")
# Only affine: our stacked-expert layer (moe.QuantizedSwitchLinear) stores scales and biases.
SUPPORTED_MODES = ("affine",)
GLOBAL_KEYS = ("group_size", "bits", "mode")


def _check_params(where: str, group_size: Any, bits: Any, mode: Any = "affine") -> None:
    if mode not in SUPPORTED_MODES:
        raise ModelLoadError(f"{where}: quantization mode {mode!r} is not supported (affine only)")
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise ModelLoadError(f"{where}: quantization bits {bits!r} not in {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUP_SIZES or isinstance(group_size, bool):
        raise ModelLoadError(
            f"{where}: quantization group_size {group_size!r} not in {SUPPORTED_GROUP_SIZES}"
        )


def check_quantization_block(quant: Any) -> None:
    """Reject a config.json quantization block we cannot load, naming the bad entry.

    Hugging Face's own quantized checkpoints (FP8, AWQ, GPTQ) also use `quantization_config`
    but with a `quant_method` and different tensors: say so rather than fail on a tensor.
    """
    where = "config.json"
    if not isinstance(quant, dict):
        raise ModelLoadError(f"{where}: quantization must be an object, not {type(quant).__name__}")
    method = quant.get("quant_method")
    if method is not None:  # MLX's own block never carries one
        raise ModelLoadError(
            f"{where}: quant_method {method!r} checkpoints are not supported; use the original "
            "(bf16) checkpoint or an MLX-community quantized one"
        )
    _check_params(
        where,
        quant.get("group_size", DEFAULT_GROUP_SIZE),
        quant.get("bits"),
        quant.get("mode", "affine"),
    )
    for key, value in quant.items():
        if key in GLOBAL_KEYS or value is False:
            continue
        if isinstance(value, dict):
            _check_params(
                f"{where}: quantization[{key!r}]",
                value.get("group_size", quant.get("group_size", DEFAULT_GROUP_SIZE)),
                value.get("bits", quant.get("bits")),
                value.get("mode", quant.get("mode", "affine")),
            )


def _quantizable(module: nn.Module, group_size: int) -> bool:
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0


def quantize_model(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Quantize `model` in place; returns the `quantization` block for its config.json.

    Linear layers, stacked experts and the embedding/lm_head are quantized; norms are not;
    the MoE router (`mlp.gate`) is kept at 8 bits. The block is also recorded on
    `model.config.quantization`, so the model describes itself for `save_model`.
    """
    _check_params("quantize", group_size, bits)
    block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not _quantizable(module, group_size):
            return False
        if path.endswith(EIGHT_BIT_SUFFIXES):
            block[path] = dict(ROUTER_PARAMS)
            return dict(ROUTER_PARAMS)
        return True

    nn.quantize(model, group_size, bits, class_predicate=predicate)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization"):
        config.quantization = block
    return block


def _inferred_params(path: str, module: nn.Module, weights: dict) -> dict:
    """Bits and group size of a stored quantized tensor, read from its packed shapes.

    mlx-lm writes per-layer entries only where a layer differs from a predicate, not from
    the global default, so the shapes are the ground truth for unnamed layers.
    """
    if f"{path}.weight" not in weights:  # scales without the packed weight: a broken folder
        raise ModelLoadError(
            f"missing tensor {path}.weight (the checkpoint has its .scales but not the weight)"
        )
    packed = weights[f"{path}.weight"].shape[-1]
    groups = weights[f"{path}.scales"].shape[-1]
    in_dims = module.weight.shape[-1]
    if groups == 0 or in_dims % groups or (packed * 32) % in_dims:
        raise ModelLoadError(
            f"tensor {path}.weight: packed shape {tuple(weights[f'{path}.weight'].shape)} and "
            f"scales {tuple(weights[f'{path}.scales'].shape)} do not fit input size {in_dims}"
        )
    params = {"group_size": in_dims // groups, "bits": packed * 32 // in_dims}
    _check_params(f"tensor {path}.weight", params["group_size"], params["bits"])
    return params


def apply_quantization_config(model: nn.Module, quant: dict, weights: dict) -> None:
    """Turn `model` into the quantized layout a pre-quantized (MLX-community) folder holds.

    A module is quantized iff the checkpoint has its `.scales`; per-layer entries in the
    config (a dict of params, or false) override the global group size and bits.
    """
    check_quantization_block(quant)
    default_group = int(quant.get("group_size", DEFAULT_GROUP_SIZE))
    default_bits = int(quant["bits"])

    def predicate(path: str, module: nn.Module) -> bool | dict:
        override = quant.get(path)
        if override is False:
            return False
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        if isinstance(override, dict):
            return {
                "group_size": override.get("group_size", default_group),
                "bits": override.get("bits", default_bits),
            }
        return _inferred_params(path, module, weights)

    nn.quantize(model, default_group, default_bits, class_predicate=predicate)


# Float bytes of one row chunk when a large matrix (the embedding, lm_head) is quantized
# from its file piece by piece: small next to the quantized result, large enough to be quick.
CHUNK_BYTES = 16 * 1024**2

# (tensor name, first row, end row) -> those rows as read from the checkpoint file, or None
# when the tensor cannot be read in pieces (then it is quantized whole).
RowReader = Callable[[str, int, int], "mx.array | None"]


def _quantize_rows(key: str, w: mx.array, read_rows: RowReader, group_size: int, bits: int,
                   dtype: mx.Dtype) -> tuple[mx.array, ...]:  # fmt: skip
    """Quantize a 2-D float matrix chunk by chunk straight from its file, evaluating each
    chunk: the whole float matrix never exists in memory, only its quantized form."""
    rows, cols = w.shape
    step = max(1, CHUNK_BYTES // (cols * 4))
    if rows <= step or read_rows(key, 0, 1) is None:
        return mx.quantize(w.astype(dtype), group_size, bits)
    parts = []
    for start in range(0, rows, step):
        chunk = read_rows(key, start, min(rows, start + step)).astype(dtype)
        parts.append(mx.quantize(chunk, group_size, bits))
        mx.eval(parts[-1])
    out = tuple(mx.concatenate([p[i] for p in parts]) for i in range(3))
    del parts
    mx.eval(out)
    return out


def quantize_weights(model: nn.Module, weights: dict[str, mx.array],
                     experts: dict[str, list[mx.array]], read_rows: RowReader,
                     dtype: mx.Dtype) -> dict[str, mx.array]:  # fmt: skip
    """The tensors of `model`, already in its quantized layout (`quantize_model`), from a
    float checkpoint's `weights`, built so peak memory stays near the quantized size.

    Large matrices are quantized in row chunks from their file (`read_rows`); stacked MoE
    experts are quantized expert by expert from `experts` (module path -> per-expert float
    weights, in expert order) and only then stacked. The rest is quantized lazily and
    evaluated later, layer by layer; unquantized tensors are returned as they are."""
    out: dict[str, mx.array] = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if "scales" not in module:
            continue
        key, group_size, bits = f"{path}.weight", module.group_size, module.bits
        per_expert = experts.get(path)
        if per_expert is not None:
            parts = [mx.quantize(w.astype(dtype), group_size, bits) for w in per_expert]
            q = tuple(mx.stack([p[i] for p in parts]) for i in range(3))
        elif weights[key].ndim == 2:
            q = _quantize_rows(key, weights[key], read_rows, group_size, bits, dtype)
        else:
            q = mx.quantize(weights[key].astype(dtype), group_size, bits)
        out[key], out[f"{path}.scales"], out[f"{path}.biases"] = q
    # The rest (norms, biases) the loader casts as it does for any float checkpoint.
    return {**weights, **out}
