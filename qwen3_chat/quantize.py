"""Affine weight quantization (MLX's 4/8-bit formats), on load or for `qwen3 convert`."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

DEFAULT_GROUP_SIZE = 64
# The MoE router is tiny and routing is sensitive to its precision (mlx-lm keeps it at 8 bits).
ROUTER_PARAMS = {"group_size": 64, "bits": 8}


def _quantizable(module: nn.Module, group_size: int) -> bool:
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0


def quantize_model(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Quantize `model` in place; returns the `quantization` block for its config.json.

    Linear layers, stacked experts and the embedding/lm_head are quantized; norms are not.
    """
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 5, 6, 8, not {bits}")
    block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not _quantizable(module, group_size):
            return False
        if path.endswith("mlp.gate"):
            block[path] = dict(ROUTER_PARAMS)
            return dict(ROUTER_PARAMS)
        return True

    nn.quantize(model, group_size, bits, class_predicate=predicate)
    return block


def _inferred_params(path: str, module: nn.Module, weights: dict, default_group: int) -> dict:
    """Bits and group size of a stored quantized tensor, read from its packed shapes."""
    packed = weights[f"{path}.weight"].shape[-1]
    groups = weights[f"{path}.scales"].shape[-1]
    in_dims = module.weight.shape[-1]
    group_size = in_dims // groups if groups else default_group
    bits = packed * 32 // in_dims
    return {"group_size": group_size, "bits": bits}


def apply_quantization_config(model: nn.Module, quant: dict, weights: dict) -> None:
    """Turn `model` into the quantized layout a pre-quantized (MLX-community) folder holds.

    A module is quantized iff the checkpoint has its `.scales`; per-layer entries in the
    config (a dict of params, or false) override the global group size and bits.
    """
    default_group = int(quant.get("group_size", DEFAULT_GROUP_SIZE))
    default_bits = int(quant.get("bits", 4))

    def predicate(path: str, module: nn.Module) -> bool | dict:
        override = quant.get(path)
        if override is False:
            return False
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        if isinstance(override, dict):
            return {k: v for k, v in override.items() if k in ("group_size", "bits", "mode")}
        return _inferred_params(path, module, weights, default_group)

    nn.quantize(model, default_group, default_bits, class_predicate=predicate)

