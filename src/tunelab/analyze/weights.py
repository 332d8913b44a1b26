"""Weight drift: how far N checkpoints moved from each other, per component, UNet block and kind.

One pass over the files, key by key. For each key the N tensors (one per file, read straight from
the file at the header's offsets, never a whole model) give every pair's squared distance and every
model's squared norm, summed chunk by chunk from the differences themselves:

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

Why the tensors are read with `os.preadv` and not `safetensors.safe_open`: `safe_open` memory-maps
the file, and every page it touches stays resident in the process until the file is closed, so the
peak RSS of a one-pass scan grows to the size of all N files (measured: 2.5 GB peak RSS to scan a
2 GB file). Reading each tensor into its own buffer keeps memory at the key being compared plus at
most `READ_AHEAD_BYTES` (512 MiB) of later keys, read ahead on worker threads meanwhile. The
header is parsed and validated by `tunelab.models.safetensors_io.read_header`.

Everything per tensor reduces to two arrays (four with signs): `sq` (N x N squared distances, NaN for a pair that
was not compared) and `norm2` (N squared norms). Group figures are sums of those:

- distance  ‖Δ‖ = sqrt(Σ ‖θ_i − θ_j‖²) over the group's tensors that both models hold;
- relative  ‖θ_i − θ_j‖ / ‖θ_a‖, a = the one of i, j given first on the command line;
- cosine_models  cos(θ_i, θ_j) = (‖θ_i‖² + ‖θ_j‖² − ‖θ_i − θ_j‖²) / (2 ‖θ_i‖ ‖θ_j‖) — close to 1
  for any two finetunes of one base; shown for completeness;
- cosine_deltas  cos(θ_i − θ_0, θ_j − θ_0), θ_0 = the first model: do two finetunes (or two
  checkpoints) move the same way from where they started? Undefined (null) in row/column 0.
- sign_agreement (with `signs`)  of the positions where θ_i − θ_0 and θ_j − θ_0 are both nonzero,
  the share with the same sign. Counted exactly in the same pass from two more `pdist` calls over
  the sign vectors s ∈ {−1, 0, 1} of the moves: Σ(s_i − s_j)² and Σ(|s_i| − |s_j|)² give
  agree − disagree and the both-moved count (see `pair_sums`). Per tensor these are two more
  (N, N) count matrices, `agree` and `both`, summed like the rest.

Keys missing from some files, shape mismatches and non-finite values never stop the scan: the
affected pairs skip that tensor and the problem is listed. Grouping by component / block / kind
uses `tunelab.models.blocks`. Written by hand: no library computes streaming pairwise distances
over safetensors files.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import functools
import importlib
import json
import logging
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from tunelab.errors import TunelabError
from tunelab.models import blocks
from tunelab.models.safetensors_io import DTYPES, Header, TensorInfo, read_header

log = logging.getLogger(__name__)

# Bytes of the float32 (N + 1, chunk) stage of `pair_sums` (see `chunk_elements`).
CHUNK_BYTES = 2 << 20
# Tensor bytes read ahead of the comparison beyond the next key (bounds memory; see `_Reader`).
READ_AHEAD_BYTES = 512 << 20
# Bytes of compared keys' buffers kept for reuse by later keys of the same size (see `_Reader`).
SPARE_BYTES = 256 << 20
MAX_SPARES = 64
# A single read() on Linux returns at most ~2 GiB; larger tensors are read in pieces.
_MAX_READ = 1 << 30


@contextlib.contextmanager
def _one_compute_thread() -> Iterator[None]:
    """Each chunk's work is small (~100 µs); torch's intra-op threads would spend more in barriers
    than they save (measured for the earlier matrix-product form on the 2-core box: 13 ms against
    0.13 ms per call). Reads overlap on their own threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class TensorDrift:
    """One key across the N models."""

    key: str
    shape: tuple[int, ...]
    sq: np.ndarray  # (N, N) squared L2 distance; NaN where the pair was not compared
    norm2: np.ndarray  # (N,) squared L2 norm; NaN where the model's tensor was not usable
    # With signs (see `pair_sums`): counts over the moves from model 0; NaN where not computed.
    agree: np.ndarray | None = None  # (N, N) positions where both moved, the same way
    both: np.ndarray | None = None  # (N, N) positions where both moved

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def component(self) -> str:
        return blocks.component_of(self.key)

    @property
    def block(self) -> str | None:
        return blocks.unet_block_of(self.key)

    @property
    def kind(self) -> str | None:
        # Kinds are the UNet's (attn1 / attn2 / rest); other components have no kind row.
        return blocks.kind_of(self.key) if self.component == "unet" else None


