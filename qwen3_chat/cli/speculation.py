"""`qwen3 chat --speculate METHOD [--draft MODEL]`: the user's request, resolved for each model
the chat talks to, at the start and again after the REPL's `/model`, so speculation outlives
a switch (issue 10, section 5).

An explicit request that cannot work stops the start (one line, exit 2); after `/model` it
becomes one note and plain decoding. `auto` never stops the chat: a draft model it picked
from disk that does not load or does not fit is one note, and auto goes on without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from qwen3_chat.cli.usage import usage_exit
from qwen3_chat.errors import Qwen3ChatError


@dataclass
class SpeculationRequest:
    """What the user asked for; the REPL keeps it to resolve it again for another model."""

    method: str = "auto"  # one of engine.speculative.METHODS
    draft: str | None = None  # --draft MODEL
    bits: int | None = None  # --bits: a draft model is opened at the bits the target was
    distributed: bool = False  # --hosts: auto loads no draft model beside the cluster
    # The draft LoadedModel last opened: reused (not loaded again) while it fits the target.
    opened: Any = field(default=None, compare=False, repr=False)

    @property
    def auto(self) -> bool:
        return self.method == "auto"


def parse_request(method: str, draft: str | None, *, bits: int | None,
                  distributed: bool) -> SpeculationRequest:  # fmt: skip
    """--speculate/--draft checked before any model loads: a bad pair is a usage error."""
    from qwen3_chat.engine.speculative import SpeculationError, make_speculation

    try:
        make_speculation(method, draft)
    except SpeculationError as e:
        raise usage_exit(str(e)) from None
    return SpeculationRequest(method, draft, bits, distributed)


def on_gpu() -> bool:
    """Whether MLX computes on a GPU here: auto drafts with a model only there (draft_pays)."""
    import mlx.core as mx

    return mx.default_device() != mx.cpu


def resolve(request: SpeculationRequest, loaded: Any, *, strict: bool) -> tuple[Any, str | None]:
    """(Speculation or None, a note for the user) for `loaded` (a hub.open.LoadedModel).

    The note names a draft chosen from disk, or says why speculation is off. `strict` (the
    start): an explicit request that cannot work raises SpeculationError, or the
    Qwen3ChatError of a draft that does not load. Otherwise (a /model switch) it is
    (None, note). auto never raises: without its draft it is auto as if none was found."""
    from qwen3_chat.engine.speculative import (
        Speculation,
        SpeculationError,
        make_speculation,
    )

    spec = make_speculation(request.method, request.draft)
    if spec is None:
        return None, None
    draft, bits, note = request.draft, request.bits, None
    try:
        if spec.method == "mtp":
            _check_mtp(spec, loaded)
        if draft is None and (spec.method == "draft" or (spec.auto and not request.distributed)):
            from qwen3_chat.hub.drafts import find_draft

            choice = find_draft(loaded.name, loaded.path, loaded.bits, auto=spec.auto,
                                gpu=on_gpu())  # fmt: skip
            if choice is not None and choice.draft is None:
                raise SpeculationError(f"--speculate draft needs --draft MODEL: {choice.why}")
            if choice is not None and choice.draft is not None:
                draft, bits, note = choice.draft.name, choice.draft.bits, f"using {choice.why}"
                spec = Speculation("draft", auto=spec.auto)
        if spec.method == "draft":
            _use_draft(request, spec, draft, bits, loaded)
    except (SpeculationError, Qwen3ChatError) as e:
        if spec.auto:  # only a draft from disk can fail here
            return make_speculation("auto"), f"note: not drafting with {draft or 'a model'}: {e}"
        if strict:
            raise
        return None, f"speculation off for {loaded.name}: {e}"
    return spec, note


def _check_mtp(spec: Any, loaded: Any) -> None:
    """--speculate mtp: a hybrid model whose folder lacks the head (MLX-community conversions
    drop `mtp.*`) gets it from its original repo first; when it cannot, check_mtp's line
    says why. auto never comes here: it uses a head on disk only (a fetch is many GB)."""
    from qwen3_chat.engine.speculative import SpeculationError
    from qwen3_chat.hub.mtp_fetch import HeadUnavailable, attach_head
    from qwen3_chat.models.mtp import has_mtp

    why = None
    if not has_mtp(loaded.model) and hasattr(loaded.model, "mtp_weights"):
        try:
            attach_head(loaded.model, fetch_mtp_head(loaded.path, loaded.name))
        except HeadUnavailable as e:
            why = f"none was fetched: {e}"
    try:
        spec.check_mtp(loaded.model)
    except SpeculationError as e:
        raise SpeculationError(f"{e}; {why}" if why else str(e)) from None


def fetch_mtp_head(path: Path, name: str) -> Path:
    """The MTP head of the folder `path` fetched from its original repo by byte range (one
    note on stderr with its size, a bar on a terminal); HeadUnavailable when it cannot be."""
    from qwen3_chat.cli.models import human_size
    from qwen3_chat.hub.mtp_fetch import fetch_head, plan_head

    plan = plan_head(path, name)
    if plan.ready is None:
        size = human_size(plan.size)
        typer.echo(f"fetching the MTP head of {name} from {plan.origin} (named by "
                   f"{plan.found_by}): {size} of mtp.* tensors", err=True)  # fmt: skip
    return fetch_head(plan, progress=True)


def prefetch_mtp_head(path: Path, name: str) -> str:
    """`qwen3 download --mtp`: fetch the head ahead of `--speculate mtp`; returns what to say.
    A model that is not hybrid, or cannot have its head fetched, is a Qwen3ChatError."""
    from qwen3_chat.hub.mtp_fetch import HeadUnavailable, folder_has_head, head_file
    from qwen3_chat.hub.open import read_config
    from qwen3_chat.models.hybrid_config import HYBRID_MODEL_TYPES

    if read_config(path).get("model_type") not in HYBRID_MODEL_TYPES:
        raise Qwen3ChatError(f"--mtp: {name} is not a Qwen3-Next/3.5 model: it has no MTP head")
    if folder_has_head(path):
        return f"{name}: its MTP head is in its folder"
    head = head_file(path)
    if head is None:
        try:
            head = fetch_mtp_head(path, name)
        except HeadUnavailable as e:
            raise Qwen3ChatError(f"--mtp: no MTP head for {name}: {e}") from None
    return f"{name}: MTP head at {head}"


def _use_draft(request: SpeculationRequest, spec: Any, draft: str | None, bits: int | None,
               loaded: Any) -> None:  # fmt: skip
    """Draft with `draft`: the one already open when it is the same model, else open it."""
    from qwen3_chat.cli.hosts import open_chat_model

    kept = request.opened
    same = kept is not None and kept.name == draft and bits in (None, kept.bits)
    d = kept if same else open_chat_model(str(draft), bits=bits)
    spec.use_draft(d.model, d.tokenizer, loaded.model, loaded.tokenizer)
    request.opened = d


def start_speculation(request: SpeculationRequest, loaded: Any) -> Any:
    """`qwen3 chat`'s speculation for its first model: the note on stderr; an explicit
    request that cannot work is one line and exit 2 (a draft that does not load: exit 1)."""
    from qwen3_chat.engine.speculative import SpeculationError

    try:
        speculation, note = resolve(request, loaded, strict=True)
    except SpeculationError as e:
        raise usage_exit(str(e)) from None
    if note:
        typer.echo(note, err=True)
    return speculation
