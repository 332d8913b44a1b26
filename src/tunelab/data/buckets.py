"""Aspect-ratio buckets: the bucket set, vectorised assignment, and the resize/crop into a bucket.

Hand-written because the rule is tiny and must match kohya's sd-scripts exactly (checkpoints and
their users expect the same bucket set): with max area A = resolution², one square bucket of side
floor(resolution / step) * step, and for every width w = min_side, min_side + step, ... ≤ max_side
the height h = min(max_side, floor(A / w / step) * step), kept when h ≥ min_side, in both
orientations. At resolution 1024, sides 256..1024, step 64 this gives 25 buckets (13 of
width ≤ 1024 with height 1024, and their 12 transposes); with max_side 2048 it gives 41 (the
orientations of e.g. 1280 x 768 and 1344 x 768 both exist then; see tests/data/test_buckets.py).

An image goes to the bucket whose aspect ratio (w / h) is nearest to its own — kohya's rule — done
for millions of rows at once with one `searchsorted` over the sorted bucket ratios.

With `no_upscale` (kohya's `--bucket_no_upscale`) there is no predefined set: each image gets a
bucket made from its own size — shrunk to the max area first if it is larger — with both sides
rounded down to `step` (sd-scripts' `BucketManager.select_bucket`, library/train_util.py), so no
image is ever enlarged; `min_side` / `max_side` are ignored then, as in kohya. `BucketAssigner`
hands out ids for both kinds, growing the set as new sizes appear.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


class BucketConfig(BaseModel):
    """The bucket set (`[data.buckets]` in the run file)."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(
        1024, gt=0, description="Training resolution; the max bucket area is resolution². 1024 for SDXL."
    )
    min_side: int = Field(256, gt=0, description="Shortest bucket side; lower it only for extremely tall/wide data.")
    max_side: int = Field(
        1024, gt=0, description="Longest bucket side; 2048 gives extreme aspect ratios their own buckets."
    )
    step: int = Field(64, gt=0, description="Bucket sides are multiples of this; keep 64 (VAE 8 x UNet 8).")
    no_upscale: bool = Field(
        False,
        description="kohya's --bucket_no_upscale: each image gets a bucket of its own size (shrunk to the max "
        "area if larger), sides rounded down to `step`, so small images are never enlarged; min_side / max_side "
        "are then ignored. Set by `tunelab data index --bucket-no-upscale`.",
    )

    @model_validator(mode="after")
    def _check_sides(self) -> "BucketConfig":
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be ≤ max_side ({self.max_side})")
        if self.min_side % self.step or self.max_side % self.step:
            raise ValueError(f"min_side and max_side must be multiples of step ({self.step})")
        return self


