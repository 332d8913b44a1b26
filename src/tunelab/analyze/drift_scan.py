"""The one pass of `tunelab drift`: N checkpoints compared key by key, each key read once
(`drift_read`) and reduced to per-pair sums (`drift_math`).

Everything per tensor reduces to two arrays (four with signs): `sq` (N x N squared distances, NaN
for a pair that was not compared) and `norm2` (N squared norms); with signs also `agree` and
`both`, two (N, N) count matrices over the moves from model 0. Keys missing from some files, shape
mismatches and non-finite values never stop the scan: the affected pairs skip that tensor and the
problem is listed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from tunelab.analyze.drift_math import pair_sums
from tunelab.analyze.drift_read import Reader, key_order, open_checkpoints
from tunelab.models import blocks

log = logging.getLogger(__name__)


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

    models: list[str]  # display names, in the order compared (drift.training_order)
    paths: list[Path]
    tensors: list[TensorDrift]
    problems: Problems
    bytes_read: int = 0
    signs: bool = False  # whether sign agreement was counted


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


def model_names(paths: list[Path]) -> list[str]:
    """File names for display; the paths as given where two files share a name."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


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
        reader = stack.enter_context(contextlib.closing(Reader(paths, headers)))
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
