"""Group figures of `tunelab drift`: the per-tensor sums of a scan added up per component (te1,
te2, unet, vae, other, all), UNet block (EMB, IN00-IN08, M00, OUT00-OUT08, FINAL) and layer kind,
by `tunelab.models.blocks`.

- distance  ‖Δ‖ = sqrt(Σ ‖θ_i − θ_j‖²) over the group's tensors that both models hold;
- relative  ‖θ_i − θ_j‖ / ‖θ_a‖, a = the one of i, j given first on the command line;
- cosine_models  cos(θ_i, θ_j) = (‖θ_i‖² + ‖θ_j‖² − ‖θ_i − θ_j‖²) / (2 ‖θ_i‖ ‖θ_j‖) — close to 1
  for any two finetunes of one base; shown for completeness;
- cosine_deltas  cos(θ_i − θ_0, θ_j − θ_0), θ_0 = the first model: do two finetunes (or two
  checkpoints) move the same way from where they started? Undefined (null) in row/column 0.
- sign_agreement (with `signs`)  of the positions where θ_i − θ_0 and θ_j − θ_0 are both nonzero,
  the share with the same sign.

The same formulas serve one tensor alone (`tensor_figures`, for tensors.csv), vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunelab.analyze.drift_scan import DriftScan, TensorDrift
from tunelab.models import blocks


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
    """{"components": {te1, te2, unet, vae, other, all}, "blocks": {EMB, IN00, ...}, "kinds": {...}};
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
