"""`tunelab data preview`: the prompts exactly as training will build them, with CLIP token counts.

Hand-written glue: prompts come from `captions.prompt_for` with the same (seed, epoch, row) the
training dataset uses; token counts come from the two tokenizers of `tunelab.models.text`; a
prompt is flagged when it needs more 75-token chunks than the run allows (it would be truncated).
`count_split_truncation` is the trainer's banner line: the same check over (a sample of) the split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


# --- the trainer's banner: how many prompts of the train split the run truncates ---------------------------


@dataclass(frozen=True)
class TruncationCount:
    """Prompts longer than max_chunks x 75 tokens among `checked` prompts of a split of `total`."""

    truncated: int
    checked: int
    total: int
    max_chunks: int

    def line(self) -> str:
        limit = f"max_chunks={self.max_chunks} ({self.max_chunks * 75} tokens)"
        where = (f"of all {self.checked:,} prompts" if self.checked == self.total
                 else f"of {self.checked:,} prompts sampled from {self.total:,}")
        fix = "; raise model.max_chunks to keep them (tunelab data preview shows them)" if self.truncated else ""
        return f"prompts: {self.truncated:,} {where} (train split, epoch 0) are longer than {limit}{fix}"


def count_split_truncation(index: IndexTable, rows: np.ndarray, captions: CaptionConfig, seed: int,
                           tokenizers: tuple, max_chunks: int, limit: int = 2000,
                           max_groups: int = 4) -> TruncationCount:
    """How many of `rows`' epoch-0 prompts (built as the training dataset builds them) the run
    would truncate. Up to `limit` rows are all counted; beyond that, a deterministic sample of
    `limit` rows spread evenly over `max_groups` Parquet row groups spread over the index (reading
    and tokenizing a 12 M-row split would take longer than the run's first hour)."""
    from tunelab.models.text import count_truncated

    sample = _sample_rows(index, np.asarray(rows, np.int64), limit, max_groups)
    recs = _text_of(index, sample)
    prompts = [prompt_for(r["tags"], r["caption"], captions, seed, 0, int(row)) for r, row in zip(recs, sample)]
    return TruncationCount(count_truncated(tokenizers, prompts, max_chunks), len(sample), len(rows), max_chunks)


def _row_groups(index: IndexTable) -> tuple[pq.ParquetFile, np.ndarray]:
    pf = pq.ParquetFile(index.path)
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    return pf, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (G + 1,) first row of each group


def _sample_rows(index: IndexTable, rows: np.ndarray, limit: int, max_groups: int) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    _, starts = _row_groups(index)
    groups = np.searchsorted(starts, rows, side="right") - 1
    present = np.unique(groups)
    chosen = present[np.unique(np.linspace(0, len(present) - 1, min(max_groups, len(present))).round().astype(int))]
    pool = rows[np.isin(groups, chosen)]
    return pool[np.unique(np.linspace(0, len(pool) - 1, min(limit, len(pool))).round().astype(np.int64))]


def _text_of(index: IndexTable, rows: np.ndarray) -> list[dict]:
    """Tags and captions of `rows`, reading only the row groups that hold them."""
    pf, starts = _row_groups(index)
    groups = np.searchsorted(starts, rows, side="right") - 1
    out: list[dict] = [{} for _ in range(len(rows))]
    for g in np.unique(groups):
        mine = np.flatnonzero(groups == g)
        table = pf.read_row_group(int(g), columns=["tags", "caption"])
        for i, rec in zip(mine, table.take(pa.array(rows[mine] - starts[g])).to_pylist()):
            out[i] = rec
    return out