def make_buckets(cfg: BucketConfig) -> np.ndarray:
    """The bucket set as an (B, 2) int array of (width, height), sorted by aspect ratio w / h."""
    area = cfg.resolution * cfg.resolution
    sizes = {(cfg.resolution // cfg.step * cfg.step,) * 2}
    for w in range(cfg.min_side, cfg.max_side + 1, cfg.step):
        h = min(cfg.max_side, (area // w) // cfg.step * cfg.step)
        if h >= cfg.min_side:
            sizes.update({(w, h), (h, w)})
    buckets = np.array(sorted(sizes, key=lambda s: (s[0] / s[1], s[0])), dtype=np.int32)
    return buckets  # (B, 2)


def assign_buckets(width: np.ndarray, height: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """Index into `buckets` of the nearest aspect ratio for each image; (N,) int16.

    Ties go to the lower ratio. Widths/heights ≤ 0 raise: they mean a broken index.
    """
    width = np.asarray(width, dtype=np.float64)
    height = np.asarray(height, dtype=np.float64)
    if width.size and (width.min() <= 0 or height.min() <= 0):
        raise TunelabError("image sizes must be positive; rebuild the index (a source reported a 0 size)")
    ratios = buckets[:, 0] / buckets[:, 1]  # (B,) ascending
    ar = width / height  # (N,)
    hi = np.clip(np.searchsorted(ratios, ar), 1, len(ratios) - 1)
    lo = hi - 1
    pick_hi = np.abs(ratios[hi] - ar) < np.abs(ratios[lo] - ar)
    out = np.where(pick_hi, hi, lo) if len(ratios) > 1 else np.zeros_like(hi)
    return out.astype(np.int16)


def _round_to_steps(x: np.ndarray, step: int) -> np.ndarray:
    """kohya's `BucketManager.round_to_steps`: round half up, then down to a multiple of `step`."""
    x = np.floor(x + 0.5).astype(np.int64)
    return x - x % step


def no_upscale_sizes(width: np.ndarray, height: np.ndarray, cfg: BucketConfig) -> np.ndarray:
    """kohya's no-upscale bucket (width, height) per image; (N, 2) int64, a side 0 when the image is
    smaller than one `step` on that side.

    sd-scripts' `BucketManager.select_bucket` with `no_upscale`, vectorised: an image within the
    max area keeps its size; a larger one is shrunk to the max area at its own aspect ratio, and of
    the two candidates (width rounded to steps, or height rounded to steps) the one whose ratio
    is nearer the image's wins. The bucket is that size with both sides rounded *down* to `step`.
    """
    w = np.asarray(width, np.float64)
    h = np.asarray(height, np.float64)
    area, step = cfg.resolution * cfg.resolution, cfg.step
    ar = w / h
    big = w * h > area
    with np.errstate(divide="ignore", invalid="ignore"):
        rw = np.sqrt(area * ar)  # the size at the max area
        rh = area / rw
        bw = _round_to_steps(rw, step)
        ar_w = bw / _round_to_steps(bw / ar, step)  # ratio when the width is rounded (inf for a 0 height)
        bh = _round_to_steps(rh, step)
        ar_h = _round_to_steps(bh * ar, step) / bh
    width_wins = np.abs(ar_w - ar) < np.abs(ar_h - ar)
    resized_w = np.where(width_wins, bw, np.floor(bh * ar + 0.5))
    resized_h = np.where(width_wins, np.floor(bw / ar + 0.5), bh)
    resized_w = np.where(big, resized_w, w).astype(np.int64)
    resized_h = np.where(big, resized_h, h).astype(np.int64)
    return np.stack([resized_w - resized_w % step, resized_h - resized_h % step], axis=1)


class BucketAssigner:
    """Bucket ids for batches of images: the predefined set, or with `no_upscale` a set that grows
    as new sizes appear (new ids are appended batch by batch, so rows already written keep theirs)."""

    MAX_BUCKETS = np.iinfo(np.int16).max  # the index stores ids as int16

    def __init__(self, cfg: BucketConfig) -> None:
        self.cfg = cfg
        self._fixed = None if cfg.no_upscale else make_buckets(cfg)  # (B, 2)
        self._ids: dict[tuple[int, int], int] = {}  # no_upscale: (width, height) -> id, in order

    @property
    def buckets(self) -> np.ndarray:
        """The bucket set so far, (B, 2) int32 of (width, height)."""
        if self._fixed is not None:
            return self._fixed
        return np.array(list(self._ids), np.int32).reshape(-1, 2)

    def assign(self, width: np.ndarray, height: np.ndarray) -> np.ndarray:
        """(N,) int16 bucket ids; -1 (no_upscale only) for an image smaller than one step on a side."""
        if not self.cfg.no_upscale:
            return assign_buckets(width, height, self.buckets)
        width, height = np.asarray(width), np.asarray(height)
        if width.size and (width.min() <= 0 or height.min() <= 0):
            raise TunelabError("image sizes must be positive; rebuild the index (a source reported a 0 size)")
        sizes = no_upscale_sizes(width, height, self.cfg)  # (N, 2)
        ids = np.full(len(sizes), -1, np.int64)
        fits = (sizes > 0).all(axis=1)
        if fits.any():
            distinct, inverse = np.unique(sizes[fits], axis=0, return_inverse=True)
            lookup = np.array([self._id_of(int(bw), int(bh)) for bw, bh in distinct], np.int64)
            ids[fits] = lookup[inverse.reshape(-1)]
        return ids.astype(np.int16)

    def _id_of(self, bw: int, bh: int) -> int:
        if (bw, bh) not in self._ids:
            if len(self._ids) >= self.MAX_BUCKETS:
                raise TunelabError(f"more than {self.MAX_BUCKETS:,} distinct no-upscale buckets; raise the bucket step "
                                   f"(now {self.cfg.step}) so image sizes round to fewer buckets")
            self._ids[(bw, bh)] = len(self._ids)
        return self._ids[(bw, bh)]


def aspect_errors(width: np.ndarray, height: np.ndarray, bucket_ids: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """|bucket ratio − image ratio| per image (kohya's "mean ar error" averages this)."""
    ratios = buckets[:, 0] / buckets[:, 1]
    return np.abs(ratios[bucket_ids] - np.asarray(width, np.float64) / np.asarray(height, np.float64))


def histogram_text(counts: np.ndarray, buckets: np.ndarray, mean_error: float) -> str:
    """A readable bucket histogram (one line per non-empty bucket) for logs and `data stats`."""
    total = max(int(counts.sum()), 1)
    width = max(int(counts.max()) if counts.size else 0, 1)
    lines = [f"{len(buckets)} buckets, {int(counts.sum()):,} images, mean aspect error {mean_error:.4f}"]
    by_ratio = sorted(zip(buckets.tolist(), counts.tolist()), key=lambda b: (b[0][0] / b[0][1], b[0][0]))
    for (w, h), n in by_ratio:  # no-upscale sets grow in the order sizes appear
        if n:
            bar = "#" * max(1, round(30 * n / width))
            lines.append(f"  {w:>5} x {h:<5} ratio {w / h:5.2f}  {n:>11,}  {100 * n / total:5.1f}%  {bar}")
    return "\n".join(lines)


def resize_plan(width: int, height: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Scale to cover the bucket, then centre-crop: ((resized_w, resized_h), crop (l, t, r, b)).

    The crop box is in resized-image pixels; (l, t) is SDXL's crop_top_left conditioning.
    """
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, math.ceil(width * scale - 1e-6)), max(bh, math.ceil(height * scale - 1e-6))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return (rw, rh), (left, top, left + bw, top + bh)
