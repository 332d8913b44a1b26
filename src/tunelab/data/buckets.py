"""Aspect-ratio buckets: the bucket set, vectorised assignment, and the resize/crop into a bucket.

Hand-written because the rule is tiny and must match kohya's sd-scripts exactly (checkpoints and
their users expect the same bucket set): with max area A = resolution², one square bucket of side
floor(resolution / step) * step, and for every width w = min_side, min_side + step, ... ≤ max_side
the height h = min(max_side, floor(A / w / step) * step), kept when h ≥ min_side, in both
orientations. At resolution 1024, sides 256..1024, step 64 this gives 25 buckets (13 of
width ≤ 1024 with height 1024, and their 12 transposes); with max_side 2048 it gives 41 (the
orientations of e.g. 1280 x 768 and 1344 x 768 both exist then; see tests/data/test_buckets.py).

An image goes to the bucket whose aspect ratio (w / h) is nearest to its own — kohya's rule, ties
included (sd-scripts' `BucketManager.select_bucket`: an image of exactly a bucket's size takes it;
otherwise the first bucket of least |ratio error| in kohya's list order, the (width, height) pairs
sorted, wins: the wider bucket for landscape ties, the narrower for portrait ones). It is vectorised
over a batch of rows as one (N, B) error table.

`resize_plan` is kohya's resize and centre trim (the same function): the side that is relatively
shorter is scaled onto the bucket and the other rounded half up (`int(x + 0.5)`), then the excess is
cut evenly, the odd pixel going to the right/bottom; with `no_upscale` the resized size is the one
`select_bucket` chose (the image's own size when it fits the max area).

SDXL's crop conditioning comes in two conventions (`CROP_CONVENTIONS`): "kohya", sd-scripts'
`get_crop_ltrb`: where the image would sit if it were fitted *inside* the bucket (a letterbox
offset on the axis that is *not* cropped), which kohya's caches store and its trainers feed; and
"crop", the pixels really cut from the resized image's top-left (the SDXL paper's c_top, c_left).
Both are functions of (original size, bucket), so a value of one converts exactly to the other
(`convert_crop_ltrb`). kohya's augmentations: `random_crop_box` cuts the bucket from a random place
(random_crop), `mirror_crop_ltrb` gives a left-right mirrored sample's box (flip_aug) in either
convention.

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


_ASSIGN_CHUNK = 65536  # rows per (N, B) error table in `assign_buckets`


def assign_buckets(width: np.ndarray, height: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """Index into `buckets` of the nearest aspect ratio for each image; (N,) int16.

    kohya's choice exactly (module docstring): an exact bucket size first, else the least |ratio
    error| with ties to the bucket first in (width, height) order. Sizes ≤ 0 raise: a broken index.
    """
    width = np.asarray(width, dtype=np.int64)
    height = np.asarray(height, dtype=np.int64)
    if width.size and (width.min() <= 0 or height.min() <= 0):
        raise TunelabError("image sizes must be positive; rebuild the index (a source reported a 0 size)")
    buckets = np.asarray(buckets, dtype=np.int64)
    kohya_order = np.lexsort((buckets[:, 1], buckets[:, 0]))  # (B,) ids in kohya's sorted (w, h) list
    ratios = buckets[kohya_order, 0] / buckets[kohya_order, 1]  # (B,) float64, as kohya divides
    out = np.empty(width.shape, np.int64)
    for s in range(0, width.size, _ASSIGN_CHUNK):
        ar = width[s:s + _ASSIGN_CHUNK] / height[s:s + _ASSIGN_CHUNK]  # (n,)
        out[s:s + _ASSIGN_CHUNK] = kohya_order[np.abs(ratios[None, :] - ar[:, None]).argmin(axis=1)]  # first of ties
    codes = buckets[:, 0] * 65536 + buckets[:, 1]  # (B,) an exact size takes its own bucket
    exact = np.isin(width * 65536 + height, codes)
    if exact.any():
        by_code = np.argsort(codes)
        out[exact] = by_code[np.searchsorted(codes[by_code], width[exact] * 65536 + height[exact])]
    return out.astype(np.int16)


def _round_to_steps(x: np.ndarray, step: int) -> np.ndarray:
    """kohya's `BucketManager.round_to_steps`: round half up, then down to a multiple of `step`."""
    x = np.floor(x + 0.5).astype(np.int64)
    return x - x % step


def no_upscale_sizes(width: np.ndarray, height: np.ndarray, cfg: BucketConfig) -> np.ndarray:
    """kohya's no-upscale bucket (width, height) per image; (N, 2) int64, a side 0 when the image is
    smaller than one `step` on that side: `no_upscale_resized` with both sides rounded *down* to `step`."""
    resized = no_upscale_resized(width, height, cfg)  # (N, 2)
    return resized - resized % cfg.step


