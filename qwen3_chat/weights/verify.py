"""Check a downloaded model folder without loading it (no MLX needed).

huggingface_hub does not check content hashes, and a folder can be incomplete or hold the
wrong files, so after a download we check: every large file's sha256 against the Hub's
ETag, the config, the shard index, and each safetensors header against the config's shapes.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

from qwen3_chat.errors import DownloadError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
HEADER_LIMIT = 100 * 1024**2


def sha256_of(path: Path, chunk: int = 8 * 1024**2) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class HeaderError(ValueError):
    """A safetensors header that cannot be trusted; the message names file and tensor."""


def parse_header(path: Path) -> tuple[dict[str, Any], int]:
    """The tensors a safetensors file declares and the byte size they need (header included).

    Every entry is checked, so a malformed file fails here with a message that names it
    rather than deep inside a loader.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HeaderError(f"{path.name}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > HEADER_LIMIT:
                raise HeaderError(f"{path.name}: corrupt safetensors header")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{path.name}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path.name}: corrupt safetensors header")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise HeaderError(f"{path.name}: corrupt safetensors header entry for tensor {name}")
        end = max(end, offsets[1])
    return header, 8 + n + end


def read_header(path: Path) -> dict[str, Any]:
    """A downloaded file's header, after checking its size is exactly what it declares."""
    try:
        header, needed = parse_header(path)
    except HeaderError as e:
        raise DownloadError(str(e)) from None
    size = path.stat().st_size
    if needed != size:
        raise DownloadError(
            f"{path.name}: size {size} bytes does not add up to its header ({needed})"
        )
    return header


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes of an unquantized Qwen3 checkpoint."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    moe = cfg.get("model_type") == "qwen3_moe" and cfg.get("num_experts", 0) > 0
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
    }
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (nh * hd, h),
                   p + "self_attn.k_proj.weight": (nkv * hd, h),
                   p + "self_attn.v_proj.weight": (nkv * hd, h),
                   p + "self_attn.o_proj.weight": (h, nh * hd),
                   p + "self_attn.q_norm.weight": (hd,),
                   p + "self_attn.k_norm.weight": (hd,)}  # fmt: skip
        sparse = moe and i not in cfg.get("mlp_only_layers", []) and (
            (i + 1) % max(cfg.get("decoder_sparse_step", 1), 1) == 0
        )
        if sparse:
            mi = cfg["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                q = f"{p}mlp.experts.{e}."
                shapes |= {q + "gate_proj.weight": (mi, h), q + "up_proj.weight": (mi, h),
                           q + "down_proj.weight": (h, mi)}  # fmt: skip
        else:
            inter = cfg["intermediate_size"]
            shapes |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)}  # fmt: skip
    return shapes


def verify_model_dir(path: Path) -> None:
    """Raise DownloadError saying exactly what is wrong with the folder, if anything."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DownloadError(f"{path}: no config.json") from None
    except (OSError, ValueError) as e:
        raise DownloadError(f"config.json: not valid JSON ({e})") from None
    if cfg.get("model_type") not in ("qwen3", "qwen3_moe"):
        raise DownloadError(f"config.json: model_type {cfg.get('model_type')!r} is not qwen3")
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DownloadError(f"{index.name}: not a valid index") from None
        files = sorted(set(wmap.values()))
        missing = [f for f in files if not (path / Path(f).name).exists()]
        if missing:
            raise DownloadError(f"{index.name} lists {missing[0]}, which was not downloaded")
    else:
        wmap = None
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise DownloadError(f"{path}: no .safetensors weights")
    tensors: dict[str, tuple[str, list[int]]] = {}
    for name in files:
        for key, info in read_header(path / Path(name).name).items():
            tensors[key] = (name, info.get("shape"))
    if wmap is not None:
        for key, name in wmap.items():
            if tensors.get(key, (None,))[0] != name:
                raise DownloadError(f"{index.name}: tensor {key} is not in {name}")
    if cfg.get("quantization") or cfg.get("quantization_config"):
        return  # packed shapes: the loader validates them against the built model
    try:
        expected = expected_shapes(cfg)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise DownloadError(f"config.json: missing or bad field {e}") from None
    for key, shape in expected.items():
        if key not in tensors:
            raise DownloadError(f"missing tensor {key}")
        if tuple(tensors[key][1]) != shape:
            raise DownloadError(
                f"{tensors[key][0]}: tensor {key} has shape {tuple(tensors[key][1])}, "
                f"config.json says {shape}"
            )
