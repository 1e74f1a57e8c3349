"""The model registry: `models.toml` (shipped) plus the user's own file, as typed entries."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_chat.engine.defaults import CAPABILITIES, HYBRID, MODES
from qwen3_chat.errors import Qwen3ChatError, RegistryError
from qwen3_chat.models.config import ORIGINAL_BITS, check_bits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN_FILE = Path(__file__).with_name("models.toml")  # a link to the repo's models.toml
DEMO_ALIAS = "demo"
KINDS = ("dense", "moe")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty")
# Entries without a `generation` (the April-2025 ones, most user entries) are Qwen3's first.
FIRST_GENERATION = "qwen3"
LOCAL_GENERATION = "local"  # `qwen3 models`: the built-in demo and converted folders
_GENERATION = re.compile(r"qwen(\d+(?:\.\d+)?)(-[a-z0-9.-]+)?")


def user_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "qwen3-chat" / "models.toml"


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    repo: str  # the original (bf16) weights on the Hugging Face Hub
    mlx: dict[int, str] = field(default_factory=dict)  # bits -> MLX-community repo
    kind: str = "dense"
    download_gb: dict[int, float] = field(default_factory=dict)
    memory_gb: dict[int, float] = field(default_factory=dict)
    context_length: int = 32768
    capability: str = HYBRID  # one of engine.defaults.CAPABILITIES
    sampling: dict[str, dict[str, float]] = field(default_factory=dict)  # mode -> params
    local: Path | None = None  # shipped inside the package (the demo), never downloaded
    generation: str = FIRST_GENERATION  # "qwen3", "qwen3-next", "qwen3.5", ...

    def repo_for(self, bits: int) -> str | None:
        """The repo to fetch for `bits` (16 = original); None if it must be converted."""
        return self.repo if bits == ORIGINAL_BITS else self.mlx.get(bits)


@dataclass
class Registry:
    default: str
    entries: dict[str, ModelEntry]
    # The user's models.toml names the default itself: it wins over the memory-based choice.
    default_explicit: bool = False
    # A broken user models.toml: reported for every alias but the built-in demo, which
    # needs no registry (so `-m demo` works while the file is being fixed).
    problem: RegistryError | None = None

    def get(self, alias: str) -> ModelEntry | None:
        if alias.lower() == DEMO_ALIAS:
            return self.entries.get(DEMO_ALIAS)
        self.check()
        return self.entries.get(alias.lower())

    def check(self) -> None:
        """Raise the user file's problem, if it has one."""
        if self.problem is not None:
            raise self.problem


def generation_rank(generation: str) -> tuple[float, int]:
    """Sort key, newer generations larger: qwen3 < qwen3-next < qwen3.5 < qwen3.6 < qwen3.8;
    a name in another pattern (a user's own) sorts before them all."""
    m = _GENERATION.fullmatch(generation)
    return (float(m.group(1)), 1 if m.group(2) else 0) if m else (-1.0, 0)


def _fail(source: Path, where: str, why: str) -> RegistryError:
    return RegistryError(f"{source}: {where}: {why}")


def _bits_map(source: Path, alias: str, key: str, value: Any, cast) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(source, f"models.{alias}.{key}", "must be a table keyed by bits")
    out = {}
    for k, v in value.items():
        try:
            bits = int(k)
            out[bits] = cast(v)
        except (TypeError, ValueError):
            raise _fail(source, f"models.{alias}.{key}", f"bad entry {k} = {v!r}") from None
        try:
            check_bits(bits)
        except Qwen3ChatError as e:
            raise _fail(source, f"models.{alias}.{key}", str(e)) from None
    return out


