r"""Prompts for sampling: A1111 emphasis syntax, weighted SDXL conditioning, and prompt sources.

Hand-written here, because no library does it for SDXL with the foundation's chunking. What users
compare against is A1111 (v1.10), so each rule below is A1111's, from its own code:

- the emphasis parser (modules/prompt_parser.py, parse_prompt_attention): `(word)` = x1.1,
  `[word]` = /1.1, `(word:1.2)` = x1.2 (spaces allowed around the number), nesting multiplies;
  round and square brackets are counted apart (`([a)]` closes both); openers left
  unclosed apply to the rest of the prompt; a stray closer is text; `\(` `\)` `\[` `\]` `\\` are
  the literal characters and a lone backslash is dropped (`\m/` -> `m/`); `BREAK` (upper case,
  between word boundaries: `a-BREAK-b` too) ends a chunk. A break is the item ("BREAK", -1.0)
  exactly as A1111 marks it; a weighted word never is one, since its text is not BREAK, so
  `(x:-1)` is x at weight -1. Inside brackets A1111 multiplies the mark too, and the BREAK is then
  encoded as the word at that negative weight: we do the same;
- chunking (modules/sd_hijack_clip.py, tokenize_line): 75-token windows; when a window is full
  and its last comma lies at most `comma_backtrack` tokens back (A1111's "Prompt word wrap length
  limit", 20 by default), the words after that comma move to the next window; 0 cuts at exactly
  75 tokens, as kohya and tunelab's trainer do. Every BREAK closes the current window, even an
  empty one (a leading BREAK gives an empty first chunk, `a BREAK BREAK b` an empty middle one),
  and a trailing BREAK adds nothing;
- per-token weights aligned with the chunked ids (BOS/EOS/PAD weigh 1.0), and the A1111 way of
  applying them: multiply each chunk's hidden states by the weights, then rescale so the chunk's
  mean is what it was. One deliberate difference: A1111 takes that mean over the whole batch; we
  take it per prompt and chunk, so an image never depends on which prompts share its batch
  (identical for the usual batch of one);
- prompt and negative prompt are encoded apart, each with its own chunk count (A1111's default;
  its "Pad prompt/negative prompt" option, `pad_conds`, pads the shorter with empty-prompt
  chunks), and an empty negative prompt is all-zero context and pooled vectors
  (modules/sd_models_xl.py, get_learned_conditioning) unless `uncond="empty"`;
- clip skip: A1111 applies it to TE1 only (with its "Clip skip SDXL" setting; without it, A1111
  always uses the penultimate layer, tunelab's clip_skip 2); TE2 keeps its penultimate layer
  unless `clip_skip_te2` (ComfyUI's CLIPSetLastLayer and tunelab's trainer set both);
- prompt sources: inline lists, files, the empty prompt, and N prompts drawn (seeded) from a
  dataset index as tags, captions or the training caption mode.

Prompt editing, alternation and AND are parsed (prompt_schedule.py) and warned about, not applied.
Chunks are wrapped with `tunelab.models.text.wrap_chunk`, so padding per encoder (TE1 pads with
EOS, TE2 with "!") is the foundation's.
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
from tunelab.sample.prompt_schedule import warn_unsupported

log = logging.getLogger(__name__)

BREAK = "BREAK"
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for ( ) and [ ]
PENULTIMATE = 2  # clip_skip of SDXL's own layer choice
COMMA_BACKTRACK = 20  # A1111's default "Prompt word wrap length limit" (opts.comma_padding_backtrack)

# One lexical item of a prompt, in A1111's order: an escape (a lone backslash included), an opener,
# a weight that closes a round bracket ":1.2)", a closer, text, or a colon that is not a weight.
_LEX = re.compile(
    r"\\[()\[\]\\]?"
    r"|[(\[]"
    r"|:\s*([+-]?[.\d]+)\s*\)"
    r"|[)\]]"
    r"|[^\\()\[\]:]+"
    r"|:"
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")  # the surrounding spaces go with it

Segments = list[tuple[str, float]]  # (text, weight); a chunk break is (BREAK, -1.0)


# --- emphasis ---------------------------------------------------------------------------------------------


def parse_emphasis(text: str) -> Segments:
    """A1111 emphasis -> [(text, weight), ...] with runs of equal weight merged, as A1111 returns it.

    "a (b:1.5) [c]" -> [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)]; "a BREAK b" ->
    [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)].
    """
    items: list[list[Any]] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []  # where each unclosed "(" / "[" began in `items`
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in items[start:]:
            item[1] *= factor

    for m in _LEX.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            items.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(items))
        elif tok == "[":
            square_open.append(len(items))
        elif weight is not None and round_open:
            scale(round_open.pop(), _weight(weight, text))
        elif tok == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:  # text, a stray closer, a colon, or a weight without its "("
            for i, part in enumerate(_BREAK_WORD.split(tok)):
                if i:
                    items.append([BREAK, -1.0])
                items.append([part, 1.0])
    for start in round_open:  # unclosed openers apply to the rest, round ones first, as A1111
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    return _merge(items or [["", 1.0]])


def _weight(number: str, prompt: str) -> float:
    try:
        return float(number)
    except ValueError:  # the lexer takes any run of digits and dots, e.g. "1.2.3"
        raise TunelabError(f"prompt {prompt!r}: {number!r} in '(...:{number})' is not a number; write a weight "
                           "like (word:1.2)") from None


def _merge(items: list[list[Any]]) -> Segments:
    """Adjacent items of equal weight become one (empty texts included, as A1111 does)."""
    merged: list[list[Any]] = [list(items[0])]
    for text, weight in items[1:]:
        if merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(t, w) for t, w in merged]


def is_break(text: str, weight: float) -> bool:
    """A1111's chunk-break test on a parsed item."""
    return text == BREAK and weight == -1


