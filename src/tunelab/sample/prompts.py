"""Prompts for sampling: A1111 emphasis syntax, weighted SDXL conditioning, and prompt sources.

Hand-written here, because no library does it for SDXL with the foundation's chunking:

- the A1111 emphasis parser: `(word)` = x1.1, `[word]` = /1.1, `(word:1.2)` = x1.2, nesting
  multiplies, `\\(` escapes a bracket, unbalanced opening brackets still apply to the rest of the
  prompt, a stray closing bracket is literal text, and `BREAK` (upper case, a word of its own)
  starts a new 75-token chunk;
- per-token weights aligned with the chunked ids (BOS/EOS/PAD weigh 1.0), and the A1111 way of
  applying them: multiply each chunk's hidden states by the weights, then rescale so the chunk's
  mean is what it was. One deliberate difference: A1111 takes that mean over the whole batch; we
  take it per prompt and chunk, so an image never depends on which prompts share its batch
  (identical for the usual batch of one);
- prompt sources: inline lists, files, the empty prompt, and N prompts drawn (seeded) from a
  dataset index as tags, captions or the training caption mode.

Chunks are wrapped with `tunelab.models.text.wrap_chunk`, so padding per encoder (TE1 pads with
EOS, TE2 with "!") is the foundation's. The comma back-off A1111 uses when a chunk overflows is
not done: training (the foundation's chunking) does not do it either, and sampling should see
prompts cut the way training saw them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from tunelab.errors import TunelabError
from tunelab.models.text import CHUNK_TOKENS, Conditioning, encode_chunked, warn_truncated, wrap_chunk

log = logging.getLogger(__name__)

BREAK = "BREAK"
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for ( ) and [ ]

# One lexical item of a prompt: an escape, a weight closer ":1.2)", a bracket, BREAK, or plain text.
_LEX = re.compile(
    r"\\[\\()\[\]]"  # \( \) \[ \] \\ : literal characters
    r"|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)"  # explicit weight, closes a round bracket
    r"|[()\[\]]"
    r"|(?<![^\s,(\[])BREAK(?![^\s,)\]])"  # BREAK as a word of its own
    r"|[^\\()\[\]:B]+|.",
    re.S,
)

Segments = list[tuple[str, float]]  # (text, weight); weight None never occurs; BREAK is (BREAK, -1)


# --- emphasis ---------------------------------------------------------------------------------------------


def parse_emphasis(text: str) -> Segments:
    """A1111 emphasis -> [(text, weight), ...], adjacent equal weights merged; BREAK -> (BREAK, -1.0).

    "a (b:1.5) [c]" -> [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)].
    """
    out: list[list[Any]] = []  # [text, weight] pairs, mutable while brackets close
    stack: list[tuple[str, int]] = []  # (bracket, index into `out` where it opened)

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            if item[1] >= 0:
                item[1] *= factor

    for m in _LEX.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            out.append([tok[1], 1.0])
        elif weight is not None and stack and stack[-1][0] == "(":
            scale(stack.pop()[1], float(weight))
        elif tok in "([" and len(tok) == 1:
            stack.append((tok, len(out)))
        elif tok in (")", "]") and stack and stack[-1][0] == {")": "(", "]": "["}[tok]:
            scale(stack.pop()[1], ROUND if tok == ")" else SQUARE)
        elif tok == BREAK:
            out.append([BREAK, -1.0])
        else:
            out.append([tok, 1.0])  # includes stray closers and a weight without its "("
    for bracket, start in reversed(stack):  # unbalanced openers apply to the rest, as A1111
        scale(start, ROUND if bracket == "(" else SQUARE)
    return _merge(out)


def _merge(items: list[list[Any]]) -> Segments:
    merged: Segments = []
    for text, weight in items:
        if merged and weight >= 0 and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text or weight < 0:
            merged.append((text, weight))
    return merged or [("", 1.0)]


# --- weighted chunks --------------------------------------------------------------------------------------


@dataclass
class WeightedChunks:
    ids: torch.Tensor  # (B, chunks, 77) int64
    weights: torch.Tensor  # (B, chunks, 77) float32; 1.0 on BOS/EOS/PAD
    truncated: list[int]  # tokens dropped per prompt because of max_chunks


def _windows(tokenizer: Any, segments: Segments) -> list[list[tuple[int, float]]]:
    """Token (id, weight) windows of at most 75; BREAK closes the current window."""
    windows: list[list[tuple[int, float]]] = [[]]
    for text, weight in segments:
        if weight < 0:  # BREAK: start a new chunk (an empty one only if something came before)
            if windows[-1]:
                windows.append([])
            continue
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if text else []
        for i in ids:
            if len(windows[-1]) == CHUNK_TOKENS:
                windows.append([])
            windows[-1].append((i, weight))
    return windows


def weighted_chunks(tokenizer: Any, prompts: Sequence[str], max_chunks: int = 3, n_chunks: int | None = None) -> WeightedChunks:
    """Tokenize A1111-syntax prompts into wrapped 75-token chunks with per-token weights.

    All prompts get the same number of chunks (the most any needs, capped at max_chunks, or
    n_chunks if given); shorter ones get empty chunks (BOS EOS PAD...), as A1111 does.
    """
    if max_chunks < 1:
        raise TunelabError(f"max_chunks must be >= 1 (1 = the classic 77-token limit), got {max_chunks}")
    per_prompt = [_windows(tokenizer, parse_emphasis(p)) for p in prompts]
    count = n_chunks or min(max(len(w) for w in per_prompt), max_chunks)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, weights, truncated = [], [], []
    for windows in per_prompt:
        truncated.append(sum(len(w) for w in windows[count:]))
        windows = windows[:count] + [[] for _ in range(count - len(windows))]
        ids.append([wrap_chunk([i for i, _ in w], bos, eos, pad) for w in windows])
        # weights line up with wrap_chunk's layout: BOS, window, EOS, PAD...
        weights.append([[1.0, *(x for _, x in w), *[1.0] * (CHUNK_TOKENS + 1 - len(w))] for w in windows])
    return WeightedChunks(torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32), truncated)


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 weighting of one encoder's states: (B, chunks*77, D) x (B, chunks, 77) -> same shape.

    Each chunk is multiplied token-wise by its weights, then rescaled so its mean over tokens and
    features equals the unweighted mean (keeps the overall magnitude the UNet expects).
    """
    b, c, t = weights.shape
    h = hidden.reshape(b, c, t, -1).float()  # (B, chunks, 77, D)
    before = h.mean(dim=(2, 3), keepdim=True)
    h = h * weights.to(h.device)[..., None]
    after = h.mean(dim=(2, 3), keepdim=True)
    # An all-zero chunk (every token weighted 0) has no mean to restore; leave it zero.
    ratio = torch.where(after == 0, torch.ones_like(after), before / torch.where(after == 0, torch.ones_like(after), after))
    return (h * ratio).reshape(b, c * t, -1).to(hidden.dtype)