@dataclass
class Problems:
    """Everything that made a tensor skip some pairs; listed in the output, never fatal."""

    missing: list[dict] = field(default_factory=list)  # {"key", "missing_in": [model, ...]}
    shape_mismatch: list[dict] = field(default_factory=list)  # {"key", "shapes": {model: shape}}
    non_finite: list[dict] = field(default_factory=list)  # {"key", "model", "count"}

    def count(self) -> int:
        return len(self.missing) + len(self.shape_mismatch) + len(self.non_finite)

    def as_dict(self) -> dict[str, list[dict]]:
        return {"missing": self.missing, "shape_mismatch": self.shape_mismatch, "non_finite": self.non_finite}


@dataclass
class DriftScan:
    """The result of one pass: per-tensor figures for every key of any file."""

    models: list[str]  # display names, in command-line order
    paths: list[Path]
    tensors: list[TensorDrift]
    problems: Problems
    bytes_read: int = 0
    signs: bool = False  # whether sign agreement was counted


# --- the math of one key -----------------------------------------------------------------------------


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


def _non_finite_count(t: torch.Tensor) -> int:
    if not t.dtype.is_floating_point:
        return 0
    return int(t.numel() - torch.isfinite(t).sum().item())


def compare_key(
    key: str, tensors: list[torch.Tensor | None], models: list[str], problems: Problems,
    stacked: torch.Tensor | None = None, workers: ThreadPoolExecutor | None = None, signs: bool = False,
) -> TensorDrift:
    """Per-tensor squared distances and norms for one key; problems are appended, never raised.

    `stacked`: the same N tensors as one (N, numel) matrix when the reader could load them so
    (every file holds the key with one shape and dtype), which spares a copy.
    """
    n = len(tensors)
    present = [i for i, t in enumerate(tensors) if t is not None]
    if len(present) < n:
        problems.missing.append({"key": key, "missing_in": [models[i] for i in range(n) if tensors[i] is None]})
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in present:
        by_shape.setdefault(tuple(tensors[i].shape), []).append(i)
    if len(by_shape) > 1:
        problems.shape_mismatch.append({"key": key, "shapes": {models[i]: list(tensors[i].shape) for i in present}})
    out = {"sq": np.full((n, n), np.nan), "norm2": np.full(n, np.nan)}
    if signs:
        out |= {"agree": np.full((n, n), np.nan), "both": np.full((n, n), np.nan)}
    for members in by_shape.values():
        x = stacked if stacked is not None and len(members) == n else _stack(tensors, members)
        _compare_members(key, x, tensors, members, models, problems, out, workers)
    # The reported shape is the first file's (or the first holder's) shape.
    shape = tuple(tensors[present[0]].shape) if present else ()
    return TensorDrift(key, shape, **out)


def _stack(tensors: list[torch.Tensor | None], members: list[int]) -> torch.Tensor:
    rows = [tensors[i].reshape(-1) for i in members]
    # Mixed dtypes meet in the wider one (fp16 and bf16 in float32), which holds both exactly.
    common = functools.reduce(torch.promote_types, (r.dtype for r in rows))
    return torch.stack([r.to(common) for r in rows])


