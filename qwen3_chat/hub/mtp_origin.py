"""Which Hub repo a model folder was converted from, read from what the folder says about itself.

An MLX-community folder lacks the hybrid models' `mtp.*` head (mlx-lm's sanitize drops it), and
`hub.mtp_fetch` fetches it from the original. The original is named, in order of trust, by the
folder's model card (README.md: the `base_model:` of its YAML front matter, which mlx-lm's
`create_model_card` writes, and the "converted to MLX format from [Owner/Name](...)" line its
`upload_to_hub` adds), by the models.toml entry of the alias the user typed, or by the card
the Hub holds for a cached snapshot that came without one (our downloads skip README.md).
Nothing is guessed from a folder's or repo's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qwen3_chat.errors import Qwen3ChatError

CARD = "README.md"
CARD_LIMIT = 1024**2  # a model card is a few KB; a bigger README is not read
PROVENANCE = re.compile(r"converted\s+to\s+MLX\s+format\s+from\s+\[([^\]\s]+)\]", re.IGNORECASE)


@dataclass(frozen=True)
class Origin:
    """The original repo, or None with `why` saying what was looked at."""

    repo: str | None
    why: str  # where it was found ("its model card"), or why none was
    named: bool = True  # the source named something (right or wrong): no other is asked


def _front_matter(text: str) -> dict:
    """The YAML block that opens a model card ({} when absent or malformed)."""
    import yaml  # a dependency of huggingface_hub, which parses cards with it too

    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
        data = yaml.safe_load("\n".join(lines[1:end]))
    except (StopIteration, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def card_origin(text: str) -> Origin:
    """The original repo a model card names: `base_model` and the mlx-lm provenance line must
    agree when both are there; a list of several base models names none."""
    base = _front_matter(text).get("base_model")
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    named = {n for n in (base if isinstance(base, str) else None,
                         *PROVENANCE.findall(text)) if n}  # fmt: skip
    if not named:
        return Origin(None, "its model card names no base model", named=False)
    if len(named) > 1:
        return Origin(None, f"its model card names several originals ({', '.join(sorted(named))})")
    return _valid(named.pop(), "its model card")


def _valid(repo: str, where: str) -> Origin:
    from qwen3_chat.hub.download import validate_repo_id

    try:
        return Origin(validate_repo_id(repo.strip()), where)
    except Qwen3ChatError:
        return Origin(None, f"{where} names {repo[:80]!r}, which is not a Hub repo id")


def local_origin(folder: Path, name: str) -> Origin:
    """The original named on disk: the folder's card, else the models.toml entry of `name`."""
    card = Path(folder) / CARD
    if card.is_file() and card.stat().st_size <= CARD_LIMIT:
        found = card_origin(card.read_text(encoding="utf-8", errors="replace"))
        if found.named:  # a card that names something wrong is not overruled by another source
            return found
    from qwen3_chat.hub.open import registry_entry

    entry = registry_entry(name)
    if entry is not None and entry.local is None:
        return _valid(entry.repo, f"models.toml's entry for {name}")
    why = "it has no model card (README.md)" if not card.is_file() else "its model card names none"
    return Origin(None, why, named=False)


def remote_card(repo_id: str, commit: str) -> str | None:
    """The README.md of a cached snapshot's repo at that commit, from the Hub (None: it has
    none). Network errors propagate for the caller to phrase."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    r = get_session().get(hf_hub_url(repo_id, CARD, revision=commit), headers=build_hf_headers(),
                          follow_redirects=True)  # fmt: skip
    if r.status_code == 404:
        return None
    hf_raise_for_status(r)
    return r.content[:CARD_LIMIT].decode("utf-8", errors="replace")


def find_origin(folder: Path, name: str) -> Origin:
    """The original of `folder`: on disk first, then (online) the card the Hub holds for a
    cached snapshot without one."""
    from qwen3_chat.hub.fetch import cached_repo

    found = local_origin(folder, name)
    repo = cached_repo(folder)
    if found.repo is not None or repo is None or (Path(folder) / CARD).is_file():
        return found
    text = remote_card(repo, Path(folder).resolve().name)
    if text is None:
        return Origin(None, f"{repo} has no model card (README.md)")
    found = card_origin(text)
    return Origin(found.repo, f"{repo}'s model card" if found.repo else found.why)
