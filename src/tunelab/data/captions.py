"""Turn an image's stored tags and caption into the prompt the model sees this epoch.

Hand-written because no library does the field's conventions: Danbooru-style comma-separated
tags (underscores kept by default, no quality tags added unless asked), the "dual caption"
modes (`pick`, `concat`, `tags`, `caption`), quality tags at a chosen position, tag shuffle that
keeps the first N tags, tag and caption dropout, `{a|b}` wildcards and multi-line caption files
with one line picked per sample.

Every random choice comes from a generator derived from (seed, epoch, sample index) — never from
global random state — so a resumed run, any number of dataloader workers, and a re-run all see
exactly the same prompt for the same sample in the same epoch.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

# Innermost `{...|...}` group: nested wildcards resolve from the inside out.
_WILDCARD = re.compile(r"\{([^{}]*\|[^{}]*)\}")


class CaptionConfig(BaseModel):
    """How stored tags/captions become prompts (`[data.captions]` in the run file)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["pick", "concat", "tags", "caption"] = Field(
        "tags",
        description="Which text to train on: tags, caption, pick one at random per sample, or concat both; "
        "a missing one always falls back to the other.",
    )
    concat_order: Literal["tags_first", "caption_first"] = Field(
        "tags_first", description="Order of the two parts in `concat` mode; change only to match how you will prompt."
    )
    pick_caption_probability: float = Field(
        0.5, ge=0.0, le=1.0, description="In `pick` mode, the chance a sample uses its caption instead of its tags."
    )
    quality_tags: str = Field(
        "", description="Tags like 'masterpiece, best quality' to add to every prompt; empty adds nothing."
    )
    quality_position: Literal["absent", "front", "back"] = Field(
        "absent",
        description="Where `quality_tags` go: absent (never added), front (NoobAI style) or back (Animagine style).",
    )
    underscores: Literal["keep", "to_space"] = Field(
        "keep", description="Danbooru tags keep underscores by default; use to_space if you will prompt with spaces."
    )
    dedupe_tags: bool = Field(True, description="Drop repeated tags (first occurrence wins); turn off only to debug.")
    shuffle_tags: bool = Field(
        False, description="Shuffle tag order per sample so the model does not learn a fixed order."
    )
    keep_tags: int = Field(
        0, ge=0, description="With shuffle/dropout, the first N tags (e.g. artist, character) stay in place, always."
    )
    tag_dropout: float = Field(
        0.0, ge=0.0, le=1.0, description="Chance each tag after the kept ones is dropped; 0.0-0.1 helps generalise."
    )
    caption_dropout: float = Field(
        0.0, ge=0.0, le=1.0, description="Chance a whole prompt becomes empty; raise (e.g. 0.05) to train unconditional CFG."
    )
    wildcards: bool = Field(True, description="Resolve `{a|b}` in stored text to one choice per sample.")


def sample_rng(seed: int, epoch: int, index: int, copy: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, sample index[, copy]): the determinism contract.
    `copy` ≥ 1 is a later copy of a repeated row (kohya folder repeats); copy 0 is the row itself."""
    entropy = [seed & 0xFFFFFFFF, epoch, index] + ([copy] if copy else [])
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def normalize_tags(text: str | None, underscores: str = "keep", dedupe: bool = True) -> list[str]:
    """Split comma-separated tags, strip blanks, apply the underscore policy, drop repeats."""
    if not text:
        return []
    tags = [t.strip() for t in text.replace("\n", ",").split(",")]
    tags = [t for t in tags if t]
    if underscores == "to_space":
        # Short tags such as `^_^` or `o_o` are emoticons: the underscore is part of the face.
        tags = [t if len(t) <= 3 else t.replace("_", " ") for t in tags]
    if dedupe:
        tags = list(dict.fromkeys(tags))
    return tags


def resolve_wildcards(text: str, rng: np.random.Generator) -> str:
    """Replace each `{a|b|c}` by one option, innermost groups first."""
    while True:
        match = _WILDCARD.search(text)
        if match is None:
            return text
        options = match.group(1).split("|")
        text = text[: match.start()] + options[int(rng.integers(len(options)))] + text[match.end() :]


def pick_caption_line(caption: str | None, rng: np.random.Generator) -> str | None:
    """Multi-line caption files hold alternatives: use one non-empty line per sample."""
    if caption is None:
        return None
    lines = [line.strip() for line in caption.splitlines() if line.strip()]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else lines[int(rng.integers(len(lines)))]


def _arrange_tags(tags: list[str], cfg: CaptionConfig, rng: np.random.Generator) -> list[str]:
    """Keep the first N, then drop and shuffle the rest."""
    kept, rest = tags[: cfg.keep_tags], tags[cfg.keep_tags :]
    if cfg.tag_dropout > 0 and rest:
        rest = [t for t, u in zip(rest, rng.random(len(rest))) if u >= cfg.tag_dropout]
    if cfg.shuffle_tags and len(rest) > 1:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    return kept + rest


def _choose_parts(tag_text: str, caption: str, cfg: CaptionConfig, rng: np.random.Generator) -> list[str]:
    """The dual-caption modes, each falling back to whichever text exists."""
    if not tag_text or not caption:
        return [tag_text or caption] if (tag_text or caption) else []
    if cfg.mode == "tags":
        return [tag_text]
    if cfg.mode == "caption":
        return [caption]
    if cfg.mode == "pick":
        return [caption] if rng.random() < cfg.pick_caption_probability else [tag_text]
    return [tag_text, caption] if cfg.concat_order == "tags_first" else [caption, tag_text]


def build_prompt(
    tags: str | None, caption: str | None, cfg: CaptionConfig, rng: np.random.Generator
) -> str:
    """The prompt for one sample. The draws happen in a fixed order so the result is reproducible.

    Order of draws: caption dropout, caption line, wildcards, tag dropout/shuffle, pick.
    """
    dropped = cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout
    line = pick_caption_line(caption, rng)
    if cfg.wildcards:
        tags = resolve_wildcards(tags, rng) if tags else tags
        line = resolve_wildcards(line, rng) if line else line
    if dropped:
        return ""
    tag_list = _arrange_tags(normalize_tags(tags, cfg.underscores, cfg.dedupe_tags), cfg, rng)
    parts = _choose_parts(", ".join(tag_list), line or "", cfg, rng)
    quality = ", ".join(normalize_tags(cfg.quality_tags, cfg.underscores, True))
    if quality and cfg.quality_position == "front":
        parts.insert(0, quality)
    elif quality and cfg.quality_position == "back":
        parts.append(quality)
    return ", ".join(p for p in parts if p)


def prompt_for(
    tags: str | None, caption: str | None, cfg: CaptionConfig, seed: int, epoch: int, index: int, copy: int = 0
) -> str:
    """`build_prompt` with the per-sample generator; what the dataset calls."""
    return build_prompt(tags, caption, cfg, sample_rng(seed, epoch, index, copy))