def _compare_members(
    key: str,
    x: torch.Tensor,
    tensors: list[torch.Tensor | None],
    members: list[int],
    models: list[str],
    problems: Problems,
    out: dict[str, np.ndarray],
    workers: ThreadPoolExecutor | None,
) -> None:
    """Fill `out`'s matrices (`sq`, `norm2`, and `agree` / `both` if present) for the models in
    `members` (rows of `x`); drop non-finite ones first. Sign counts are relative to model 0, so
    they are filled only where model 0 is among the members."""
    signs = "agree" in out and members[0] == 0
    sums = pair_sums(x, workers=workers, signs=signs)
    s, nn = sums[:2]
    if not (np.isfinite(s).all() and np.isfinite(nn).all()):
        # Rare: find the culprits (one extra pass over this key only) and compare the rest.
        finite = []
        for i in members:
            bad = _non_finite_count(tensors[i])
            if bad:
                problems.non_finite.append({"key": key, "model": models[i], "count": bad})
            else:
                finite.append(i)
        members = finite
        if not members:
            return
        # Finite values whose squares overflow float32 (|w| > ~1e19) still fit float64.
        signs = "agree" in out and members[0] == 0
        sums = pair_sums(_stack(tensors, members).double(), workers=workers, signs=signs)
        s, nn = sums[:2]
        if not (np.isfinite(s).all() and np.isfinite(nn).all()):
            problems.non_finite.append({"key": key, "model": "(overflow in float64)", "count": 0})
            return
    idx = np.ix_(members, members)
    out["sq"][idx] = s
    out["norm2"][np.asarray(members)] = nn
    if signs:
        out["agree"][idx], out["both"][idx] = sums[2], sums[3]


# --- reading -------------------------------------------------------------------------------------------


def _read_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + _MAX_READ]], offset + done)
        if got <= 0:
            raise TunelabError(f"{path}: file ended early while reading tensor data (truncated?)")
        done += got


