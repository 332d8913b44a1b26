"""Bucket set (kohya-compatible counts), vectorised assignment, kohya's no-upscale buckets, resize plan."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from tunelab.data.buckets import (
    BucketAssigner,
    BucketConfig,
    aspect_errors,
    assign_buckets,
    histogram_text,
    make_buckets,
    no_upscale_sizes,
    resize_plan,
)
from tunelab.errors import TunelabError


def test_sdxl_default_has_25_buckets_like_kohya() -> None:
    b = make_buckets(BucketConfig())
    assert len(b) == 25
    assert (b % 64 == 0).all() and (b >= 256).all() and (b <= 1024).all()
    assert (b[:, 0] * b[:, 1] <= 1024 * 1024).all()
    assert [1024, 1024] in b.tolist() and [256, 1024] in b.tolist() and [1024, 256] in b.tolist()
    ratios = b[:, 0] / b[:, 1]
    assert (np.diff(ratios) > 0).all()


def test_max_side_2048_and_small_resolution() -> None:
    b = make_buckets(BucketConfig(max_side=2048))
    assert len(b) == 41
    assert [1344, 768] in b.tolist() and [768, 1344] in b.tolist()
    small = make_buckets(BucketConfig(resolution=512, min_side=256, max_side=1024))
    assert (small[:, 0] * small[:, 1] <= 512 * 512).all() and [512, 512] in small.tolist()


def test_assignment_matches_brute_force_nearest_ratio() -> None:
    b = make_buckets(BucketConfig())
    rng = np.random.default_rng(0)
    w, h = rng.integers(64, 5000, 50_000), rng.integers(64, 5000, 50_000)
    ids = assign_buckets(w, h, b)
    # kohya-ss/sd-scripts library/train_util.py, BucketManager.select_bucket: argmin of |ratio error|
    # over its bucket list sorted by (w, h), so of equal errors the first in that order wins.
    kohya = sorted(range(len(b)), key=lambda i: tuple(b[i]))
    brute = np.array(kohya)[np.abs((b[kohya, 0] / b[kohya, 1])[None, :] - (w / h)[:, None]).argmin(axis=1)]
    assert (ids == brute).all() and ids.dtype == np.int16
    assert assign_buckets(np.array([1000]), np.array([1000]), b)[0] == 12  # the square
    err = aspect_errors(w, h, ids, b)
    assert err.shape == (50_000,) and (err >= 0).all()


def test_bad_input_is_refused() -> None:
    with pytest.raises(TunelabError):
        assign_buckets(np.array([0]), np.array([10]), make_buckets(BucketConfig()))
    with pytest.raises(ValidationError):
        BucketConfig(min_side=1024, max_side=512)
    with pytest.raises(ValidationError):
        BucketConfig(min_side=250)
    with pytest.raises(ValidationError):
        BucketConfig(max_area=5)


def test_resize_plan_covers_bucket_and_centres_crop() -> None:
    (rw, rh), (l, t, r, b) = resize_plan(1000, 1500, (832, 1216))
    assert rw >= 832 and rh >= 1216 and (r - l, b - t) == (832, 1216)
    assert l == (rw - 832) // 2 and t == (rh - 1216) // 2
    assert resize_plan(512, 512, (1024, 1024)) == ((1024, 1024), (0, 0, 1024, 1024))


def test_histogram_text_lists_nonempty_buckets() -> None:
    b = make_buckets(BucketConfig())
    counts = np.zeros(len(b), dtype=np.int64)
    counts[12] = 3
    text = histogram_text(counts, b, 0.0123)
    assert "1024 x 1024" in text and "0.0123" in text and "256 x 1024" not in text


# kohya-ss/sd-scripts, library/train_util.py, `BucketManager.select_bucket` with no_upscale (max
# area 1024², reso_steps 64), worked by hand:
# - 1000 x 700 fits the area: kept, bucket = sides rounded down to 64 -> 960 x 640;
# - 2000 x 1000 (ar 2): resized_width = sqrt(1048576 * 2) = 1448.15, resized_height = 724.08;
#   round_to_steps(1448.15) = int(1448.65) = 1448 -> 1408, height at that width round(704) = 704
#   (ratio 2.0); round_to_steps(724.08) = 704, width at it 1408 (ratio 2.0); not strictly nearer,
#   so the height branch: resized (int(704 * 2 + 0.5), 704) = (1408, 704) -> bucket 1408 x 704;
# - 3000 x 2000 (ar 1.5): rw 1254.10 -> 1216, height round(810.67) = int(811.17) = 811 -> 768,
#   ratio 1.583; rh 836.07 -> 832, width round(1248) = 1248 -> 1216, ratio 1.4615; the height
#   branch is nearer: resized (1248, 832) -> bucket 1216 x 832;
# - 500 x 300: 448 x 256 (no min_side: kohya ignores min/max_bucket_reso with no_upscale);
# - 1024 x 1025 (just over the area): rw 1023.5 -> 1024, height int(1025.5) = 1025 -> 1024,
#   ratio 1.0 beats 960/1024: resized (1024, 1025) -> bucket 1024 x 1024;
# - 40 x 900: a width under one step has no bucket (0).
NO_UPSCALE = [((1000, 700), (960, 640)), ((2000, 1000), (1408, 704)), ((3000, 2000), (1216, 832)),
              ((500, 300), (448, 256)), ((1024, 1025), (1024, 1024)), ((64, 64), (64, 64)), ((40, 900), (0, 896))]


def test_no_upscale_buckets_match_kohyas_select_bucket() -> None:
    cfg = BucketConfig(no_upscale=True)
    w, h = (np.array(side) for side in zip(*(size for size, _ in NO_UPSCALE)))
    assert [tuple(b) for b in no_upscale_sizes(w, h, cfg).tolist()] == [b for _, b in NO_UPSCALE]
    assert BucketConfig().no_upscale is False  # off by default, as in kohya


def test_no_upscale_assigner_grows_the_set_and_never_enlarges() -> None:
    assigner = BucketAssigner(BucketConfig(no_upscale=True))
    ids = assigner.assign(np.array([1000, 2000, 1000, 40]), np.array([700, 1000, 700, 900]))
    assert ids[0] == ids[2] and ids[3] == -1 and len(assigner.buckets) == 2
    assert [tuple(assigner.buckets[i]) for i in ids[:3]] == [(960, 640), (1408, 704), (960, 640)]
    again = assigner.assign(np.array([500, 1000]), np.array([300, 700]))
    assert again[1] == ids[0] and len(assigner.buckets) == 3  # earlier ids stay
    rng = np.random.default_rng(0)
    w, h = rng.integers(64, 5000, 2000), rng.integers(64, 5000, 2000)
    sizes = no_upscale_sizes(w, h, BucketConfig(no_upscale=True))
    scale = np.maximum(sizes[:, 0] / w, sizes[:, 1] / h)  # resize_plan's cover scale
    assert (scale <= 1 + 1e-9).all() and (sizes[:, 0] * sizes[:, 1] <= 1024 * 1024).all()
