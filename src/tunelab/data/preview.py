"""`tunelab data preview`: the prompts exactly as training will build them, with CLIP token counts.

Hand-written glue: prompts come from `captions.prompt_for` with the same (seed, epoch, row) the
training dataset uses; token counts come from the two tokenizers of `tunelab.models.text`; a
prompt is flagged when it needs more 75-token chunks than the run allows (it would be truncated).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.data.captions import CaptionConfig, prompt_for
from tunelab.data.loader import IndexTable

log = logging.getLogger(__name__)


@dataclass
class PromptPreview:
    key: str
    prompt: str
    tokens: tuple[int, int]  # (TE1, TE2), without BOS/EOS
    chunks: int  # 75-token windows the longer count needs
    truncated: bool  # more chunks than max_chunks: the tail is cut


def preview_prompts(
    index: str | Path | IndexTable,
    captions: CaptionConfig,
    n: int = 8,
    seed: int = 0,
    epoch: int = 0,
    tokenizers: str | Path = "toy",
    max_chunks: int = 1,
    allow_download: bool = False,
) -> list[PromptPreview]:
    """`n` rows chosen with `seed`, their prompts for `epoch`, and the token counts."""
    from tunelab.models.text import chunks_needed, count_tokens, load_tokenizers

    table = index if isinstance(index, IndexTable) else IndexTable(index)
    rows = np.sort(np.random.default_rng(seed).choice(len(table), size=min(n, len(table)), replace=False))
    recs = table.records(rows)
    prompts = [prompt_for(r["tags"], r["caption"], captions, seed, epoch, int(row)) for r, row in zip(recs, rows)]
    tok1, tok2 = load_tokenizers(tokenizers, allow_download=allow_download)
    n1, n2 = count_tokens(tok1, prompts), count_tokens(tok2, prompts)
    out = []
    for rec, prompt, a, b in zip(recs, prompts, n1, n2):
        chunks = chunks_needed(max(a, b))
        out.append(PromptPreview(rec["key"], prompt, (a, b), chunks, chunks > max_chunks))
    return out


def preview_text(items: list[PromptPreview], max_chunks: int) -> str:
    lines = []
    for p in items:
        flag = f"TRUNCATED to {max_chunks * 75} tokens" if p.truncated else "fits"
        lines.append(f"{p.key}  [TE1 {p.tokens[0]} / TE2 {p.tokens[1]} tokens, {p.chunks} chunk(s), {flag}]")
        lines.append(f"  {p.prompt!r}")
    n_trunc = sum(p.truncated for p in items)
    lines.append(f"{n_trunc} of {len(items)} prompts exceed max_chunks={max_chunks} ({max_chunks * 75} tokens)")
    return "\n".join(lines)