def no_upscale_resized(width: np.ndarray, height: np.ndarray, cfg: BucketConfig) -> np.ndarray:
    """The size kohya resizes an image to under no-upscale, before the trim; (N, 2) int64.

    sd-scripts' `BucketManager.select_bucket` with `no_upscale`, vectorised: an image within the
    max area keeps its size; a larger one is shrunk to the max area at its own aspect ratio, and of
    the two candidates (width rounded to steps, or height rounded to steps) the one whose ratio
    is strictly nearer the image's wins (a tie takes the height's).
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
    return np.stack([resized_w, resized_h], axis=1)


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


CROP_CONVENTIONS = ("kohya", "crop")  # SDXL crop conditioning: kohya's fitted offset, or the real crop


def resize_plan(
    width: int, height: int, bucket: tuple[int, int], buckets: BucketConfig | None = None
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """kohya's resize and centre trim into `bucket`: ((resized_w, resized_h), crop (l, t, r, b)).

    sd-scripts' `BucketManager.select_bucket` (the resized size) and `trim_and_resize_if_required`
    (the trim): an image relatively wider than the bucket gets the bucket's height, else its width,
    and the other side is scaled and rounded half up; with `buckets.no_upscale` the resized size is
    `no_upscale_resized` (an image inside the max area is not resized at all). The crop box is in
    resized pixels, the excess split with the odd pixel on the right/bottom; (l, t) is the
    "crop" convention's crop_top_left.
    """
    bw, bh = bucket
    if buckets is not None and buckets.no_upscale:
        rw, rh = (int(v) for v in no_upscale_resized(np.array([width]), np.array([height]), buckets)[0])
    else:
        scale = bh / height if width / height > bw / bh else bw / width
        rw, rh = math.floor(width * scale + 0.5), math.floor(height * scale + 0.5)
    if rw < bw or rh < bh:
        raise TunelabError(f"a {width} x {height} image resizes to {rw} x {rh}, smaller than its bucket {bw} x {bh}: "
                           "the index was built with other bucket settings; rebuild it with `tunelab data index`")
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return (rw, rh), (left, top, left + bw, top + bh)


def kohya_crop_ltrb(bucket: tuple[int, int], original_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """sd-scripts' `get_crop_ltrb` (library/train_util.py): the box the image would fill if fitted
    *inside* the bucket, in bucket pixels, as floats (what kohya's `.npz` caches hold).

    The side that is relatively longer spans the bucket; the other is centred, its offset floored
    (float `//`, so an exact fit computed a hair over the bucket gives -1, as in kohya)."""
    bw, bh = bucket
    image_ar = original_size[0] / original_size[1]
    if bw / bh > image_ar:  # the bucket is wider: the heights match
        fit_w, fit_h = bh * image_ar, float(bh)
    else:
        fit_w, fit_h = float(bw), bw / image_ar
    left, top = (bw - fit_w) // 2, (bh - fit_h) // 2
    return left, top, left + fit_w, top + fit_h


def crop_ltrb_in(convention: str, original_size: tuple[int, int], bucket: tuple[int, int],
                 buckets: BucketConfig | None = None) -> tuple[float, ...]:
    """The crop box of an image of `original_size` (w, h) in `bucket`, in `convention`."""
    if convention == "kohya":
        return kohya_crop_ltrb(bucket, original_size)
    if convention == "crop":
        return tuple(float(v) for v in resize_plan(original_size[0], original_size[1], bucket, buckets)[1])
    raise TunelabError(f"crop convention {convention!r}: choose one of {', '.join(CROP_CONVENTIONS)}")


def convert_crop_ltrb(crop_ltrb: tuple[float, ...], stored: str, wanted: str, original_size: tuple[int, int],
                      bucket: tuple[int, int], buckets: BucketConfig | None = None) -> tuple[float, ...]:
    """A crop box recorded in convention `stored`, in convention `wanted`: unchanged when they are the
    same, else recomputed from the original size and the bucket (both conventions are functions of
    them; kohya never caches random crops)."""
    if stored == wanted:
        return tuple(crop_ltrb)
    return crop_ltrb_in(wanted, original_size, bucket, buckets)


def random_crop_box(resized: tuple[int, int], bucket: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """kohya's `random_crop` (sd-scripts `trim_and_resize_if_required`, library/train_util.py): the
    bucket cut from a random place of the resized image, each axis' offset uniform in 0..excess
    (both ends included, `random.randint(0, trim_size)`); drawn from `rng`, left then top.
    Returns the real crop (l, t, r, b) in resized pixels, like `resize_plan`'s centre crop."""
    (rw, rh), (bw, bh) = resized, bucket
    left = int(rng.integers(0, rw - bw + 1))
    top = int(rng.integers(0, rh - bh + 1))
    return left, top, left + bw, top + bh


def mirror_crop_ltrb(crop_ltrb: tuple[float, ...], convention: str, original_size: tuple[int, int],
                     bucket: tuple[int, int], buckets: BucketConfig | None = None) -> tuple[float, ...]:
    """The crop box of the left-right mirrored sample, in the same `convention`.

    The box is mirrored inside the frame it is measured in: the bucket for "kohya" (left becomes
    bucket width - right: sd-scripts' `BaseDataset.__getitem__`, `target_size[0] - crop_ltrb[2]`,
    library/train_util.py), the resized image for "crop" (the pixels cut off on the right of the
    unmirrored image are those cut on the left of the mirrored one). Top and bottom are unchanged."""
    left, top, right, bottom = crop_ltrb
    if convention == "kohya":
        width = bucket[0]
    elif convention == "crop":
        width = resize_plan(original_size[0], original_size[1], bucket, buckets)[0][0]
    else:
        raise TunelabError(f"crop convention {convention!r}: choose one of {', '.join(CROP_CONVENTIONS)}")
    return width - right, top, width - left, bottom


def crop_top_left(crop_ltrb: tuple[float, ...]) -> tuple[int, int]:
    """SDXL's crop conditioning (top, left) from a crop box, truncated to int as kohya's dataset does."""
    return int(crop_ltrb[1]), int(crop_ltrb[0])
