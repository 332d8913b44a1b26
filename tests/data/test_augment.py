"""kohya's flip_aug and random_crop in the data loader and the latent cache.

References (kohya-ss/sd-scripts, library/train_util.py): `BaseDataset.__getitem__` draws
`flipped = subset.flip_aug and random.random() < 0.5`, mirrors decoded pixels with
`img[:, ::-1, :]`, takes `latents_flipped` from a cache, and feeds the flipped sample's crop left as
`target_size[0] - crop_ltrb[2]` (top unchanged); `trim_and_resize_if_required` cuts a random_crop
at `random.randint(0, trim_size)` per axis and still returns `get_crop_ltrb` ("no idea how to
reflect the cropped value in crop left/top in the case of random crop"). library/strategy_base.py
`_default_cache_batch_latents` encodes `torch.flip(img_tensor, dims=[3])` for `latents_flipped`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.test_kohya_crops import ref_get_crop_ltrb
from tests.data.test_latents import _toy_vae
from tunelab.data.buckets import BucketConfig, kohya_crop_ltrb, mirror_crop_ltrb, random_crop_box, resize_plan
from tunelab.data.images import ImageRef, load_into_bucket
from tunelab.data.index import IndexOptions, build_index
from tunelab.data.latents import (
    FLIPPED_SUFFIX,
    KohyaNpzLatents,
    LatentStore,
    cache_latents,
    encode_pixels,
    open_latents,
    read_manifest,
    repair_cache,
    verify_cache,
)
from tunelab.data.loader import IndexTable, TrainDataset, collate, draws_flip
from tunelab.errors import TunelabError

SMALL = IndexOptions(buckets=BucketConfig(resolution=64, min_side=32, max_side=128, step=32))


def _ramp(size: tuple[int, int], seed: int) -> Image.Image:
    """An image that is nothing like its mirror: red rises left to right, green top to bottom."""
    w, h = size
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    noise = np.random.default_rng(seed).integers(0, 40, (h, w))
    rgb = np.stack([255 * x / (w - 1), 255 * y / (h - 1), noise], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def _index(tmp_path: Path, sizes: list[tuple[int, int]]) -> Path:
    root = tmp_path / "imgs"
    root.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        _ramp(size, i).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"t{i}")
    build_index([f"folder:{root}"], tmp_path / "i.parquet", SMALL, progress=False)
    return tmp_path / "i.parquet"


def _flipped_and_not(seed: int, row: int, epochs: int = 40) -> tuple[int, int]:
    """An epoch in which the row is mirrored and one in which it is not."""
    draws = [draws_flip(seed, e, row) for e in range(epochs)]
    return draws.index(True), draws.index(False)


# --- the draws --------------------------------------------------------------------------------------


def test_flip_draw_is_a_fair_coin_of_seed_epoch_row_and_copy() -> None:
    draws = np.array([[draws_flip(7, e, r) for r in range(500)] for e in range(20)])  # (epoch, row)
    assert abs(draws.mean() - 0.5) < 0.015  # 10,000 draws: 3 standard deviations is 0.015
    assert draws_flip(7, 3, 11) == draws_flip(7, 3, 11)  # a function of its arguments: a resume redraws it
    assert (draws[0] != draws[1]).any() and (draws[:, 0] != draws[:, 1]).any()  # epochs and rows differ
    copies = [draws_flip(7, 0, 5, copy=c) for c in range(40)]
    assert 5 < sum(copies) < 35  # each copy of a repeated row gets its own draw


def test_random_crop_box_is_kohyas_randint_with_both_ends() -> None:
    rng = np.random.default_rng(0)
    boxes = np.array([random_crop_box((100, 36), (96, 32), rng) for _ in range(2000)])  # excess 4 x 4
    assert set(boxes[:, 0]) == {0, 1, 2, 3, 4} and set(boxes[:, 1]) == {0, 1, 2, 3, 4}
    assert (boxes[:, 2] - boxes[:, 0] == 96).all() and (boxes[:, 3] - boxes[:, 1] == 32).all()
    counts = np.bincount(boxes[:, 0], minlength=5)
    assert counts.min() > 340 and counts.max() < 460  # uniform: 400 each, ~4.5 sigma
    assert random_crop_box((96, 32), (96, 32), rng) == (0, 0, 96, 32)  # nothing to cut: the bucket itself


# --- crop conditioning under flip --------------------------------------------------------------------


def test_mirrored_crop_box_is_kohyas_target_width_minus_right() -> None:
    # 1000 x 700 in 1216 x 832 (kohya convention): fitted width 832 * 10/7 = 1188.571..., left
    # (1216 - 1188.571) // 2 = 13, right 1201.571; mirrored left 1216 - 1201.571 = 14.43 -> int 14.
    box = kohya_crop_ltrb((1216, 832), (1000, 700))
    assert box[0] == 13.0 and box[1] == 0.0
    mirrored = mirror_crop_ltrb(box, "kohya", (1000, 700), (1216, 832))
    assert int(mirrored[0]) == 14 and mirrored[1] == 0.0
    # 1300 x 700 in 1216 x 832 (real crop): resized 1545 x 832, 329 px cut, 164 on the left
    # (1380 on the right); mirrored, the 165 px cut on the right are on the left.
    (rw, rh), crop = resize_plan(1300, 700, (1216, 832))
    assert (rw, rh) == (1545, 832) and crop == (164, 0, 1380, 832)
    assert mirror_crop_ltrb(crop, "crop", (1300, 700), (1216, 832)) == (165, 0, 1381, 832)
    # kohya's formula, restated, over many sizes: left' = bucket width - right, top unchanged
    rng = np.random.default_rng(1)
    for w, h in rng.integers(40, 3000, (300, 2)):
        for bucket in ((1024, 1024), (1216, 832), (832, 1216), (1536, 640)):
            ref = ref_get_crop_ltrb(bucket, (int(w), int(h)))
            got = mirror_crop_ltrb(kohya_crop_ltrb(bucket, (int(w), int(h))), "kohya", (int(w), int(h)), bucket)
            assert (int(got[1]), int(got[0])) == (int(ref[1]), int(bucket[0] - ref[2]))


# --- flips and crops of decoded images ----------------------------------------------------------------


def test_a_flipped_sample_is_the_mirror_with_kohyas_conditioning(tmp_path: Path) -> None:
    index = IndexTable(_index(tmp_path, [(128, 36), (80, 64), (36, 128)]))
    plain = TrainDataset(index, seed=5)
    flips = TrainDataset(index, seed=5, flip_aug=True)
    for row in range(3):
        on, off = _flipped_and_not(5, row)
        a, b = flips[(on, row)], plain[(on, row)]
        assert a["flipped"] and not b["flipped"]
        torch.testing.assert_close(a["pixels"], torch.flip(b["pixels"], dims=[2]), rtol=0, atol=0)
        assert not torch.equal(a["pixels"], b["pixels"])  # the ramp is not symmetric
        rec = index.records([row])[0]
        bucket, size = (rec["bucket_width"], rec["bucket_height"]), (rec["width"], rec["height"])
        box = ref_get_crop_ltrb(bucket, size)
        assert b["crop_top_left"] == (int(box[1]), int(box[0]))
        assert a["crop_top_left"] == (int(box[1]), int(bucket[0] - box[2]))  # sd-scripts' flipped left
        assert flips[(off, row)]["flipped"] is False
        torch.testing.assert_close(flips[(off, row)]["pixels"], plain[(off, row)]["pixels"], rtol=0, atol=0)
    batch = collate([flips[(e, 0)] for e in range(6)])
    assert batch["flipped"] == [draws_flip(5, e, 0) for e in range(6)]


def _reference_pixels(rec: dict, bucket: tuple[int, int]) -> np.ndarray:
    """The resized image as load_into_bucket resizes it, before any crop: (H, W, 3)."""
    im = Image.open(rec["path"]).convert("RGB")
    (rw, rh), _ = resize_plan(rec["width"], rec["height"], bucket)
    return np.array(im.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0))


def test_random_crops_stay_inside_and_the_conditioning_is_the_crop(tmp_path: Path) -> None:
    # 200 x 64 -> bucket 96 x 32, resized 100 x 32: 4 px to cut, offsets 0..4
    index = IndexTable(_index(tmp_path, [(200, 64)]))
    rec = index.records([0])[0]
    bucket = (rec["bucket_width"], rec["bucket_height"])
    assert bucket == (96, 32)
    resized = _reference_pixels(rec, bucket)
    assert resized.shape == (32, 100, 3)
    real = TrainDataset(index, seed=2, random_crop=True, crop_conditioning="crop")
    kohya = TrainDataset(index, seed=2, random_crop=True)
    lefts = set()
    for epoch in range(40):
        s = real[(epoch, 0)]
        top, left = s["crop_top_left"]
        assert top == 0 and 0 <= left <= 4
        lefts.add(left)
        want = torch.from_numpy(resized[:, left:left + 96].copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        torch.testing.assert_close(s["pixels"], want, rtol=0, atol=0)  # the pixels of that very crop
        k = kohya[(epoch, 0)]
        torch.testing.assert_close(k["pixels"], s["pixels"], rtol=0, atol=0)  # same draw in either convention
        box = ref_get_crop_ltrb(bucket, (200, 64))
        assert k["crop_top_left"] == (int(box[1]), int(box[0]))  # kohya's: the fitted offset, crop or not
    assert lefts == {0, 1, 2, 3, 4}
    assert TrainDataset(index, seed=2, random_crop=True, crop_conditioning="crop")[(3, 0)]["crop_top_left"] == \
        real[(3, 0)]["crop_top_left"]  # a new dataset (a resumed run) cuts the same crop


def test_flip_and_random_crop_together(tmp_path: Path) -> None:
    index = IndexTable(_index(tmp_path, [(200, 64)]))
    rec = index.records([0])[0]
    resized = _reference_pixels(rec, (96, 32))
    both = TrainDataset(index, seed=4, random_crop=True, flip_aug=True, crop_conditioning="crop")
    crops = TrainDataset(index, seed=4, random_crop=True, crop_conditioning="crop")
    on, _ = _flipped_and_not(4, 0)
    s, c = both[(on, 0)], crops[(on, 0)]
    left = c["crop_top_left"][1]  # turning flips on leaves the crop draw as it was
    torch.testing.assert_close(s["pixels"], torch.flip(c["pixels"], dims=[2]), rtol=0, atol=0)
    assert s["crop_top_left"] == (0, 100 - (left + 96))  # mirrored in the resized image: 4 - left
    want = np.ascontiguousarray(resized[:, left:left + 96][:, ::-1])
    torch.testing.assert_close(s["pixels"], torch.from_numpy(want).permute(2, 0, 1).float() / 127.5 - 1.0, rtol=0, atol=0)


def test_random_crop_with_a_cache_is_refused(tmp_path: Path) -> None:
    index = IndexTable(_index(tmp_path, [(64, 64)]))
    with pytest.raises(TunelabError, match="data.random_crop needs images decoded while training.*data.latents empty"):
        TrainDataset(index, random_crop=True, latents=KohyaNpzLatents(tmp_path))


# --- the latent cache --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return _toy_vae()


def test_cache_holds_the_mirrored_images_latents(tmp_path: Path, vae: torch.nn.Module) -> None:
    index_path = _index(tmp_path, [(64, 64), (128, 36), (36, 128), (80, 64)])
    summary = cache_latents(index_path, tmp_path / "c", vae, batch_size=2, shard_size=3, progress=False, flip=True)
    assert summary.encoded == 4 and read_manifest(tmp_path / "c")["flip"] is True
    store = LatentStore(tmp_path / "c")
    assert store.keys() and all(store.has_flipped(k) for k in store.keys())
    assert not any(k.endswith(FLIPPED_SUFFIX) for k in store.keys())  # the mirrored tensors are no images
    index = IndexTable(index_path)
    for rec in index.records(range(4)):
        bucket = (rec["bucket_width"], rec["bucket_height"])
        pixels, _, _ = load_into_bucket(ImageRef(rec["path"]), bucket, buckets=SMALL.buckets)
        mirrored = encode_pixels(vae, [pixels[:, ::-1]])[0]  # what kohya caches: the mirrored image encoded
        plain, flipped = store.get(rec["key"]), store.get(rec["key"], flipped=True)
        assert flipped.flipped and not plain.flipped and flipped.crop_ltrb == plain.crop_ltrb
        np.testing.assert_allclose(flipped.latents.astype(np.float32), mirrored.astype(np.float32), rtol=0, atol=4e-3)
        assert not np.allclose(flipped.latents, plain.latents[:, :, ::-1], atol=0.05)  # not the mirrored latent
        assert not np.allclose(flipped.latents, plain.latents, atol=0.05)
    ds = TrainDataset(index, seed=1, latents=open_latents(tmp_path / "c", index, flip=True), flip_aug=True)
    on, off = _flipped_and_not(1, 2)
    key = index.records([2])[0]["key"]
    np.testing.assert_array_equal(ds[(on, 2)]["latents"].numpy(), store.get(key, flipped=True).latents.astype(np.float32))
    np.testing.assert_array_equal(ds[(off, 2)]["latents"].numpy(), store.get(key).latents.astype(np.float32))
    assert verify_cache(index_path, tmp_path / "c", progress=False).ok


def test_a_cache_without_flips_is_refused_for_flip_aug_and_never_mixed(tmp_path: Path, vae: torch.nn.Module) -> None:
    index_path = _index(tmp_path, [(64, 64), (128, 36)])
    index = IndexTable(index_path)
    cache_latents(index_path, tmp_path / "c", vae, progress=False)
    assert read_manifest(tmp_path / "c")["flip"] is False
    open_latents(tmp_path / "c", index)  # fine without flip_aug
    with pytest.raises(TunelabError, match=r"without --flip.*tunelab data cache .*i\.parquet --out NEW_DIR --flip"):
        open_latents(tmp_path / "c", index, flip=True)
    with pytest.raises(TunelabError, match="no mirrored latents"):
        LatentStore(tmp_path / "c").get("00", flipped=True)
    with pytest.raises(TunelabError, match="would mix the two: use --no-flip, or cache into a new folder"):
        cache_latents(index_path, tmp_path / "c", vae, progress=False, flip=True)
    cache_latents(index_path, tmp_path / "f", vae, progress=False, flip=True)
    with pytest.raises(TunelabError, match="would mix the two: use --flip"):
        cache_latents(index_path, tmp_path / "f", vae, progress=False, flip=False)
    assert cache_latents(index_path, tmp_path / "f", vae, progress=False).encoded == 0  # None: what the folder holds


def test_a_corrupt_mirrored_tensor_is_found_and_repaired(tmp_path: Path, vae: torch.nn.Module) -> None:
    from tunelab.models.safetensors_io import read_header

    index_path = _index(tmp_path, [(64, 64), (128, 36)])
    cache = tmp_path / "c"
    cache_latents(index_path, cache, vae, progress=False, flip=True)
    shard = next(cache.glob("shard-*.safetensors"))
    header = read_header(shard)
    spot = header.tensors["00" + FLIPPED_SUFFIX]
    data = bytearray(shard.read_bytes())
    data[header.data_start + spot.begin + 5] ^= 0x10  # one bit of 00's mirrored latents
    shard.write_bytes(bytes(data))
    report = verify_cache(index_path, cache, progress=False)
    assert report.corrupt == {shard.name: ["00"]}
    with pytest.raises(TunelabError, match="corrupt"):
        LatentStore(cache).get("00", flipped=True)
    fixed = repair_cache(index_path, cache, vae, progress=False)  # re-encodes with the folder's flip choice
    assert fixed.ok and LatentStore(cache).has_flipped("00") and LatentStore(cache).has_flipped("01")


def test_kohya_npz_latents_flipped_are_used_and_their_absence_refused(tmp_path: Path) -> None:
    index = IndexTable(_index(tmp_path, [(64, 64), (128, 36)]))
    folder = tmp_path / "kohya"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for rec in index.records(range(2)):
        bw, bh = rec["bucket_width"], rec["bucket_height"]
        lat, flipped = rng.standard_normal((2, 4, bh // 8, bw // 8)).astype(np.float32)
        np.savez(folder / f"{rec['key']}.npz", latents=lat, latents_flipped=flipped,
                 original_size=np.array([rec["width"], rec["height"]]),
                 crop_ltrb=np.array(ref_get_crop_ltrb((bw, bh), (rec["width"], rec["height"]))))
        written[rec["key"]] = (lat, flipped)
    source = open_latents(folder, index, flip=True)
    ds = TrainDataset(index, seed=3, latents=source, flip_aug=True)
    for row in range(2):
        rec = index.records([row])[0]
        on, off = _flipped_and_not(3, row)
        np.testing.assert_array_equal(ds[(on, row)]["latents"].numpy(), written[rec["key"]][1])
        np.testing.assert_array_equal(ds[(off, row)]["latents"].numpy(), written[rec["key"]][0])
        box = ref_get_crop_ltrb((rec["bucket_width"], rec["bucket_height"]), (rec["width"], rec["height"]))
        assert ds[(on, row)]["crop_top_left"] == (int(box[1]), int(rec["bucket_width"] - box[2]))
    # the newer per-resolution layout: latents_flipped_{h}x{w}
    rec = index.records([1])[0]
    h, w = rec["bucket_height"] // 8, rec["bucket_width"] // 8
    lat, flipped = written[rec["key"]]
    np.savez(folder / f"{rec['key']}.npz", **{f"latents_{h}x{w}": lat, f"latents_flipped_{h}x{w}": flipped,
                                              f"original_size_{h}x{w}": np.array([rec["width"], rec["height"]]),
                                              f"crop_ltrb_{h}x{w}": np.array([0, 0, rec["bucket_width"], h * 8])})
    np.testing.assert_array_equal(source.get(rec["key"], rec, flipped=True).latents, flipped)
    np.savez(folder / f"{rec['key']}.npz", latents=lat, original_size=np.array([rec["width"], rec["height"]]),
             crop_ltrb=np.array([0, 0, rec["bucket_width"], rec["bucket_height"]]))
    open_latents(folder, index)  # without flip_aug the file is fine
    with pytest.raises(TunelabError, match=r"no `latents_flipped`.*--flip_aug.*tunelab data cache"):
        open_latents(folder, index, flip=True)