def read_tensor(fd: int, header: Header, info: TensorInfo, path: Path, into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor from an open file, into a fresh buffer or the uint8 row `into` (no memory map)."""
    dtype, _ = DTYPES[info.dtype]
    raw = torch.empty(info.end - info.begin, dtype=torch.uint8) if into is None else into
    if raw.numel():
        _read_exact(fd, memoryview(raw.numpy()), header.data_start + info.begin, path)
    # safetensors data is little-endian, as is every platform torch ships for.
    return raw.view(dtype).reshape(info.shape)


def key_order(headers: list[Header]) -> list[str]:
    """Every key of any file: the first file's keys in on-disk order (sequential reads), then the
    keys only later files hold, in their on-disk order."""
    seen: set[str] = set()
    order: list[str] = []
    for h in headers:
        for k, _ in sorted(h.tensors.items(), key=lambda kv: kv[1].begin):
            if k not in seen:
                seen.add(k)
                order.append(k)
    return order


class _Reader:
    """Reads tensors on worker threads ahead of the comparison: always the next key, and further
    keys while the bytes in flight stay under `READ_AHEAD_BYTES`, so the disk keeps streaming while
    a large key computes and a run of small keys does not stall on per-read latency.

    Buffers of keys already compared are reused for later keys of the same size (up to
    `SPARE_BYTES` kept): a fresh buffer costs a page fault and a kernel zero-fill per 4 KiB, which
    measured as more system time than the reads themselves. So a key's tensors are valid only until
    `iterate` is asked for the next key.
    """

    def __init__(self, paths: list[Path], headers: list[Header]) -> None:
        self.paths, self.headers = paths, headers
        self.fds = [os.open(p, os.O_RDONLY) for p in paths]
        self.pool = ThreadPoolExecutor(max_workers=min(len(paths), 4), thread_name_prefix="drift-read")
        self.spare: collections.deque[torch.Tensor] = collections.deque()
        self.spare_bytes = 0

    def key_bytes(self, key: str) -> int:
        return sum(h.tensors[key].end - h.tensors[key].begin for h in self.headers if key in h.tensors)

    def _rows(self, n: int, nbytes: int) -> torch.Tensor:
        """An (n, nbytes) uint8 buffer: the front of the smallest spare that holds it (and is not
        more than twice too big, so small keys do not pin large buffers), else a new one."""
        need = n * nbytes
        fits = [i for i, b in enumerate(self.spare) if need <= b.numel() <= 2 * need]
        if not fits:
            return torch.empty(need, dtype=torch.uint8).view(n, nbytes)
        best = min(fits, key=lambda i: self.spare[i].numel())
        buf = self.spare[best]
        del self.spare[best]  # by position: deque.remove would compare tensors elementwise
        self.spare_bytes -= buf.numel()
        return buf[:need].view(n, nbytes)

    def _give_back(self, rows: torch.Tensor | None) -> None:
        if rows is None or rows.numel() == 0:
            return
        # Keep the whole allocation (rows may be the front of a larger spare), flat.
        whole = torch.empty(0, dtype=torch.uint8).set_(rows.untyped_storage())
        self.spare.append(whole)
        self.spare_bytes += whole.numel()
        # Oldest first; a count cap keeps the search in `_rows` short when keys are small.
        while self.spare_bytes > SPARE_BYTES or len(self.spare) > MAX_SPARES:
            self.spare_bytes -= self.spare.popleft().numel()

    def submit(self, key: str) -> tuple[list[Future | None], torch.Tensor | None, torch.Tensor | None]:
        """Start reading `key` from every file holding it. When all files hold it with one shape and
        dtype, the rows of one (N, bytes) buffer receive them, so the comparison needs no stacking.
        Returns (futures, that buffer viewed as (N, numel) of the dtype, the raw buffer)."""
        infos = [h.tensors.get(key) for h in self.headers]
        uniform = all(i is not None and (i.dtype, i.shape) == (infos[0].dtype, infos[0].shape) for i in infos)
        rows = self._rows(len(infos), infos[0].end - infos[0].begin) if uniform else None
        futures: list[Future | None] = []
        for n, (fd, h, p, info) in enumerate(zip(self.fds, self.headers, self.paths, infos)):
            into = rows[n] if rows is not None else None
            futures.append(None if info is None else self.pool.submit(read_tensor, fd, h, info, p, into))
        stacked = rows.view(DTYPES[infos[0].dtype][0]) if rows is not None and rows.shape[1] else None
        return futures, stacked, rows

    def iterate(self, keys: list[str]) -> Iterator[tuple[str, list[torch.Tensor | None], torch.Tensor | None]]:
        pending: collections.deque = collections.deque()  # (key, futures, stacked, rows, bytes)
        nxt, in_flight = 0, 0
        for _ in keys:
            while nxt < len(keys) and (len(pending) < 2 or in_flight + self.key_bytes(keys[nxt]) <= READ_AHEAD_BYTES):
                size = self.key_bytes(keys[nxt])
                pending.append((keys[nxt], *self.submit(keys[nxt]), size))
                in_flight += size
                nxt += 1
            key, futures, stacked, rows, size = pending.popleft()
            loaded = [None if f is None else f.result() for f in futures]
            del futures  # the futures hold the tensors too; let them go with `loaded`
            in_flight -= size
            yield key, loaded, stacked
            del loaded, stacked  # before more reads are submitted: memory stays within the budget
            self._give_back(rows)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for fd in self.fds:
            os.close(fd)


# --- the scan ------------------------------------------------------------------------------------------


def model_names(paths: list[Path]) -> list[str]:
    """File names for display; the paths as given where two files share a name."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def open_checkpoints(paths: Iterable[str | Path]) -> tuple[list[Path], list[Header]]:
    """Validate the inputs before any heavy work: at least two files, each a readable safetensors."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise TunelabError(f"drift compares checkpoints: give at least 2 .safetensors files (got {len(paths)})")
    for p in paths:
        if not p.exists():
            raise TunelabError(f"{p}: no such file")
        if p.is_dir():
            raise TunelabError(f"{p}: is a folder; give the single-file .safetensors checkpoint inside it")
    return paths, [read_header(p) for p in paths]


def scan(paths: Iterable[str | Path], progress: bool = True, compute_threads: int = 1,
         signs: bool = False) -> DriftScan:
    """Compare N checkpoints key by key in one read pass; see the module docstring for the math.

    `signs`: also count, for every pair of models, where their moves from model 0 share a sign
    (`sign_agreement` in the report). It about doubles the maths (on 2 cores the scan becomes
    CPU-bound), so it is asked for, not default.

    `compute_threads`: 2 splits each large tensor's sums over two threads. Off by default: on 2
    cores one is busy with the reads' system time, and the split measured slower (4 x SDXL: 33.1 s
    against 29.8 s); worth trying with a fast disk and idle cores."""
    paths, headers = open_checkpoints(paths)
    models = model_names(paths)
    keys = key_order(headers)
    total = sum(h.tensors[k].end - h.tensors[k].begin for h in headers for k in h.tensors)
    log.info("drift: %d models, %d keys, %.2f GB to read", len(paths), len(keys), total / 1e9)
    problems, tensors = Problems(), []
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(contextlib.closing(_Reader(paths, headers)))
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc="drift",
                                       disable=not progress, leave=False))
        workers = (stack.enter_context(ThreadPoolExecutor(max_workers=2, thread_name_prefix="drift-gram"))
                   if compute_threads > 1 else None)
        stack.enter_context(_one_compute_thread())
        for key, loaded, stacked in reader.iterate(keys):
            tensors.append(compare_key(key, loaded, models, problems, stacked, workers, signs))
            bar.update(sum(t.numel() * t.element_size() for t in loaded if t is not None))
            del loaded, stacked  # release this key's buffers before the next one arrives
    if problems.count():
        log.warning("drift: %d problem(s) (missing keys, shape mismatches, non-finite values); "
                    "see `problems` in the JSON", problems.count())
    return DriftScan(models, paths, tensors, problems, total, signs)


# --- grouping ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupDrift:
    """Sums over the tensors of one group (a component, a UNet block, a kind, or everything).

    Every array may carry leading dimensions: `tensor_figures` keeps one (N, N) matrix per tensor
    in a (T, N, N) stack instead of summing, and the same formulas below apply to each."""

    name: str
    n_tensors: int
    d2: np.ndarray  # (N, N) Σ ‖θ_i − θ_j‖² over tensors both models hold
    n2: np.ndarray  # (N, N) n2[i, j] = Σ ‖θ_i‖² over those same tensors
    compared: np.ndarray  # (N, N) how many tensors each pair compared
    dd: np.ndarray  # (N, N) Σ ⟨θ_i − θ_0, θ_j − θ_0⟩ over tensors that models 0, i and j hold
    dn: np.ndarray  # (N, N) dn[i, j] = Σ ‖θ_i − θ_0‖² over those same tensors
    agree: np.ndarray | None = None  # (N, N) Σ positions where θ_i − θ_0 and θ_j − θ_0 moved the same way
    both: np.ndarray | None = None  # (N, N) Σ positions where both moved

    def distance(self) -> np.ndarray:
        """L2 distances; NaN for a pair that shared no tensor."""
        out = np.sqrt(self.d2)
        out[self.compared == 0] = np.nan
        diag = np.arange(out.shape[-1])
        out[..., diag, diag] = 0.0
        return out

    def relative(self) -> np.ndarray:
        """‖θ_i − θ_j‖ / ‖θ_a‖ with a = min(i, j): relative to the model given first."""
        n = self.n2.shape[-1]
        upper = np.triu(np.ones((n, n), dtype=bool))
        first = np.where(upper, self.n2, _t(self.n2))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(first > 0, self.distance() / np.sqrt(first), np.nan)

    def cosine_models(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = 2.0 * np.sqrt(self.n2 * _t(self.n2))
            out = np.where(denom > 0, (self.n2 + _t(self.n2) - self.d2) / denom, np.nan)
        out[self.compared == 0] = np.nan
        return np.clip(out, -1.0, 1.0)

    def cosine_deltas(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = np.sqrt(self.dn * _t(self.dn))
            out = np.where(denom > 0, self.dd / denom, np.nan)
        return np.clip(_no_row_0(out), -1.0, 1.0)  # θ_0 − θ_0 = 0 has no direction

    def sign_agreement(self) -> np.ndarray:
        """Of the positions where both i and j moved away from model 0, the share where they moved
        the same way: 0.5 for unrelated moves, 1 for moves in one direction. NaN in row/column 0
        and where nothing was counted."""
        if self.agree is None:
            return np.full(self.d2.shape, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            return _no_row_0(np.where(self.both > 0, self.agree / self.both, np.nan))


def _t(m: np.ndarray) -> np.ndarray:
    """Transpose of the last two axes (of one matrix or of a stack)."""
    return np.swapaxes(m, -1, -2)


def _no_row_0(m: np.ndarray) -> np.ndarray:
    m[..., 0, :] = np.nan
    m[..., :, 0] = np.nan
    return m


def group(name: str, tensors: list[TensorDrift], n: int) -> GroupDrift:
    """Sum the per-tensor figures of `tensors` (vectorised over tensors)."""
    if not tensors:
        z = np.zeros((n, n))
        return GroupDrift(name, 0, z, z, z.astype(int), z, z)
    terms = _per_tensor(tensors)
    return GroupDrift(name, len(tensors), *(None if a is None else a.sum(0) for a in terms))


def _per_tensor(tensors: list[TensorDrift]) -> tuple[np.ndarray | None, ...]:
    """GroupDrift's fields (after name and count) for each tensor alone, as (T, N, N) stacks."""
    sq = np.stack([t.sq for t in tensors])  # (T, N, N)
    norm2 = np.stack([t.norm2 for t in tensors])  # (T, N)
    ok = np.isfinite(sq)
    d2 = np.where(ok, sq, 0.0)
    n2 = np.where(ok, np.nan_to_num(norm2)[:, :, None], 0.0)
    # Deltas against model 0 from distances alone: ⟨d_i, d_j⟩ = (‖d_i‖² + ‖d_j‖² − ‖d_i − d_j‖²) / 2.
    s0 = np.nan_to_num(sq[:, 0, :])  # (T, N) ‖θ_i − θ_0‖²
    ok3 = ok & ok[:, 0, :, None] & ok[:, 0, None, :]
    inner = (s0[:, :, None] + s0[:, None, :] - np.nan_to_num(sq)) / 2.0
    dd = np.where(ok3, inner, 0.0)
    dn = np.where(ok3, s0[:, :, None], 0.0)
    agree = both = None
    if tensors[0].agree is not None:
        counted = np.stack([t.both for t in tensors])
        seen = np.isfinite(counted)
        agree = np.where(seen, np.stack([t.agree for t in tensors]), 0.0)
        both = np.where(seen, counted, 0.0)
    return d2, n2, ok.astype(int), dd, dn, agree, both


