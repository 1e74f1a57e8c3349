"""Affine weight quantization (MLX's formats), on load or for `qwen3 convert`.

Two directions: `quantize_model` turns a float model into a quantized one and returns the
`quantization` block for its config.json; `apply_quantization_config` rebuilds that
quantized layout from a pre-quantized (MLX-community) folder before its weights load.
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

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