# --- encoding ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_weighted(
    tokenizers: tuple[Any, Any],
    encoders: tuple[torch.nn.Module, torch.nn.Module],
    prompts: Sequence[str],
    max_chunks: int = 3,
    clip_skip: int = 2,
    n_chunks: int | None = None,
) -> Conditioning:
    """SDXL conditioning for A1111-syntax prompts: weighted context (B, 77*chunks, D1+D2) and
    TE2's pooled output of chunk 0 (unweighted, as A1111)."""
    w1 = weighted_chunks(tokenizers[0], prompts, max_chunks, n_chunks)
    w2 = weighted_chunks(tokenizers[1], prompts, max_chunks, n_chunks=w1.ids.shape[1])
    h1, h2, pooled = encode_chunked(encoders, w1.ids, w2.ids, clip_skip)  # pooled stays unweighted, as A1111
    h1, h2 = apply_weights(h1, w1.weights), apply_weights(h2, w2.weights)
    truncated = [max(a, b) for a, b in zip(w1.truncated, w2.truncated)]
    warn_truncated(truncated, max_chunks)
    return Conditioning(torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled, w1.ids.shape[1], truncated)


UncondMode = Literal["empty", "zeros"]


def encode_pair(
    tokenizers: tuple[Any, Any],
    encoders: tuple[torch.nn.Module, torch.nn.Module],
    prompt: str,
    negative: str = "",
    uncond: UncondMode = "empty",
    max_chunks: int = 3,
    clip_skip: int = 2,
) -> tuple[Conditioning, Conditioning]:
    """(positive, negative) conditioning with the same number of chunks.

    uncond decides the unconditional branch when the negative prompt is empty: "empty" encodes the
    empty string (A1111), "zeros" uses all-zero context and pooled vectors (diffusers' SDXL
    `force_zeros_for_empty_prompt`, and what a model trained with zeroed dropout captions saw).
    """
    if uncond not in ("empty", "zeros"):
        raise TunelabError(f"uncond must be 'empty' or 'zeros', got {uncond!r}")
    both = encode_weighted(tokenizers, encoders, [prompt, negative], max_chunks, clip_skip)
    pos = Conditioning(both.context[:1], both.pooled[:1], both.n_chunks, both.truncated[:1])
    neg = Conditioning(both.context[1:], both.pooled[1:], both.n_chunks, both.truncated[1:])
    if uncond == "zeros" and not negative.strip():
        neg = Conditioning(torch.zeros_like(neg.context), torch.zeros_like(neg.pooled), neg.n_chunks, [0])
    return pos, neg