def _grouped(tensors: list[TensorDrift], n: int, label, order: list[str]) -> dict[str, GroupDrift]:
    members: dict[str, list[TensorDrift]] = {}
    for t in tensors:
        g = label(t)
        if g is not None:
            members.setdefault(g, []).append(t)
    names = [g for g in order if g in members] + sorted(g for g in members if g not in order)
    return {g: group(g, members[g], n) for g in names}


def groupings(result: DriftScan) -> dict[str, dict[str, GroupDrift]]:
    """{"components": {te0, te1, unet, vae, other, all}, "blocks": {EMB, IN00, ...}, "kinds": {...}};
    only groups that hold at least one tensor appear ("all" always)."""
    n, ts = len(result.models), result.tensors
    comps = _grouped(ts, n, lambda t: t.component, list(blocks.COMPONENTS))
    comps["all"] = group("all", ts, n)
    present_blocks = sorted({t.block for t in ts if t.block}, key=blocks.block_order)
    return {
        "components": comps,
        "blocks": _grouped(ts, n, lambda t: t.block, present_blocks),
        "kinds": _grouped(ts, n, lambda t: t.kind, list(blocks.KINDS)),
    }


# --- outputs -------------------------------------------------------------------------------------------

DEFINITIONS = {
    "dm": "L2 distance sqrt(sum over the group's tensors of ||theta_i - theta_j||^2), over tensors both models hold",
    "relative": "||theta_i - theta_j|| / ||theta_a||, a = whichever of i, j comes first in ml",
    "cosine_models": "cos(theta_i, theta_j) over the group's tensors (close to 1 for finetunes of one base)",
    "cosine_deltas": "cos(theta_i - theta_0, theta_j - theta_0), theta_0 = ml[0]; null in row/column 0",
    "sign_agreement": "(with --signs) of the weights both i and j moved away from theta_0, the share moved the same "
                      "way: 0.5 unrelated, 1 same direction; null in row/column 0",
    "blocks": "UNet blocks: EMB (time/label embeddings), IN00-IN08, M00, OUT00-OUT08, FINAL (out.*)",
    "kinds": "UNet tensors by layer kind: self-attention (attn1), cross-attention (attn2), other",
    "null": "pair not comparable (no shared tensor in the group)",
    "groups": "only groups holding at least one tensor appear; dm always has 'all'",
}