def _sampling(source: Path, where: str, value: Any, base: dict) -> dict[str, dict[str, float]]:
    out = {mode: dict(params) for mode, params in base.items()}
    if value is None:
        return out
    if not isinstance(value, dict):
        raise _fail(source, where, "sampling must be a table")
    for mode, params in value.items():
        if mode not in MODES or not isinstance(params, dict):
            raise _fail(source, f"{where}.{mode}", "expected [sampling.thinking|non_thinking]")
        for k, v in params.items():
            if k not in SAMPLING_KEYS or not isinstance(v, int | float):
                raise _fail(source, f"{where}.{mode}.{k}", f"unknown or non-numeric ({v!r})")
        out[mode] = {**out.get(mode, {}), **params}
    return out


def _entry(source: Path, alias: str, raw: Any, sampling: dict) -> ModelEntry:
    where = f"models.{alias}"
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be a table")
    repo = raw.get("repo")
    if not isinstance(repo, str) or repo.count("/") != 1:
        raise _fail(source, where, f"repo must be 'owner/name', not {repo!r}")
    mlx = _bits_map(source, alias, "mlx", raw.get("mlx"), str)
    for bits, name in mlx.items():
        if name.count("/") != 1:
            raise _fail(source, f"{where}.mlx", f"{bits}-bit repo must be 'owner/name'")
    capability = raw.get("thinking", HYBRID)
    if capability not in CAPABILITIES:
        raise _fail(source, where, f"thinking must be one of {', '.join(CAPABILITIES)}")
    kind = raw.get("kind", "dense")
    if kind not in KINDS:
        raise _fail(source, where, f"kind must be dense or moe, not {kind!r}")
    generation = raw.get("generation", FIRST_GENERATION)
    if not isinstance(generation, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", generation):
        raise _fail(source, where, f"generation must be a lowercase name such as qwen3.5, "
                                   f"not {generation!r}")  # fmt: skip
    context = raw.get("context_length", 32768)
    if not isinstance(context, int) or context <= 0:
        raise _fail(source, where, "context_length must be a positive integer")
    return ModelEntry(
        alias=alias.lower(),
        repo=repo,
        mlx=mlx,
        kind=kind,
        download_gb=_bits_map(source, alias, "download_gb", raw.get("download_gb"), float),
        memory_gb=_bits_map(source, alias, "memory_gb", raw.get("memory_gb"), float),
        context_length=context,
        capability=capability,
        sampling=_sampling(source, f"{where}.sampling", raw.get("sampling"), sampling),
        generation=generation,
    )


def parse(source: Path, data: dict, base: Registry | None = None) -> Registry:
    """Entries from one parsed file, layered over `base` (entries here win)."""
    sampling = _sampling(source, "sampling", data.get("sampling"), {})
    entries = dict(base.entries) if base else {}
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise _fail(source, "models", "must be a table of entries")
    for alias, raw in models.items():
        if alias.lower() == DEMO_ALIAS:
            raise _fail(source, f"models.{alias}", "'demo' is the built-in offline model")
        entries[alias.lower()] = _entry(source, alias, raw, sampling)
    default = data.get("default", base.default if base else None)
    if not isinstance(default, str) or (default.lower() not in entries and default != DEMO_ALIAS):
        raise _fail(source, "default", f"names no entry ({default!r})")
    explicit = base is not None and "default" in data  # a user's file that names one
    return Registry(default.lower(), entries, default_explicit=explicit)


def _read(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RegistryError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise RegistryError(f"{path}: cannot read ({e.strerror})") from None


def demo_entry() -> ModelEntry:
    from qwen3_chat.demo import DEMO_MODEL_DIR

    return ModelEntry(alias=DEMO_ALIAS, repo="qwen3-chat/demo", context_length=2048,
                      local=DEMO_MODEL_DIR, generation=LOCAL_GENERATION)  # fmt: skip


def load_registry(builtin: Path = BUILTIN_FILE, user: Path | None = None) -> Registry:
    registry = parse(builtin, _read(builtin))
    user = user or user_file()
    problem = None
    if user.exists():
        try:
            registry = parse(user, _read(user), registry)
        except RegistryError as e:
            problem = e
    registry.entries[DEMO_ALIAS] = demo_entry()
    registry.problem = problem
    return registry