# --- prompt sources ---------------------------------------------------------------------------------------

IndexField = Literal["tags", "caption", "training"]


def prompts_from_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"prompt file {path} does not exist")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise TunelabError(f"prompt file {path} holds no prompts (one per line; # starts a comment)")
    return prompts


def prompts_from_index(
    index: str | Path,
    n: int,
    seed: int = 0,
    field: IndexField = "tags",
    captions: Any | None = None,
    split: str | None = None,
) -> list[str]:
    """N prompts drawn at random (seeded, without replacement) from a dataset index (Parquet).

    field: "tags" or "caption" as stored (a missing caption falls back to the tags), or
    "training": the prompt the trainer would build (`captions`, a CaptionConfig; epoch 0).
    split: keep only rows of that split (e.g. "holdout": prompts the model never trained on).
    """
    import numpy as np
    import pyarrow.parquet as pq

    if field not in ("tags", "caption", "training"):
        raise TunelabError(f"prompt field must be tags, caption or training, got {field!r}")
    path = Path(index)
    if not path.exists():
        raise TunelabError(f"dataset index {path} does not exist (build it with `tunelab data index`)")
    names = set(pq.read_schema(path).names)
    cols = [c for c in ("tags", "caption", "split") if c in names]
    table = pq.read_table(path, columns=cols).to_pydict()
    rows = range(len(table.get("tags", [])))
    if split is not None:
        rows = [i for i in rows if table.get("split", [None] * len(rows))[i] == split]
    rows = list(rows)
    if n < 1 or not rows:
        raise TunelabError(f"cannot draw {n} prompt(s) from {path}: it has {len(rows)} matching row(s)")
    picked = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    return [_index_prompt(table, rows[int(i)], field, captions, seed) for i in picked]


def _index_prompt(table: dict[str, list], row: int, field: str, captions: Any | None, seed: int) -> str:
    tags = table.get("tags", [None] * (row + 1))[row] or ""
    caption = table.get("caption", [None] * (row + 1))[row]
    if field == "tags":
        return tags
    if field == "caption":
        return caption or tags
    from tunelab.data.captions import CaptionConfig, prompt_for

    return prompt_for(tags, caption, captions or CaptionConfig(), seed, 0, row)


def gather_prompts(
    inline: Sequence[str] = (),
    file: str | Path | None = None,
    empty: bool = False,
    index: str | Path | None = None,
    n_from_index: int = 4,
    field: IndexField = "tags",
    seed: int = 0,
    split: str | None = None,
    captions: Any | None = None,
) -> list[str]:
    """All prompt sources in a fixed order: inline, file, the empty prompt, then index draws."""
    prompts = list(inline)
    if file is not None:
        prompts += prompts_from_file(file)
    if empty:
        prompts.append("")
    if index is not None:
        prompts += prompts_from_index(index, n_from_index, seed, field, captions, split)
    return prompts