def _matrix(a: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if np.isfinite(v) else None for v in row] for row in a]


def _section(groups: dict[str, GroupDrift], metric: str) -> dict[str, list[list[float | None]]]:
    return {name: _matrix(getattr(g, metric)()) for name, g in groups.items()}


def report(result: DriftScan) -> dict:
    """The JSON document: the field's `ml` / `dm` layout first, then tunelab's extra sections."""
    gs = groupings(result)
    doc: dict = {"ml": result.models, "dm": _section(gs["components"], "distance")}
    doc["files"] = [str(p) for p in result.paths]
    doc["blocks"] = _section(gs["blocks"], "distance")
    doc["kinds"] = _section(gs["kinds"], "distance")
    metrics = ("relative", "cosine_models", "cosine_deltas") + (("sign_agreement",) if result.signs else ())
    for metric in metrics:
        doc[metric] = {part: _section(gs[part], metric) for part in ("components", "blocks", "kinds")}
    doc["tensors"] = {part: {name: g.n_tensors for name, g in groups.items()} for part, groups in gs.items()}
    doc["problems"] = result.problems.as_dict()
    doc["definitions"] = DEFINITIONS
    return doc


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def write_pairs_csv(doc: dict, path: Path) -> None:
    """One row per pair, one column per group: `component.unet`, `block.IN04`, `kind.cross-attention`."""
    cols = [(f"component.{g}", m) for g, m in doc["dm"].items()]
    cols += [(f"block.{g}", m) for g, m in doc["blocks"].items()]
    cols += [(f"kind.{g}", m) for g, m in doc["kinds"].items()]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model_a", "model_b", *(c for c, _ in cols)])
        for i, j in _pairs(len(doc["ml"])):
            w.writerow([doc["ml"][i], doc["ml"][j], *("" if m[i][j] is None else f"{m[i][j]:.9g}" for _, m in cols)])