# --- weighted chunks --------------------------------------------------------------------------------------


@dataclass
class WeightedChunks:
    ids: torch.Tensor  # (B, chunks, 77) int64
    weights: torch.Tensor  # (B, chunks, 77) float32; 1.0 on BOS/EOS/PAD
    truncated: list[int]  # tokens dropped per prompt because of max_chunks


def _windows(tokenizer: Any, segments: Segments, comma_backtrack: int) -> list[list[tuple[int, float]]]:
    """Token (id, weight) windows of at most 75, cut A1111's way (see the module docstring)."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")  # CLIP's comma (A1111's comma_token)
    comma = None if comma == tokenizer.unk_token_id else comma
    windows: list[list[tuple[int, float]]] = []
    window: list[tuple[int, float]] = []
    last_comma = -1  # position of the window's last comma; -1: none since the window began
    for text, weight in segments:
        if is_break(text, weight):
            windows.append(window)
            window, last_comma = [], -1
            continue
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if text else []
        for token in ids:
            if token == comma:
                last_comma = len(window)
            elif (comma_backtrack and len(window) == CHUNK_TOKENS and last_comma != -1
                  and len(window) - last_comma <= comma_backtrack):
                # full, and a comma close to the end: the words after it start the next window
                windows.append(window[:last_comma + 1])
                window, last_comma = window[last_comma + 1:], -1
            if len(window) == CHUNK_TOKENS:
                windows.append(window)
                window, last_comma = [], -1
            window.append((token, weight))
    if window or not windows:
        windows.append(window)
    return windows


def weighted_chunks(tokenizer: Any, prompts: Sequence[str], max_chunks: int = 3, n_chunks: int | None = None,
                    comma_backtrack: int = COMMA_BACKTRACK) -> WeightedChunks:
    """Tokenize A1111-syntax prompts into wrapped 75-token chunks with per-token weights.

    All prompts get the same number of chunks (the most any needs, capped at max_chunks, or
    n_chunks if given); shorter ones get empty chunks (BOS EOS PAD...), as A1111 does.
    comma_backtrack: A1111's comma back-off in tokens (0 = cut at exactly 75 tokens).
    """
    if max_chunks < 1:
        raise TunelabError(f"max_chunks must be >= 1 (1 = the classic 77-token limit), got {max_chunks}")
    if not 0 <= comma_backtrack < CHUNK_TOKENS:
        raise TunelabError(f"comma_backtrack must be 0..{CHUNK_TOKENS - 1} tokens (A1111's default 20; 0 = cut at "
                           f"exactly 75 tokens), got {comma_backtrack}")
    per_prompt = [_windows(tokenizer, parse_emphasis(p), comma_backtrack) for p in prompts]
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
    comma_backtrack: int = COMMA_BACKTRACK,
    clip_skip_te2: bool = False,
) -> Conditioning:
    """SDXL conditioning for A1111-syntax prompts: weighted context (B, 77*chunks, D1+D2) and
    TE2's pooled output of chunk 0 (unweighted, as A1111). clip_skip picks TE1's layer; TE2 reads
    its penultimate layer unless clip_skip_te2 (then clip_skip picks both)."""
    w1 = weighted_chunks(tokenizers[0], prompts, max_chunks, n_chunks, comma_backtrack)
    w2 = weighted_chunks(tokenizers[1], prompts, max_chunks, w1.ids.shape[1], comma_backtrack)
    te2_layer = clip_skip if clip_skip_te2 else PENULTIMATE
    h1, h2, pooled = encode_chunked(encoders, w1.ids, w2.ids, clip_skip, te2_layer)  # pooled stays unweighted, as A1111
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
    uncond: UncondMode = "zeros",
    max_chunks: int = 3,
    clip_skip: int = 2,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    pad_conds: bool = False,
    clip_skip_te2: bool = False,
) -> tuple[Conditioning, Conditioning]:
    """(positive, negative) conditioning of one image, A1111's way.

    Each is encoded on its own, so their chunk counts may differ (GuidedUNet then runs them in
    separate UNet calls, as A1111 does); pad_conds pads the shorter with chunks of the encoded
    empty prompt instead (A1111's "Pad prompt/negative prompt" option, infotext "Pad conds").
    uncond decides an empty negative prompt ("" exactly, A1111's test): "zeros" is all-zero context
    and pooled vectors (A1111's SDXL default; diffusers' `force_zeros_for_empty_prompt`), "empty"
    encodes the empty string (ComfyUI's empty negative).
    """
    if uncond not in ("empty", "zeros"):
        raise TunelabError(f"uncond must be 'zeros' (A1111) or 'empty' (encode the empty string), got {uncond!r}")
    warn_unsupported(prompt)
    warn_unsupported(negative, negative=True)
    text = dict(max_chunks=max_chunks, clip_skip=clip_skip, comma_backtrack=comma_backtrack, clip_skip_te2=clip_skip_te2)
    pos = encode_weighted(tokenizers, encoders, [prompt], **text)
    neg = encode_weighted(tokenizers, encoders, [negative], **text)
    if uncond == "zeros" and negative == "":
        neg = Conditioning(torch.zeros_like(neg.context), torch.zeros_like(neg.pooled), neg.n_chunks, [0])
    if pad_conds and pos.n_chunks != neg.n_chunks:
        empty = encode_weighted(tokenizers, encoders, [""], **text)
        pos, neg = _pad(pos, neg.n_chunks, empty), _pad(neg, pos.n_chunks, empty)
    return pos, neg


def _pad(cond: Conditioning, n_chunks: int, empty: Conditioning) -> Conditioning:
    """cond with empty-prompt chunks appended up to n_chunks (A1111's pad_cond_uncond)."""
    if cond.n_chunks >= n_chunks:
        return cond
    fill = empty.context.to(cond.context).repeat(1, n_chunks - cond.n_chunks, 1)  # (1, 77*k, D)
    return Conditioning(torch.cat([cond.context, fill], dim=1), cond.pooled, n_chunks, cond.truncated)


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
