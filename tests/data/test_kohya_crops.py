"""Buckets, resize, trim and SDXL crop conditioning against kohya's sd-scripts, re-derived below.

The reference functions restate sd-scripts' algorithms (kohya-ss/sd-scripts, library/model_util.py
`make_bucket_resolutions`; library/train_util.py `BucketManager.select_bucket`, `round_to_steps`,
`BucketManager.get_crop_ltrb`, `trim_and_resize_if_required`, and `BaseDataset.__getitem__`, which
feeds `crop_top_lefts` = (int(crop_ltrb[1]), int(crop_ltrb[0])) into sdxl_train.py's size
embeddings) in the same float operations, so ties and truncations come out as kohya's do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.numpy import save_file

from tunelab.data.buckets import (
    BucketAssigner,
    BucketConfig,
    assign_buckets,
    convert_crop_ltrb,
    crop_top_left,
    kohya_crop_ltrb,
    make_buckets,
    resize_plan,
)
from tunelab.data.captions import CaptionConfig
from tunelab.data.index import IndexOptions, build_index, read_footer
from tunelab.data.latents import (
    META_KEY,
    LatentStore,
    _rewrite_without,
    _write_shard,
    checksum,
    open_latents,
    shard_header,
)
from tunelab.data.loader import IndexTable, TrainDataset
from tunelab.errors import TunelabError

# --- kohya's algorithms, restated --------------------------------------------------------------


def ref_resos(side: int, min_size: int, max_size: int, steps: int) -> list[tuple[int, int]]:
    """model_util.make_bucket_resolutions((side, side), ...): a sorted list of (w, h)."""
    area = side * side
    resos = {(int(math.sqrt(area) // steps) * steps,) * 2}
    for width in range(min_size, max_size + 1, steps):
        height = min(max_size, int((area // width) // steps) * steps)
        if height >= min_size:
            resos |= {(width, height), (height, width)}
    return sorted(resos)


def ref_round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def ref_select_bucket(w: int, h: int, resos: list, no_upscale: bool, max_area: int, steps: int):
    """BucketManager.select_bucket -> (bucket (w, h), resized size (w, h))."""
    ar = w / h
    if not no_upscale:
        reso = (w, h)
        if reso not in set(resos):
            errors = np.abs(np.array([a / b for a, b in resos]) - ar)
            reso = resos[int(errors.argmin())]  # numpy's argmin: the first of equal errors
        scale = reso[1] / h if ar > reso[0] / reso[1] else reso[0] / w
        return reso, (int(w * scale + 0.5), int(h * scale + 0.5))
    if w * h > max_area:
        rw = math.sqrt(max_area * ar)
        rh = max_area / rw
        bw = ref_round_to_steps(rw, steps)
        ar_w = bw / ref_round_to_steps(bw / ar, steps)
        bh = ref_round_to_steps(rh, steps)
        ar_h = ref_round_to_steps(bh * ar, steps) / bh
        resized = (bw, int(bw / ar + 0.5)) if abs(ar_w - ar) < abs(ar_h - ar) else (int(bh * ar + 0.5), bh)
    else:
        resized = (w, h)
    return (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps), resized


def ref_trim(resized: tuple[int, int], reso: tuple[int, int]) -> tuple[int, int]:
    """trim_and_resize_if_required without random_crop: (left, top) cut from the resized image."""
    left = (resized[0] - reso[0]) // 2 if resized[0] > reso[0] else 0
    top = (resized[1] - reso[1]) // 2 if resized[1] > reso[1] else 0
    return left, top


def ref_get_crop_ltrb(reso: tuple[int, int], size: tuple[int, int]) -> tuple[float, ...]:
    bucket_ar, image_ar = reso[0] / reso[1], size[0] / size[1]
    if bucket_ar > image_ar:
        rw, rh = reso[1] * image_ar, reso[1]
    else:
        rw, rh = reso[0], reso[0] / image_ar
    left, top = (reso[0] - rw) // 2, (reso[1] - rh) // 2
    return left, top, left + rw, top + rh


def ref_crop_top_left(crop_ltrb) -> tuple[int, int]:
    """BaseDataset.__getitem__ (not flipped): crop_top_lefts.append((int(top), int(left)))."""
    return int(crop_ltrb[1]), int(crop_ltrb[0])


# Exact float ties of |bucket ratio - image ratio| (found by search over sizes): kohya takes the
# bucket first in its sorted (w, h) list, i.e. the *wider* one for these landscape images.
TIES = [((108, 91), (1024, 832)), ((136, 72), (1024, 512)), ((150, 70), (1024, 448)), ((168, 110), (1024, 640)),
        ((65, 160), (384, 1024)), ((93, 96), (960, 1024))]


def _random_sizes(n: int, lo: int, hi: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi, n), rng.integers(lo, hi, n)


@pytest.mark.parametrize("cfg", [BucketConfig(), BucketConfig(max_side=2048), BucketConfig(resolution=768, step=32)])
def test_bucket_resize_and_crop_ltrb_match_kohya(cfg: BucketConfig) -> None:
    w, h = _random_sizes(2000, 64, 5000, seed=cfg.max_side + cfg.step)
    buckets = make_buckets(cfg)
    exact = buckets[:: 3]  # images of exactly a bucket's size take it
    tie_w, tie_h = np.array([s[0] for s, _ in TIES]), np.array([s[1] for s, _ in TIES])
    w, h = np.concatenate([w, exact[:, 0], tie_w]), np.concatenate([h, exact[:, 1], tie_h])
    resos = ref_resos(cfg.resolution, cfg.min_side, cfg.max_side, cfg.step)
    assert sorted(map(tuple, buckets.tolist())) == resos
    ids = assign_buckets(w, h, buckets)
    for i, (iw, ih) in enumerate(zip(w.tolist(), h.tolist())):
        reso, resized = ref_select_bucket(iw, ih, resos, False, cfg.resolution**2, cfg.step)
        assert tuple(buckets[ids[i]]) == reso, (iw, ih)
        (rw, rh), crop = resize_plan(iw, ih, reso, cfg)
        assert (rw, rh) == resized and crop[:2] == ref_trim(resized, reso) and crop[2:] == (crop[0] + reso[0], crop[1] + reso[1])
        assert kohya_crop_ltrb(reso, (iw, ih)) == ref_get_crop_ltrb(reso, (iw, ih))  # exact floats
    if cfg == BucketConfig():
        for (iw, ih), kohya in TIES:
            assert tuple(buckets[assign_buckets(np.array([iw]), np.array([ih]), buckets)[0]]) == kohya


def test_no_upscale_bucket_and_resize_match_kohya() -> None:
    cfg = BucketConfig(no_upscale=True)
    w, h = _random_sizes(2000, 64, 3000, seed=7)
    assigner = BucketAssigner(cfg)
    ids = assigner.assign(w, h)
    for i, (iw, ih) in enumerate(zip(w.tolist(), h.tolist())):
        reso, resized = ref_select_bucket(iw, ih, [], True, cfg.resolution**2, cfg.step)
        assert tuple(assigner.buckets[ids[i]]) == reso, (iw, ih)
        (rw, rh), crop = resize_plan(iw, ih, reso, cfg)
        assert (rw, rh) == resized and crop[:2] == ref_trim(resized, reso), (iw, ih)
    small = (w * h <= cfg.resolution**2)
    assert small.sum() > 200  # both branches are exercised: images kept at their size, and shrunk ones


def test_a_bucket_that_does_not_fit_is_an_index_error() -> None:
    with pytest.raises(TunelabError, match="rebuild it with `tunelab data index`"):
        resize_plan(500, 300, (512, 320), BucketConfig(no_upscale=True))  # 500 px cannot fill 512


def test_conventions_convert_both_ways() -> None:
    # 800 x 1100 (ratio 0.7273) into 832 x 1152 (0.7222), worked by hand. kohya's get_crop_ltrb fits it
    # *inside*: width 832, height 832 / 0.7273 = 1144, centred: top (1152 - 1144) // 2 = 4. The real
    # resize covers the bucket: the image is relatively wider, so height 1152, width
    # int(800 * 1152 / 1100 + 0.5) = 838, and (838 - 832) // 2 = 3 px are cut on the left.
    size, bucket = (800, 1100), (832, 1152)
    kohya = ref_get_crop_ltrb(bucket, size)
    assert kohya == (0, 4.0, 832, 1148.0)
    assert resize_plan(*size, bucket) == ((838, 1152), (3, 0, 835, 1152))
    real = (3.0, 0.0, 835.0, 1152.0)
    assert convert_crop_ltrb(kohya, "kohya", "crop", size, bucket) == real
    assert convert_crop_ltrb(real, "crop", "kohya", size, bucket) == kohya
    assert convert_crop_ltrb(kohya, "kohya", "kohya", size, bucket) == kohya  # the same convention: as stored
    assert crop_top_left(kohya) == ref_crop_top_left(kohya) == (4, 0)
    assert crop_top_left(real) == (0, 3)  # the two conventions offset different sides
    with pytest.raises(TunelabError, match="choose one of kohya, crop"):
        convert_crop_ltrb(kohya, "kohya", "paper", size, bucket)


# --- what the data loader feeds, on 200 random images -----------------------------------------------------

SMALL = BucketConfig(resolution=128, min_side=64, max_side=256, step=32)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kohya_crops") / "imgs"
    root.mkdir()
    w, h = _random_sizes(200, 40, 420, seed=3)
    for i, size in enumerate(zip(w.tolist(), h.tolist())):
        Image.new("RGB", size, (i, 100, 200)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"t{i}")
    return root


def _index(images: Path, out: Path, cfg: BucketConfig) -> IndexTable:
    build_index([f"folder:{images}"], out, IndexOptions(buckets=cfg, workers=2), progress=False)
    return IndexTable(out)


def _kohya_reference(rec: dict, cfg: BucketConfig) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(bucket, kohya's crop_top_left, the real crop's (top, left)) of one index row, by kohya."""
    resos = ref_resos(cfg.resolution, cfg.min_side, cfg.max_side, cfg.step)
    size = (rec["width"], rec["height"])
    reso, resized = ref_select_bucket(*size, resos, cfg.no_upscale, cfg.resolution**2, cfg.step)
    left, top = ref_trim(resized, reso)
    return reso, ref_crop_top_left(ref_get_crop_ltrb(reso, size)), (top, left)