def tensor_figures(result: DriftScan) -> dict[str, np.ndarray]:
    """Every metric of every tensor at once, as (T, N, N) arrays (NaN where a pair was not
    compared): `GroupDrift`'s formulas over one-tensor groups, vectorised over the tensors."""
    n = len(result.models)
    if not result.tensors:
        return {m: np.zeros((0, n, n)) for m in TENSOR_METRICS}
    each = GroupDrift("tensors", len(result.tensors), *_per_tensor(result.tensors))
    return {"l2": each.distance(), "relative": each.relative(), "cosine_models": each.cosine_models(),
            "cosine_deltas": each.cosine_deltas(), "sign_agreement": each.sign_agreement()}


TENSOR_METRICS = ("l2", "relative", "cosine_models", "cosine_deltas", "sign_agreement")


def write_tensors_csv(result: DriftScan, path: Path) -> None:
    """One row per tensor and pair: where it lives and how it moved (for "which tensors moved most")."""
    n = len(result.models)
    figures = tensor_figures(result)
    metrics = [figures[m] for m in TENSOR_METRICS]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "component", "block", "kind", "numel", "model_a", "model_b", *TENSOR_METRICS])
        for k, t in enumerate(result.tensors):
            where = [t.key, t.component, t.block or "", t.kind or "", t.numel]
            for i, j in _pairs(n):
                if np.isfinite(t.sq[i, j]):
                    w.writerow([*where, result.models[i], result.models[j], *(_num(m[k, i, j]) for m in metrics)])


def _num(v: float) -> str:
    return f"{v:.9g}" if np.isfinite(v) else ""


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary sibling renamed into place, so no half-written output survives."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- the command ---------------------------------------------------------------------------------------


@dataclass
class DriftReport:
    doc: dict  # the JSON document
    result: DriftScan
    pair: tuple[int, int]  # the pair of the per-block chart (indices into ml)
    written: list[Path]


def resolve_pair(pair: tuple[int, int] | None, n: int) -> tuple[int, int]:
    """Indices into the model list (negative counts from the end); default: first and last."""
    i, j = pair if pair is not None else (0, n - 1)
    for v in (i, j):
        if not -n <= v < n:
            raise TunelabError(f"--pair {i},{j}: index {v} is out of range for {n} models (use 0..{n - 1})")
    i, j = i % n, j % n
    if i == j:
        raise TunelabError(f"--pair {i},{j}: pick two different models")
    return i, j


