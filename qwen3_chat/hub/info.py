"""What a model folder holds, read from config.json and safetensors headers: no weights loaded.

`qwen3 show` prints it; a server can report it. The memory estimate is what loading would
take: the weights as they sit in memory (floats cast to the compute dtype, packed
quantized weights as stored) plus a full KV cache at the default context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qwen3_chat.errors import ModelLoadError
from qwen3_chat.hub.open import read_config, registry_entry, stored_bits

# Bytes per element of each safetensors dtype we may meet.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4,
               "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class ModelInfo:
    name: str
    path: str
    architecture: str
    model_type: str
    kind: str  # "dense" | "moe"
    layers: int
    hidden_size: int
    ffn_size: int  # the MLP's intermediate size; per expert for MoE
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    experts: int  # 0 for dense models
    experts_per_token: int
    capability: str  # hybrid | always | never
    context_length: int
    quantization: dict[str, Any] | None  # {"bits", "group_size"} of a pre-quantized folder
    stored_dtype: str  # torch_dtype of the original weights ("" when unknown)
    parameters: int
    active_parameters: int  # per token: all of a dense model, routed experts only for MoE
    disk_bytes: int
    compute_dtype: str  # what loading would compute in here (float32 on CPU)
    weights_bytes: int
    kv_cache_bytes: int  # keys and values of every layer at context_length tokens

    @property
    def memory_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memory_bytes": self.memory_bytes}


def parameter_counts(cfg: dict[str, Any]) -> tuple[int, int]:
    """(total, active per token) from the architecture's tensor shapes, whatever the storage."""
    from qwen3_chat.weights.verify import expected_shapes

    try:
        shapes = expected_shapes(cfg)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ModelLoadError(f"config.json: missing or bad field {e}") from None
    total = sum(math.prod(s) for s in shapes.values())
    experts, k = cfg.get("num_experts", 0), cfg.get("num_experts_per_tok", 0)
    routed = sum(math.prod(s) for n, s in shapes.items() if ".mlp.experts." in n)
    active = total - routed + (routed * k // experts if experts else 0)
    return total, active


def _tensor_bytes(path: Path, compute_bytes: int) -> int:
    """Bytes the stored tensors take once loaded: floats at the compute dtype, the rest as is."""
    from qwen3_chat.weights.verify import HeaderError, parse_header

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        try:
            header, _ = parse_header(f)
        except HeaderError as e:
            raise ModelLoadError(str(e)) from None
        for info in header.values():
            dtype = info.get("dtype", "F32")
            size = compute_bytes if dtype in FLOAT_DTYPES else DTYPE_BYTES.get(dtype, 4)
            total += math.prod(info.get("shape", [])) * size
    return total


def _compute_dtype() -> tuple[str, int]:
    """The loader's rule (float32 on CPU, bfloat16 on GPU): its one source, asked directly."""
    from qwen3_chat.weights.loader import default_dtype

    dtype = default_dtype()
    return str(dtype).rsplit(".", 1)[-1], dtype.size


def describe(name: str, path: Path) -> ModelInfo:
    """Describe the model folder `path` (reached as `name`) without loading its weights."""
    from qwen3_chat.models.config import ModelConfig

    path = Path(path)
    raw = read_config(path)
    if not raw:
        raise ModelLoadError(f"{path}: no readable config.json")
    cfg = ModelConfig.from_dict(raw)  # names an unsupported model_type or a missing field
    entry = registry_entry(name)
    if entry is not None:
        capability, context = entry.capability, entry.context_length
    else:
        from qwen3_chat.chat.tokenizer import Tokenizer
        from qwen3_chat.hub.open import guess_capability

        capability = guess_capability(Tokenizer.from_dir(path))
        context = cfg.max_position_embeddings
    total, active = parameter_counts(raw)
    dtype_name, dtype_bytes = _compute_dtype()
    bits = stored_bits(raw)
    experts = cfg.num_experts if cfg.is_moe else 0
    return ModelInfo(
        name=name, path=str(path),
        architecture=(raw.get("architectures") or [cfg.model_type])[0],
        model_type=cfg.model_type, kind="moe" if experts else "dense",
        layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        ffn_size=cfg.moe_intermediate_size if experts else cfg.intermediate_size,
        attention_heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, experts=experts,
        experts_per_token=cfg.num_experts_per_tok if experts else 0,
        capability=capability, context_length=context,
        quantization={"bits": bits, "group_size": cfg.quantization.get("group_size")}
        if bits and cfg.quantization else None,
        stored_dtype=str(raw.get("torch_dtype") or ""),
        parameters=total, active_parameters=active,
        disk_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        compute_dtype=dtype_name, weights_bytes=_tensor_bytes(path, dtype_bytes),
        kv_cache_bytes=2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
        * context * dtype_bytes,
    )  # fmt: skip
