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


def aspect_errors(width: np.ndarray, height: np.ndarray, bucket_ids: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """|bucket ratio − image ratio| per image (kohya's "mean ar error" averages this)."""
    ratios = buckets[:, 0] / buckets[:, 1]
    return np.abs(ratios[bucket_ids] - np.asarray(width, np.float64) / np.asarray(height, np.float64))


def histogram_text(counts: np.ndarray, buckets: np.ndarray, mean_error: float) -> str:
    """A readable bucket histogram (one line per non-empty bucket) for logs and `data stats`."""
    total = max(int(counts.sum()), 1)
    width = max(int(counts.max()) if counts.size else 0, 1)
    lines = [f"{len(buckets)} buckets, {int(counts.sum()):,} images, mean aspect error {mean_error:.4f}"]
    for (w, h), n in zip(buckets.tolist(), counts.tolist()):
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