def run_drift(
    paths: list[str | Path], out_dir: str | Path, pair: tuple[int, int] | None = None,
    plots: bool = True, progress: bool = True, signs: bool = False,
) -> DriftReport:
    """Scan, then write drift.json, drift.csv (pairs x groups), tensors.csv and the plots to `out_dir`."""
    paths = [Path(p) for p in paths]
    open_checkpoints(paths)  # every input check before any output folder appears
    ij = resolve_pair(pair, len(paths))
    if plots:  # import matplotlib while the scan waits on the disk (~0.6 s off the command)
        warm = threading.Thread(target=importlib.import_module, args=("tunelab.analyze.drift_plots",), daemon=True)
        warm.start()
    result = scan(paths, progress=progress, signs=signs)
    doc = report(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "drift.json", out / "drift.csv", out / "tensors.csv"]
    _write_atomic(written[0], lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))
    _write_atomic(written[1], lambda p: write_pairs_csv(doc, p))
    _write_atomic(written[2], lambda p: write_tensors_csv(result, p))
    if plots:
        from tunelab.analyze import drift_plots  # matplotlib only when drawing

        written += drift_plots.write_plots(doc, out, ij)
    return DriftReport(doc, result, ij, written)


def top_tensors(result: DriftScan, pair: tuple[int, int], k: int = 5) -> list[tuple[str, float, float]]:
    """The k tensors with the largest L2 change between the pair: (key, l2, relative)."""
    i, j = pair
    rows = []
    for t in result.tensors:
        sq, base = t.sq[i, j], t.norm2[min(i, j)]
        if np.isfinite(sq):
            rows.append((t.key, math.sqrt(sq), math.sqrt(sq / base) if base > 0 else math.nan))
    return sorted(rows, key=lambda r: -r[1])[:k]


def summary(rep: DriftReport) -> list[str]:
    """A short text table for the terminal: distance from the first model per component, the
    blocks and tensors that moved most in the chosen pair, problems, files written."""
    doc, models, (a, b) = rep.doc, rep.doc["ml"], rep.pair
    lines = ["models: " + "  ".join(f"[{i}] {m}" for i, m in enumerate(models))]
    lines.append("L2 distance from [0] (relative change ||d|| / ||theta_0|| in brackets):")
    lines.append(f"{'group':<8}" + "".join(f"{f'[{j}]':>22}" for j in range(1, len(models))))
    for g, m in doc["dm"].items():
        rel = doc["relative"]["components"][g]
        cells = [_fmt_cell(m[0][j], rel[0][j]) for j in range(1, len(models))]
        lines.append(f"{g:<8}" + "".join(f"{c:>22}" for c in cells))
    ranked = sorted(((m[a][b] or 0.0, g) for g, m in doc["blocks"].items()), reverse=True)[:5]
    if ranked:
        lines.append(f"UNet blocks moving most, [{a}] vs [{b}]: " + ", ".join(f"{g} {v:.4g}" for v, g in ranked))
    lines.append(f"tensors moving most, [{a}] vs [{b}] (L2, relative):")
    lines += [f"  {key}  {l2:.4g}  {rel:.3g}" for key, l2, rel in top_tensors(rep.result, rep.pair)]
    if "sign_agreement" in doc:
        lines.append(_signs_line(doc, a, b))
    p = rep.result.problems
    lines.append("problems: none" if not p.count() else
                 f"problems: {len(p.missing)} keys missing somewhere, {len(p.shape_mismatch)} shape mismatches, "
                 f"{len(p.non_finite)} non-finite tensors (listed under \"problems\" in drift.json)")
    lines.append("wrote: " + ", ".join(str(w) for w in rep.written))
    return lines


def _signs_line(doc: dict, a: int, b: int) -> str:
    """Sign agreement for the chosen pair, or for [1] vs the last model when the pair includes
    model 0 (whose move from itself has no sign)."""
    n = len(doc["ml"])
    if min(a, b) == 0:
        if n < 3:
            return "sign agreement: needs two models besides [0] (the moves are counted from [0])"
        a, b = 1, n - 1
    cells = [f"{g} {m[a][b]:.3f}" for g, m in doc["sign_agreement"]["components"].items() if m[a][b] is not None]
    return (f"sign agreement of the moves from [0], [{a}] vs [{b}] (0.5 unrelated, 1 same way): "
            + (", ".join(cells) or "nothing moved in both"))


def _fmt_cell(v: float | None, rel: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g} ({rel:.2g})" if rel is not None else f"{v:.4g}"
