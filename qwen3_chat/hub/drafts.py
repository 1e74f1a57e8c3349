"""Choosing a draft model for speculative decoding from the models on disk (no MLX).

A draft proposes token ids the target verifies, so it must read ids the same way (the same
vocabulary: Qwen3 dense and MoE share 151,936 tokens) and be attention-only (its rejected
drafts leave by trimming the KV cache). The hybrid family (Qwen3-Next, 3.5, ...) drafts with
its own MTP head instead, never a draft model. `choose_draft` is pure: the CLI gathers the
facts (`model_facts`, `drafts_on_disk`) and asks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3_chat.errors import Qwen3ChatError
from qwen3_chat.hub.info import parameter_counts
from qwen3_chat.hub.open import COMFORTABLE_SHARE, read_config, stored_bits
from qwen3_chat.hub.registry import ModelEntry
from qwen3_chat.models.config import BITS, ORIGINAL_BITS
from qwen3_chat.models.hybrid_config import HYBRID_MODEL_TYPES

# A draft at least this share of the target's size (active parameters) costs too much of
# a target step per drafted token to pay: refused.
MAX_SHARE = 1 / 4
# A draft this much smaller drafts 4 tokens in under half a target step; among several,
# the largest such (it agrees more often), else the smallest under MAX_SHARE. This gives
# Qwen3-0.6B for the 4B-14B models and Qwen3-1.7B for the 32B.
CHEAP_SHARE = 1 / 10
# --speculate auto drafts with a model only for targets this big (Qwen3-4B has 4.0B).
AUTO_MIN_PARAMETERS = 3.5e9
DENSE_TYPE = "qwen3"


@dataclass(frozen=True)
class ModelFacts:
    """What choosing a draft needs about one model copy: from its config.json, and the
    memory it needs at its bits (models.toml's estimate, as hub.open's default choice)."""

    name: str  # alias, repo id or folder: what `-m`/`--draft` takes
    model_type: str
    vocab_size: int
    parameters: int  # active per token (all of a dense model): what a step costs
    bits: int  # 16 = the original weights
    memory_bytes: int  # weights and a working cache

    @property
    def hybrid(self) -> bool:
        return self.model_type in HYBRID_MODEL_TYPES

    def label(self) -> str:
        kind = "original" if self.bits == ORIGINAL_BITS else f"{self.bits}-bit"
        return f"{self.name} ({kind}, {self.parameters / 1e9:.2g}B parameters)"


@dataclass(frozen=True)
class DraftChoice:
    draft: ModelFacts | None
    why: str  # the choice, or why there is none: one line for the user


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def model_facts(name: str, path: Path, bits: int | None = None,
                entry: ModelEntry | None = None) -> ModelFacts | None:  # fmt: skip
    """Facts about the folder `path` (reached as `name`); None when its config.json cannot
    say (the loader reports why when it is opened). Memory: models.toml's `memory_gb` when
    the entry has it at these bits, else the weights on disk (a lower bound)."""
    cfg = read_config(path)
    if not cfg:
        return None
    model_type = str(cfg.get("model_type", ""))
    try:  # a hybrid is never a draft nor drafted for: its size does not matter here
        active = 0 if model_type in HYBRID_MODEL_TYPES else parameter_counts(cfg)[1]
    except Qwen3ChatError:
        return None
    bits = bits or stored_bits(cfg) or ORIGINAL_BITS
    gb = entry.memory_gb.get(bits) if entry is not None else None
    return ModelFacts(
        name=name, model_type=model_type,
        vocab_size=int(cfg.get("vocab_size", 0)), parameters=active, bits=bits,
        memory_bytes=int(gb * 1e9) if gb is not None else _weights_bytes(path),
    )  # fmt: skip


def drafts_on_disk(entries: Iterable[ModelEntry], target: str = "") -> list[ModelFacts]:
    """Every verified copy on disk (each bits) of the dense registry models but `target`;
    nothing is downloaded, and a copy that fails its check is skipped."""
    from qwen3_chat.hub.download import converted_dir, find_local
    from qwen3_chat.hub.fetch import storage

    found = []
    for e in entries:
        if e.kind != "dense" or e.local is not None or e.alias == target:
            continue
        for bits in BITS:
            repo = e.repo_for(bits)
            there = storage(repo) if repo else converted_dir(e.repo, bits)
            if not there.is_dir():  # cheap: most models are not on disk
                continue
            try:
                local = find_local(e.alias, bits=bits)
            except Qwen3ChatError:
                continue
            facts = local and model_facts(e.alias, local.path, bits, e)
            if facts is not None:
                found.append(facts)
    return found


def draft_pays(target: ModelFacts, gpu: bool) -> bool:
    """Whether --speculate auto should draft with a model for `target`. Only on a GPU: on
    a CPU, verifying k drafts costs about k + 1 plain steps (measured on 2 cores: no wall
    gain), while on Apple GPUs a step is bound by reading the weights, so verifying k + 1
    positions costs about one step and drafts for 4B+ dense targets are the known win.
    MoE targets already step at the cost of their few active experts."""
    return gpu and target.model_type == DENSE_TYPE and target.parameters >= AUTO_MIN_PARAMETERS


def choose_draft(target: ModelFacts, on_disk: Sequence[ModelFacts],
                 memory: int | None) -> DraftChoice:  # fmt: skip
    """The best draft for `target` among `on_disk`, and why; `memory` is the machine's bytes
    (None: unknown, not checked). A draft must share the vocabulary, be dense Qwen3 and under
    MAX_SHARE of the target's size, and fit, with the target, in the share of memory a
    default model may use (hub.open.COMFORTABLE_SHARE). Preferred: the size (CHEAP_SHARE),
    then the target's bits, then fewer bits (a faster draft)."""
    if target.hybrid:
        return DraftChoice(None, f"{target.name} is a hybrid model: it drafts with its own MTP "
                                 "head (--speculate mtp), never a draft model")  # fmt: skip
    same = [d for d in on_disk if d.vocab_size == target.vocab_size
            and d.model_type == DENSE_TYPE and d.name != target.name]  # fmt: skip
    if not same:
        return DraftChoice(None, f"no dense Qwen3 model sharing {target.name}'s vocabulary "
                                 f"({target.vocab_size} tokens) is on disk (for Qwen3 "
                                 "models, `qwen3 download qwen3-0.6b` fetches one)")  # fmt: skip
    small = [d for d in same if d.parameters < MAX_SHARE * target.parameters]
    if not small:
        return DraftChoice(None, f"no model on disk sharing {target.name}'s vocabulary is under "
                                 f"a quarter of its size ({target.parameters / 1e9:.2g}B "
                                 "parameters)")  # fmt: skip
    room = None if memory is None else COMFORTABLE_SHARE * memory - target.memory_bytes
    fits = [d for d in small if room is None or d.memory_bytes <= room]
    if not fits:
        least = min(small, key=lambda d: d.memory_bytes)
        return DraftChoice(None, f"{least.label()} needs {least.memory_bytes / 1e9:.1f} GB; "
                                 f"{target.name} leaves {max(room or 0, 0) / 1e9:.1f} GB of "
                                 "this machine's memory")  # fmt: skip
    best = max(fits, key=lambda d: _preference(d, target))
    return DraftChoice(best, f"{best.label()} as the draft model for {target.name} "
                             "(--draft MODEL picks another)")  # fmt: skip


def _preference(d: ModelFacts, target: ModelFacts) -> tuple[Any, ...]:
    cheap = d.parameters <= CHEAP_SHARE * target.parameters
    return (cheap, d.parameters if cheap else -d.parameters, d.bits == target.bits, -d.bits)


def find_draft(name: str, path: Path, bits: int, *, auto: bool, gpu: bool) -> DraftChoice | None:
    """The draft for the loaded target `name` (folder `path`, weights at `bits`) from the
    models on disk. --speculate draft (`auto` False): always a choice, whose `why` says what
    is missing when it has no draft. auto: None unless a draft pays here and one is found."""
    from qwen3_chat.hub.open import machine_memory, registry_entry
    from qwen3_chat.hub.registry import load_registry

    if auto and not gpu:  # draft_pays says no whatever the target: read nothing
        return None
    entry = registry_entry(name)
    target = model_facts(name, path, bits, entry)
    if target is None:
        return None if auto else DraftChoice(None, f"{name}: no readable config.json")
    if auto and not draft_pays(target, gpu):
        return None
    on_disk = drafts_on_disk(load_registry().entries.values(), entry.alias if entry else name)
    choice = choose_draft(target, on_disk, machine_memory())
    return None if auto and choice.draft is None else choice