@pytest.mark.parametrize("no_upscale", [False, True])
def test_loader_feeds_kohyas_crop_top_left_from_pixels(images: Path, tmp_path: Path, no_upscale: bool) -> None:
    cfg = SMALL.model_copy(update={"no_upscale": no_upscale})
    index = _index(images, tmp_path / "i.parquet", cfg)
    assert len(index) == 200
    kohya_ds, crop_ds = TrainDataset(index), TrainDataset(index, crop_conditioning="crop")
    differ = 0
    for row, rec in enumerate(index.records(range(len(index)))):
        reso, kohya_tl, real_tl = _kohya_reference(rec, cfg)
        sample = kohya_ds[(0, row)]
        assert (rec["bucket_width"], rec["bucket_height"]) == reso
        assert tuple(sample["pixels"].shape) == (3, reso[1], reso[0])
        assert sample["original_size_hw"] == (rec["height"], rec["width"])
        assert sample["crop_top_left"] == kohya_tl, rec
        assert crop_ds[(0, row)]["crop_top_left"] == real_tl, rec
        differ += kohya_tl != real_tl
    assert differ > 100  # the two conventions really differ on most images


def _old_shards(folder: Path, index: IndexTable, cfg: BucketConfig) -> None:
    """Shards as tunelab wrote them before the convention was recorded: the real crop, no record."""
    folder.mkdir()
    tensors, table = {}, {}
    for rec in index.records(range(len(index))):
        reso, _, (top, left) = _kohya_reference(rec, cfg)
        lat = np.zeros((4, reso[1] // 8, reso[0] // 8), np.float16)
        tensors[rec["key"]] = lat
        table[rec["key"]] = {"original_size": [rec["width"], rec["height"]],
                             "crop_ltrb": [left, top, left + reso[0], top + reso[1]], "checksum": checksum(lat)}
    save_file(tensors, str(folder / "shard-r000-old.safetensors"), metadata={META_KEY: json.dumps(table)})


def _kohya_npz(folder: Path, index: IndexTable, cfg: BucketConfig) -> None:
    """KEY.npz as sd-scripts' save_latents_to_disk writes them: float crop_ltrb from get_crop_ltrb."""
    folder.mkdir()
    for rec in index.records(range(len(index))):
        reso, _, _ = _kohya_reference(rec, cfg)
        np.savez(folder / f"{rec['key']}.npz", latents=np.zeros((4, reso[1] // 8, reso[0] // 8), np.float32),
                 original_size=np.array([rec["width"], rec["height"]]),
                 crop_ltrb=np.array(ref_get_crop_ltrb(reso, (rec["width"], rec["height"]))))


def _new_shards(folder: Path, index: IndexTable) -> None:
    folder.mkdir()
    entries = {}
    for rec in index.records(range(len(index))):
        bucket, size = (rec["bucket_width"], rec["bucket_height"]), (rec["width"], rec["height"])
        lat = np.zeros((4, bucket[1] // 8, bucket[0] // 8), np.float16)
        entries[rec["key"]] = (lat, {"original_size": list(size), "crop_ltrb": list(kohya_crop_ltrb(bucket, size))})
    _write_shard(folder, 0, entries)


def test_every_cache_and_the_pixels_feed_one_convention(images: Path, tmp_path: Path) -> None:
    index = _index(images, tmp_path / "i.parquet", SMALL)
    _old_shards(tmp_path / "old", index, SMALL)
    _kohya_npz(tmp_path / "kohya", index, SMALL)
    _new_shards(tmp_path / "new", index)
    sources = {name: open_latents(tmp_path / name, index) for name in ("old", "kohya", "new")}
    assert isinstance(sources["old"], LatentStore) and not isinstance(sources["kohya"], LatentStore)
    assert shard_header(next((tmp_path / "old").glob("shard-*")))[1] == "crop"  # no record: the old convention
    assert shard_header(next((tmp_path / "new").glob("shard-*")))[1] == "kohya"
    for wanted in ("kohya", "crop"):
        datasets = {name: TrainDataset(index, latents=src, crop_conditioning=wanted) for name, src in sources.items()}
        datasets["pixels"] = TrainDataset(index, crop_conditioning=wanted)
        for row, rec in enumerate(index.records(range(len(index)))):
            _, kohya_tl, real_tl = _kohya_reference(rec, SMALL)
            fed = {name: ds[(0, row)]["crop_top_left"] for name, ds in datasets.items()}
            assert set(fed.values()) == {kohya_tl if wanted == "kohya" else real_tl}, (wanted, rec["key"], fed)


def test_repair_keeps_a_shards_convention(tmp_path: Path) -> None:
    lat = np.zeros((4, 8, 8), np.float16)
    entries = {k: (lat, {"original_size": [70, 64], "crop_ltrb": [0.0, 2.0, 64.0, 60.0]}) for k in ("a", "b")}
    for convention in ("kohya", "crop"):
        folder = tmp_path / convention
        folder.mkdir()
        shard = _write_shard(folder, 0, entries, crop_convention=convention)
        _rewrite_without(shard, {"a"})
        table, kept = shard_header(shard)
        assert list(table) == ["b"] and kept == convention
        assert LatentStore(folder).get("b").crop_convention == convention


# --- EXIF orientation ---------------------------------------------------------------------------------


def _rotated_jpeg(path: Path) -> np.ndarray:
    """A 96 x 48 JPEG (as stored) with EXIF orientation 6: displayed 48 x 96."""
    pixels = np.zeros((48, 96, 3), np.uint8)
    pixels[:, :48] = (250, 10, 10)  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    return pixels


def test_exif_applied_by_default_and_kohyas_way_on_request(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    _rotated_jpeg(root / "r.jpg")
    (root / "r.txt").write_text("t")
    # buckets (32, 96), (32, 128), (64, 64), (96, 32), (128, 32); stored 96 x 48 (ratio 2) ties between
    # 64 x 64 and 96 x 32 and takes kohya's first, 64 x 64; upright 48 x 96 goes to 32 x 96.
    cfg = BucketConfig(resolution=64, min_side=32, max_side=128, step=32)
    upright, kohya = tmp_path / "upright.parquet", tmp_path / "kohya.parquet"
    build_index([f"folder:{root}"], upright, IndexOptions(buckets=cfg), progress=False)
    build_index([f"folder:{root}"], kohya, IndexOptions(buckets=cfg, exif_transpose=False), progress=False)
    a, b = IndexTable(upright), IndexTable(kohya)
    ra, rb = a.records([0])[0], b.records([0])[0]
    assert (ra["width"], ra["height"], ra["bucket_width"], ra["bucket_height"]) == (48, 96, 32, 96)
    assert (rb["width"], rb["height"], rb["bucket_width"], rb["bucket_height"]) == (96, 48, 64, 64)  # kohya's imagesize
    assert read_footer(upright)["exif_turned"] == read_footer(kohya)["exif_turned"] == 1
    assert read_footer(upright)["exif_transpose"] is True and read_footer(kohya)["exif_transpose"] is False
    as_stored = TrainDataset(b)[(0, 0)]
    red = as_stored["pixels"][0]  # (64, 64): 128 x 64 resized, 32 px cut each side; red was the stored left half
    assert as_stored["original_size_hw"] == (48, 96) and red[:, :16].mean() > 0.8 and red[:, -16:].mean() < -0.8
    red = TrainDataset(a)[(0, 0)]["pixels"][0]  # (96, 32): turned upright, the red half on top
    assert tuple(red.shape) == (96, 32) and red[:32].mean() > 0.8 and red[-32:].mean() < -0.8
    # kohya caches this image as stored: with the EXIF-turned index it is refused before training
    npz = tmp_path / "npz"
    npz.mkdir()
    for index, rec in ((a, ra), (b, rb)):
        bucket = (rec["bucket_width"], rec["bucket_height"])
        np.savez(npz / "r.npz", latents=np.zeros((4, bucket[1] // 8, bucket[0] // 8), np.float32),
                 original_size=np.array([96, 48]), crop_ltrb=np.array(ref_get_crop_ltrb(bucket, (96, 48))))
        if index is a:
            with pytest.raises(TunelabError, match="--no-exif-transpose"):
                open_latents(npz, index)
        else:
            fed = TrainDataset(index, latents=open_latents(npz, index))[(0, 0)]
            assert fed["original_size_hw"] == (48, 96) and fed["crop_top_left"] == (16, 0)


def test_indexes_from_before_the_choice_read_as_exif_applied(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (40, 80)).save(root / "a.png")
    out = tmp_path / "i.parquet"
    build_index([f"folder:{root}"], out, IndexOptions(buckets=SMALL), progress=False)
    footer = read_footer(out)
    assert footer["exif_transpose"] is True and footer["exif_turned"] == 0
    for key in ("exif_transpose", "exif_turned"):  # an index written before these keys existed
        del footer[key]
    table = pq.read_table(out)
    pq.write_table(table.replace_schema_metadata({b"tunelab.index": json.dumps(footer).encode()}), out)
    ds = TrainDataset(out, CaptionConfig())
    assert ds.exif_transpose is True and ds.buckets == SMALL
    rec = ds.index.records([0])[0]
    assert (rec["bucket_width"], rec["bucket_height"]) == (96, 160)  # ratio 0.5: 0.6 is nearer than 0.25
    assert ds[(0, 0)]["crop_top_left"] == ref_crop_top_left(ref_get_crop_ltrb((96, 160), (40, 80))) == (0, 8)

