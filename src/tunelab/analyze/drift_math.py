"""The math of one key of `tunelab drift`: for N same-shape tensors (one per checkpoint), every
pair's squared distance and every model's squared norm, summed chunk by chunk from the
differences themselves:

    ‖θ_i − θ_j‖² = Σ (θ_i − θ_j)²     for every pair i < j
    ‖θ_i‖²       = Σ θ_i²              (the distance to a zero row appended to the N rows)

`torch.pdist` computes all of them over one cache-sized chunk in a single vectorised call, so the
N(N−1)/2 pairs cost one read of each file and little CPU (4 x SDXL fp16: ~14 s of one core, under
the time the disk needs to deliver the 27.75 GB; see benchmarks/RESULTS.md).

Precision. Each figure is a sum of non-negative terms, so nothing cancels, however close two
checkpoints are to each other and however far from the rest. float16 / bfloat16 weights are
widened to float32, which holds every difference of two such values exactly; float32 weights
are compared in float32 (their differences round once, at 6e-8); float64 stays float64. A chunk
(~100 k positions) is summed in float32 (relative error ~1e-6 measured on random weights), the
chunks in float64. The other figures come from these: cosines through
⟨a, b⟩ = (‖a‖² + ‖b‖² − ‖a − b‖²) / 2, good to ~1e-6 absolutely. (A Gram matrix X Xᵀ would be
cheaper on paper, but its distances G_ii + G_jj − 2 G_ij cancel: a float32 Gram of the deltas from
θ_0 is off by more than 100 % for two neighbouring steps of a long run (tested in
tests/analyze/test_drift.py), and the float64 one ran at half this speed.)

Sign agreement (asked for with `signs`) is counted exactly in the same pass from two more `pdist`
calls over the sign vectors s ∈ {−1, 0, 1} of the moves from the first row: Σ(s_i − s_j)² and
Σ(|s_i| − |s_j|)² give agree − disagree and the both-moved count (see `pair_sums`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Bytes of the float32 (N + 1, chunk) stage of `pair_sums` (see `chunk_elements`).
CHUNK_BYTES = 2 << 20


def chunk_elements(n_models: int) -> int:
    """Positions per chunk: the (N + 1, chunk) float32 stage stays ~1.5 MiB, inside the L2 cache."""
    return max(1 << 14, CHUNK_BYTES // (4 * (n_models + 1)))


def pair_sums(
    tensors: torch.Tensor | list[torch.Tensor], chunk: int | None = None, workers: ThreadPoolExecutor | None = None,
    signs: bool = False,
) -> tuple[np.ndarray, ...]:
    """(‖θ_i − θ_j‖² as an (N, N) matrix, ‖θ_i‖² as (N,)) for the rows of `tensors`, in float64.

    With `signs`, also (agree, both), two (N, N) count matrices over the moves from the first row,
    δ_i = θ_i − θ_0: `both[i, j]` counts the positions where δ_i and δ_j are both nonzero,
    `agree[i, j]` those of them where the two have the same sign (row and column 0 are zero: δ_0 = 0).

    `tensors`: an (N, numel) matrix (one row per model, any float dtype) or a list of same-shape
    tensors. With `workers`, large tensors are split in halves summed on two threads (torch releases
    the GIL inside its kernels). Memory: one (N + 1, chunk) stage per thread besides the inputs.
    """
    x = tensors if isinstance(tensors, torch.Tensor) else torch.stack([t.reshape(-1) for t in tensors])
    n, numel = x.shape
    chunk = chunk or chunk_elements(n)
    if workers is None or numel < 4 * chunk:
        sums = _pdist_span(x, 0, numel, chunk, signs)
    else:
        mid = (numel // 2) // chunk * chunk
        halves = [workers.submit(_pdist_span, x, 0, mid, chunk, signs),
                  workers.submit(_pdist_span, x, mid, numel, chunk, signs)]
        parts = [h.result() for h in halves]
        sums = [a + b for a, b in zip(*parts)]
    sq = _square(sums[0], n + 1)
    out = (sq[:n, :n], sq[:n, n].copy())  # row n is the zero vector: distances to it are the norms
    if not signs:
        return out
    # Sign rows a = 0..n-2 hold sign(δ_{a+1}), row n-1 is zero. With s ∈ {−1, 0, 1}:
    # Σ(s_a − s_b)² = nnz_a + nnz_b − 2⟨s_a, s_b⟩ and Σ(|s_a| − |s_b|)² = nnz_a + nnz_b − 2·both_ab.
    p, q = _square(sums[1], n), _square(sums[2], n)
    nnz = p[: n - 1, n - 1]
    dot = (nnz[:, None] + nnz[None, :] - p[: n - 1, : n - 1]) / 2.0  # agree − disagree
    both_ = (nnz[:, None] + nnz[None, :] - q[: n - 1, : n - 1]) / 2.0
    agree, both = np.zeros((n, n)), np.zeros((n, n))
    agree[1:, 1:] = (both_ + dot) / 2.0
    both[1:, 1:] = both_
    return (*out, agree, both)


def _square(condensed: torch.Tensor, rows: int) -> np.ndarray:
    """torch.pdist's condensed pairs as a symmetric (rows, rows) matrix with a zero diagonal."""
    i, j = torch.triu_indices(rows, rows, 1).numpy()
    m = np.zeros((rows, rows))
    m[i, j] = condensed.numpy()
    return m + m.T


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 holds every difference of two float16 / bfloat16 values exactly (and float32's to its
    own rounding); float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pdist_span(x: torch.Tensor, start: int, stop: int, chunk: int, signs: bool = False) -> list[torch.Tensor]:
    """Condensed pair sums (torch.pdist order) of the rows of x[:, start:stop] plus a zero row; with
    `signs`, also those of the sign rows of the moves from row 0 (plus a zero row) and of their
    absolute values. The sign sums are integers per chunk (< 2^24, exact in float32) and rounded."""
    n = x.shape[0]
    width = min(chunk, max(stop - start, 1))
    stage = torch.zeros(n + 1, width, dtype=compute_dtype(x.dtype))  # row n stays zero
    sums = [torch.zeros((n + 1) * n // 2, dtype=torch.float64)]
    if signs:
        sgn = torch.zeros(n, width, dtype=stage.dtype)  # row n - 1 stays zero
        sums += [torch.zeros(n * (n - 1) // 2, dtype=torch.float64) for _ in range(2)]
    for s in range(start, stop, width):
        e = min(stop, s + width)
        if e - s < width:
            stage[:n, e - s:] = 0.0  # the short last chunk: zeros add nothing
        stage[:n, : e - s].copy_(x[:, s:e])  # float16 -> float32 in vector code, exact
        sums[0] += torch.pdist(stage).double().square_()
        if signs and n > 1:
            moves = sgn[: n - 1]
            torch.sub(stage[1:n], stage[0], out=moves).sign_()
            sums[1] += torch.pdist(sgn).double().square_().round_()
            moves.abs_()
            sums[2] += torch.pdist(sgn).double().square_().round_()
    return sums
