"""Bucket set (kohya-compatible counts), vectorised assignment, resize plan."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from tunelab.data.buckets import (
    BucketConfig,
    aspect_errors,
    assign_buckets,
    histogram_text,
    make_buckets,
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
    brute = np.abs(b[:, 0] / b[:, 1] - (w / h)[:, None]).argmin(axis=1)
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
