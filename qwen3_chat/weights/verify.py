"""Check a downloaded model folder without loading it (no MLX needed).

A folder can be incomplete or hold the wrong files even when every file matches its hash
(hub.fetch checks those), so before a download is used we check the config, the shard
index, and each safetensors header against the config's shapes.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen3_chat.errors import DownloadError, Qwen3ChatError
from qwen3_chat.files import read_json
from qwen3_chat.models import ALL_MODEL_TYPES
from qwen3_chat.models.config import expert_key, is_sparse_layer
from qwen3_chat.models.hybrid_config import HYBRID_MODEL_TYPES, HybridConfig

SHA256 = re.compile(r"^[0-9a-f]{64}$")
HEADER_LIMIT = 100 * 1024**2
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class HeaderError(ValueError):
    """A safetensors header that cannot be trusted; the message names file and tensor."""


def decode_header(read: Callable[[int, int], bytes], size: int,
                  name: str) -> tuple[dict[str, Any], int, int]:  # fmt: skip
    """The tensors a safetensors file of `size` bytes declares, where their data starts and
    how many bytes of it they need; `read(start, end)` gives the file's bytes [start, end)
    (a local file, or byte ranges of a file on the Hub).

    Every entry is checked, so a malformed file fails here with a message that names it
    rather than deep inside a loader.
    """
    head = read(0, 8) if size >= 8 else b""
    if len(head) < 8:
        raise HeaderError(f"{name}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > HEADER_LIMIT:
        raise HeaderError(f"{name}: corrupt safetensors header")
    try:
        header = json.loads(read(8, 8 + n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{name}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{name}: corrupt safetensors header")
    header.pop("__metadata__", None)
    end = 0
    for tensor, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise HeaderError(f"{name}: corrupt safetensors header entry for tensor {tensor}")
        end = max(end, offsets[1])
    return header, 8 + n, end


def parse_header(path: Path) -> tuple[dict[str, Any], int]:
    """The tensors a safetensors file declares and the byte size they need (header included)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:

            def read(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(end - start)

            header, data_start, data_bytes = decode_header(read, size, path.name)
    except OSError as e:
        raise HeaderError(f"{path.name}: unreadable safetensors header ({e})") from None
    return header, data_start + data_bytes


def shard_list(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder, and its weight map when sharded.

    The one reader of a folder's shard layout for the loader and the download check; a
    bad index or a shard name that points outside the folder raises HeaderError."""
    index = path / INDEX_FILE
    if not index.exists():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
                raise HeaderError(f"{path}: only pickle weights (.bin/.pt) found; "
                                  "qwen3-chat loads safetensors only")  # fmt: skip
            raise HeaderError(f"{path}: no .safetensors weights found")
        return files, None
    try:
        data = read_json(index)
    except Qwen3ChatError as e:
        raise HeaderError(str(e)) from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise HeaderError(f"{INDEX_FILE}: no weight_map")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise HeaderError(f"{INDEX_FILE}: weight_map must map tensor names to file names")
    names = sorted(set(wmap.values()))
    for name in names:
        # Shards must sit in this folder: no "../" or absolute paths from a downloaded index.
        if Path(name).name != name or name in (".", ".."):
            raise HeaderError(f"{INDEX_FILE}: bad shard name {name!r}")
        if not (path / name).exists():
            raise HeaderError(f"{INDEX_FILE} lists {name}, which is missing")
    return [path / n for n in names], wmap


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
        if cfg.get("model_type") == "qwen3_moe" and is_sparse_layer(cfg, i):
            mi = cfg["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                for proj, shape in (("gate_proj", (mi, h)), ("up_proj", (mi, h)),
                                    ("down_proj", (h, mi))):  # fmt: skip
                    shapes[expert_key(p + "mlp", e, proj)] = shape
        else:
            inter = cfg["intermediate_size"]
            shapes |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)}  # fmt: skip
    return shapes


def verify_model_dir(path: Path) -> None:
    """Raise DownloadError saying exactly what is wrong with the folder, if anything."""
    path = Path(path)
    cfg = read_json(path / "config.json", error=DownloadError)
    if not isinstance(cfg, dict) or cfg.get("model_type") not in ALL_MODEL_TYPES:
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise DownloadError(
            f"config.json: model_type {kind!r} is not one of {', '.join(ALL_MODEL_TYPES)}"
        )
    try:
        files, wmap = shard_list(path)
    except HeaderError as e:
        raise DownloadError(str(e)) from None
    tensors: dict[str, tuple[str, list[int]]] = {}
    for f in files:
        for key, info in read_header(f).items():
            tensors[key] = (f.name, info.get("shape"))
    if wmap is not None:
        for key, name in wmap.items():
            if tensors.get(key, (None,))[0] != name:
                raise DownloadError(f"{INDEX_FILE}: tensor {key} is not in {name}")
    if cfg.get("quantization") or cfg.get("quantization_config"):
        return  # packed shapes: the loader validates them against the built model
    if cfg["model_type"] in HYBRID_MODEL_TYPES:
        try:  # the config must parse; tensor shapes are checked against the built model
            HybridConfig.from_dict(cfg)
        except Qwen3ChatError as e:
            raise DownloadError(str(e)) from None
        return
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
