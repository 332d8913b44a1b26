"""Latent shards with the toy VAE: cache, checksums, verify + repair, resume after a kill; kohya .npz
folders, and `open_latents` telling the layouts apart."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tunelab.data.buckets import BucketConfig
from tunelab.data.captions import CaptionConfig
from tunelab.data.index import IndexOptions, build_index
from tunelab.data.latents import (
    KohyaNpzLatents,
    LatentStore,
    _write_shard,
    cache_latents,
    open_latents,
    repair_cache,
    verify_cache,
)
from tunelab.data.loader import BucketBatchSampler, IndexTable, TrainDataset, collate
from tunelab.errors import TunelabError

from .conftest import write_image

SMALL = IndexOptions(buckets=BucketConfig(resolution=64, min_side=32, max_side=128, step=32))


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return _toy_vae()


def _toy_vae() -> torch.nn.Module:
    """Only the toy preset's VAE (building the whole toy model is slower and not needed here)."""
    from diffusers import AutoencoderKL

    from tunelab.models.arch import load_arch

    torch.manual_seed(0)
    return AutoencoderKL(**load_arch("toy").vae).eval()


def _index(tmp_path: Path, n: int = 8, broken: bool = False) -> Path:
    root = tmp_path / "imgs"
    for i in range(n):
        write_image(root / f"{i:02d}.png", ((64, 64), (128, 32), (32, 128))[i % 3])
        (root / f"{i:02d}.txt").write_text(f"t{i}")
    if broken:
        write_image(root / "zz.png", (64, 64))
    build_index([f"folder:{root}"], tmp_path / "i.parquet", SMALL, progress=False)
    if broken:
        (root / "zz.png").write_bytes(b"\x89PNG broken after indexing")
    return tmp_path / "i.parquet"


def test_cache_shards_checksums_and_training_from_latents(tmp_path: Path, vae: torch.nn.Module) -> None:
    index = _index(tmp_path, broken=True)
    summary = cache_latents(index, tmp_path / "cache", vae, batch_size=2, shard_size=3, progress=False)
    assert summary.encoded == 8 and summary.rejected == 1 and len(summary.shards_written) >= 2  # a shard closes once it holds ≥ 3
    store = LatentStore(tmp_path / "cache")
    assert len(store) == 8
    entry = store.get("01")
    assert entry.latents.dtype == np.float16 and entry.latents.shape == (4, 32 // 8, 128 // 8)
    assert entry.original_size == (128, 32) and entry.crop_ltrb == (0, 0, 128, 32)
    assert verify_cache(index, tmp_path / "cache", progress=False).ok  # the reject is not "missing"
    again = cache_latents(index, tmp_path / "cache", vae, progress=False)
    assert again.encoded == 0 and again.shards_written == []  # everything done: nothing redone
    table = IndexTable(index)
    ds = TrainDataset(table, CaptionConfig(), latents=store)
    rows = [r for r in range(len(table)) if table.keys([r])[0] != "zz"]
    sampler = BucketBatchSampler(table.bucket_ids()[rows], 2, rows=np.array(rows))
    batch = collate([ds[item] for item in next(iter(sampler))])
    assert batch["latents"].shape[0] == 2 and batch["latents"].dtype == torch.float32
    assert batch["original_size_hw"].shape == (2, 2)


def test_verify_and_repair_after_truncation_and_bit_flip(tmp_path: Path, vae: torch.nn.Module) -> None:
    index = _index(tmp_path)
    cache = tmp_path / "cache"
    cache_latents(index, cache, vae, batch_size=2, shard_size=3, progress=False)
    before = {k: LatentStore(cache).get(k).latents.copy() for k in LatentStore(cache).keys()}
    shards = sorted(cache.glob("shard-*.safetensors"))
    truncated, flipped = shards[0], shards[1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0x10  # one bit in the last tensor's bytes
    flipped.write_bytes(bytes(data))
    report = verify_cache(index, cache, progress=False)
    assert not report.ok and report.bad_shards == [truncated.name]
    assert len(report.corrupt[flipped.name]) == 1
    assert len(report.missing) >= 2  # what the truncated shard held
    with pytest.raises(TunelabError, match="corrupt"):
        LatentStore(cache).get(report.corrupt[flipped.name][0])
    fixed = repair_cache(index, cache, vae, batch_size=2, progress=False)
    assert fixed.ok and not fixed.duplicates and fixed.entries_ok == 8, fixed.text()
    store = LatentStore(cache)
    for key, arr in before.items():
        # The encode is deterministic (distribution mean), but a repair batches images differently
        # and CPU kernels may round differently per batch shape: equal to fp16 precision.
        np.testing.assert_allclose(store.get(key).latents.astype(np.float32), arr.astype(np.float32), rtol=0, atol=4e-3)
    assert (cache / f"{truncated.name}.bad").exists()


def _slow_caching(index: str, cache: str) -> None:
    """Runs in a forked child (diffusers already imported): caching slowed so the kill lands mid-run."""
    vae = _toy_vae()
    encode = vae.encode

    def slow_encode(x: torch.Tensor):
        time.sleep(0.3)
        return encode(x)

    vae.encode = slow_encode
    cache_latents(index, cache, vae, batch_size=1, shard_size=2, progress=False)


def test_resume_after_kill(tmp_path: Path, vae: torch.nn.Module) -> None:
    index = _index(tmp_path, n=12)
    cache = tmp_path / "cache"
    proc = mp.get_context("fork").Process(target=_slow_caching, args=(str(index), str(cache)))
    proc.start()
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("shard-*.safetensors"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # a real kill: no chance to flush, only whole shards survive
    proc.join()
    done = len(LatentStore(cache))
    assert 4 <= done < 12
    summary = cache_latents(index, cache, vae, batch_size=4, progress=False)
    assert summary.skipped_done == done and summary.encoded == 12 - done
    report = verify_cache(index, cache, progress=False)
    assert report.ok and report.entries_ok == 12 and not report.duplicates
    assert not list(cache.glob(".*.tmp"))


def test_two_ranks_split_the_work(tmp_path: Path, vae: torch.nn.Module) -> None:
    index = _index(tmp_path, n=7)
    cache = tmp_path / "cache"
    a = cache_latents(index, cache, vae, rank=0, world_size=2, progress=False)
    b = cache_latents(index, cache, vae, rank=1, world_size=2, progress=False)
    assert (a.encoded, b.encoded) == (4, 3)
    assert {p.name.split("-")[1] for p in cache.glob("shard-*")} == {"r000", "r001"}
    assert verify_cache(index, cache, progress=False).ok


def test_kohya_npz_read_as_is(tmp_path: Path) -> None:
    lat = np.random.default_rng(0).standard_normal((4, 128, 96)).astype(np.float16)
    (tmp_path / "sub").mkdir()
    np.savez(tmp_path / "sub" / "img1.npz", latents=lat, original_size=np.array([800, 1100]),
             crop_ltrb=np.array([0, 16, 768, 1040]))
    np.savez(tmp_path / "img2_0768x1024_sdxl.npz", latents=lat)  # newer naming, older keys only
    (tmp_path / "img3.npz").write_bytes(b"PK\x03\x04 not really a zip")
    src = KohyaNpzLatents(tmp_path)
    e = src.get("sub/img1")
    assert np.array_equal(e.latents, lat) and e.original_size == (800, 1100) and e.crop_ltrb == (0, 16, 768, 1040)
    e2 = src.get("img2")
    # no crop stored: what sd-scripts' get_crop_ltrb gives for a cache of its own bucket's size
    assert e2.original_size == (768, 1024) and e2.crop_ltrb == (0, 0, 768, 1024) and e2.crop_convention == "kohya"
    assert src.get("nope") is None
    with pytest.raises(TunelabError, match="re-cache"):
        src.get("img3")


# --- kohya folders through open_latents ---------------------------------------------------------------
# kohya's format (sd-scripts library/strategy_base.py `save_latents_to_disk`, strategy_sd.py
# `get_latents_npz_path`): np.savez with `latents` float32 (4, H/8, W/8), `original_size` [w, h],
# `crop_ltrb` [l, t, r, b]; named IMAGE.npz (older) or IMAGE_WWWWxHHHH_sdxl.npz (original size).


def _kohya_npz(path: Path, rec: dict, seed: int) -> np.ndarray:
    bw, bh = rec["bucket_width"], rec["bucket_height"]
    lat = np.random.default_rng(seed).standard_normal((4, bh // 8, bw // 8)).astype(np.float32)
    np.savez(path, latents=lat, original_size=np.array([rec["width"], rec["height"]]),
             crop_ltrb=np.array([seed % 3, 2 * (seed % 3), bw, bh]), latents_flipped=lat[:, :, ::-1])
    return lat


def _kohya_beside_images(index: Path) -> tuple[IndexTable, dict[str, np.ndarray]]:
    """An .npz beside every image, half in the old naming and half in the sized one."""
    table = IndexTable(index)
    written = {}
    for i, rec in enumerate(table.records(range(len(table)))):
        stem = os.path.splitext(rec["path"])[0]
        name = f"{stem}.npz" if i % 2 else f"{stem}_{rec['width']:04d}x{rec['height']:04d}_sdxl.npz"
        written[rec["key"]] = _kohya_npz(Path(name), rec, i)
    return table, written


def test_open_latents_trains_from_kohya_npz_beside_the_images(tmp_path: Path) -> None:
    table, written = _kohya_beside_images(_index(tmp_path, n=9))
    source = open_latents(tmp_path / "imgs", table)
    assert isinstance(source, KohyaNpzLatents)
    ds = TrainDataset(table, CaptionConfig(), latents=source)
    sampler = BucketBatchSampler(table.bucket_ids(), 3, shuffle=False)
    seen = 0
    for items in sampler:
        batch = collate([ds[item] for item in items])
        assert batch["latents"].dtype == torch.float32 and batch["latents"].shape[0] == 3
        for key, lat, size, crop in zip(batch["key"], batch["latents"], batch["original_size_hw"], batch["crop_top_left"]):
            np.testing.assert_array_equal(lat.numpy(), written[key])
            rec = next(r for r in table.records(range(len(table))) if r["key"] == key)
            assert tuple(size.tolist()) == (rec["height"], rec["width"])  # (h, w) from kohya's [w, h]
            i = list(written).index(key)
            assert tuple(crop.tolist()) == (2 * (i % 3), i % 3)  # (top, left) from kohya's ltrb
            seen += 1
    assert seen == 9


def test_open_latents_kohya_folder_by_key_and_tunelab_shards(tmp_path: Path) -> None:
    table = IndexTable(_index(tmp_path, n=4))
    cache = tmp_path / "kohya"  # kohya's fine-tuning layout: image_dir/KEY.npz, away from the images
    cache.mkdir()
    for i, rec in enumerate(table.records(range(len(table)))):
        _kohya_npz(cache / f"{rec['key']}.npz", rec, i)
    assert isinstance(open_latents(cache, table), KohyaNpzLatents)
    shards = tmp_path / "shards"
    shards.mkdir()
    rec = table.records([0])[0]
    lat = np.zeros((4, rec["bucket_height"] // 8, rec["bucket_width"] // 8), dtype=np.float16)
    _write_shard(shards, 0, {rec["key"]: (lat, {"original_size": [64, 64], "crop_ltrb": [0, 0, 64, 64]})})
    store = open_latents(shards, table)
    assert isinstance(store, LatentStore) and store.get(rec["key"]).latents.shape == lat.shape
    with pytest.raises(TunelabError, match="tunelab data cache"):
        TrainDataset(table, latents=store)[(0, 1)]  # not in any shard: LatentStore's own message


def test_kohya_size_in_the_name_is_the_header_size(tmp_path: Path) -> None:
    """kohya names files by the image header's size; the index has the displayed (EXIF-rotated) one."""
    rotated = {"key": "a", "path": str(tmp_path / "a.jpg"), "offset": None, "width": 600, "height": 800,
               "bucket_width": 64, "bucket_height": 96}
    np.savez(tmp_path / "a_0800x0600_sdxl.npz", latents=np.zeros((4, 12, 8), np.float32))
    assert KohyaNpzLatents(tmp_path).find("a", rotated) == tmp_path / "a_0800x0600_sdxl.npz"
    assert KohyaNpzLatents(tmp_path).get("a", rotated).original_size == (64, 96)  # no size stored: the latents'


def test_open_latents_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    index = _index(tmp_path, n=4)
    table = IndexTable(index)
    recs = table.records(range(len(table)))
    with pytest.raises(TunelabError, match="is not a folder.*shard-.*safetensors.*_sdxl.npz"):
        open_latents(tmp_path / "nope", table)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="is empty: expected tunelab latent shards"):
        open_latents(tmp_path / "empty", table)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(TunelabError, match="holds no latent caches"):
        open_latents(tmp_path / "other", table)
    sd = tmp_path / "sd"
    sd.mkdir()
    for rec in recs:
        _kohya_npz(sd / f"{rec['key']}_{rec['width']:04d}x{rec['height']:04d}_sd.npz", rec, 0)
    with pytest.raises(TunelabError, match="SD 1.x/2.x .*_sd.npz"):
        open_latents(sd, table)
    unlike = tmp_path / "unlike"
    unlike.mkdir()
    _kohya_npz(unlike / "something_else.npz", recs[0], 0)
    with pytest.raises(TunelabError, match="none named like the index's images"):
        open_latents(unlike, table)

    part = tmp_path / "part"
    part.mkdir()
    for i, rec in enumerate(recs[:-1]):  # the last image was never cached
        _kohya_npz(part / f"{rec['key']}.npz", rec, i)
    with pytest.raises(TunelabError, match=f"1 of 4 sampled images have no .npz.*{recs[-1]['key']}"):
        open_latents(part, table)
    with pytest.raises(TunelabError, match="--cache_latents_to_disk"):  # the dataset says the same mid-epoch
        TrainDataset(table, latents=KohyaNpzLatents(part))[(0, len(recs) - 1)]

    other_buckets = tmp_path / "buckets"
    other_buckets.mkdir()
    for i, rec in enumerate(recs):
        _kohya_npz(other_buckets / f"{rec['key']}.npz", {**rec, "bucket_width": 96, "bucket_height": 96}, i)
    with pytest.raises(TunelabError, match="96x96 bucket.*bucket settings kohya cached with"):
        open_latents(other_buckets, table)


# --- a shard folder must fit the index (issue 20, item 3) -----------------------------------------------
# Before: a cache from other buckets opened fine, and training died mid-epoch in collate with
# `stack expects each tensor to be equal size`.


def _other_buckets_index(tmp_path: Path) -> Path:
    """The same images as `_index`, indexed with other buckets (64x64 only)."""
    other = tmp_path / "other.parquet"
    build_index([f"folder:{tmp_path / 'imgs'}"], other,
                IndexOptions(buckets=BucketConfig(resolution=64, min_side=64, max_side=64, step=32)), progress=False)
    return other


def test_shard_folder_from_other_buckets_is_refused_when_opened(tmp_path: Path, vae: torch.nn.Module) -> None:
    from tunelab.data.latents import MANIFEST, check_agreement, read_manifest

    index = _index(tmp_path, n=6)
    cache = tmp_path / "cache"
    cache_latents(index, cache, vae, progress=False)
    assert read_manifest(cache)["bucket_config"] == SMALL.buckets.model_dump()
    table = IndexTable(index)
    check_agreement(open_latents(cache, table), table)  # the folder it was made for: fine

    other = _other_buckets_index(tmp_path)
    with pytest.raises(TunelabError, match=r"other buckets \(resolution 64, sides 32-128, step 32\).*"
                                           r"tunelab data cache .*other.parquet --out NEW_DIR"):
        open_latents(cache, IndexTable(other))
    (cache / MANIFEST).unlink()  # a folder cached before manifests: the shard headers' shapes say it
    with pytest.raises(TunelabError, match=r"latents of a (128x32|32x128) bucket .* puts it in 64x64.*--out NEW_DIR"):
        open_latents(cache, IndexTable(other))
    stranger = tmp_path / "stranger"  # shards of other images altogether
    stranger.mkdir()
    _write_shard(stranger, 0, {"x": (np.zeros((4, 8, 8), np.float16), {"original_size": [64, 64], "crop_ltrb": [0, 0, 64, 64]})})
    with pytest.raises(TunelabError, match="holds none of .* sampled images.*another index"):
        open_latents(stranger, table)


def test_caching_into_a_folder_of_other_buckets_is_refused(tmp_path: Path, vae: torch.nn.Module) -> None:
    index = _index(tmp_path, n=3)
    cache = tmp_path / "cache"
    cache_latents(index, cache, vae, progress=False)
    other = _other_buckets_index(tmp_path)
    with pytest.raises(TunelabError, match="cached from an index with other buckets.*--out NEW_DIR"):
        cache_latents(other, cache, vae, progress=False)  # a resume would keep the old sizes
    assert cache_latents(other, tmp_path / "new", vae, progress=False).encoded == 3


def test_run_file_buckets_must_match_the_index(tmp_path: Path) -> None:
    from tunelab.config import parse_config
    from tunelab.data.index import check_bucket_config, read_footer

    index = _index(tmp_path, n=3)
    footer = read_footer(index)
    given = parse_config({"data": {"index": str(index), "buckets": SMALL.buckets.model_dump()}}).data
    check_bucket_config(footer, given.given_buckets(), index)  # the same: fine
    assert parse_config({"data": {"index": str(index)}}).data.given_buckets() is None  # left out: the index's
    differs = parse_config({"data": {"index": str(index), "buckets": {"resolution": 1024}}}).data
    with pytest.raises(TunelabError, match=r"resolution = 1024 \(the index has 64\), min_side = 256 \(the index has 32\).*"
                                           r"tunelab data index --out .*i.parquet -s SOURCE... --resolution 1024 "
                                           r"--min-side 256 --max-side 1024 --step 64.*delete \[data.buckets\]"):
        check_bucket_config(footer, differs.given_buckets(), index)


def test_posterior_samples_as_kohya_caches_seeded_by_key_repaired_exactly(tmp_path: Path, vae: torch.nn.Module) -> None:
    """posterior = "sample" (kohya's latent_dist.sample()): mean + std x noise seeded by the key,
    so the same image gets the same sample on any rank and on a repair; never mixed with means."""
    from tunelab.data.latents import LatentStore, cache_latents, posterior_noise, read_manifest
    from tunelab.data.images import ImageRef, load_into_bucket

    index = _index(tmp_path, n=4)
    mean_dir, sample_dir = tmp_path / "mean", tmp_path / "sample"
    cache_latents(index, mean_dir, vae, batch_size=2, progress=False)
    cache_latents(index, sample_dir, vae, batch_size=2, progress=False, posterior="sample")
    assert read_manifest(sample_dir)["posterior"] == "sample" and read_manifest(mean_dir)["posterior"] == "mean"
    means, samples = LatentStore(mean_dir), LatentStore(sample_dir)
    rec = IndexTable(index).records([1])[0]
    pixels, _, _ = load_into_bucket(ImageRef(rec["path"], rec["offset"], rec["size"]), (rec["bucket_width"], rec["bucket_height"]))
    x = torch.from_numpy(pixels[None]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    expected = (dist.mean + dist.std * posterior_noise(rec["key"], tuple(dist.mean.shape[1:]))).numpy().astype(np.float16)
    np.testing.assert_array_equal(samples.get(rec["key"]).latents, expected[0])
    assert not np.array_equal(samples.get(rec["key"]).latents, means.get(rec["key"]).latents)
    # a repair re-encodes what was lost with the folder's own posterior: the same sample
    before = samples.get(rec["key"]).latents.copy()
    for shard in sample_dir.glob("shard-*.safetensors"):
        shard.unlink()
    repair_cache(index, sample_dir, vae, batch_size=2, progress=False)
    np.testing.assert_array_equal(LatentStore(sample_dir).get(rec["key"]).latents, before)
    with pytest.raises(TunelabError, match="would mix the two"):
        cache_latents(index, sample_dir, vae, posterior="mean", progress=False)


def test_data_cache_writes_kohyas_crop_convention_and_records_it(tmp_path: Path, vae: torch.nn.Module) -> None:
    from tunelab.data.latents import shard_header

    from .test_kohya_crops import _kohya_reference, ref_get_crop_ltrb

    root = tmp_path / "imgs"
    for i, size in enumerate([(70, 50), (45, 100), (130, 90)]):  # none fits its bucket exactly
        write_image(root / f"{i}.png", size)
    build_index([f"folder:{root}"], tmp_path / "i.parquet", SMALL, progress=False)
    cache_latents(tmp_path / "i.parquet", tmp_path / "cache", vae, progress=False)
    assert {shard_header(p)[1] for p in (tmp_path / "cache").glob("shard-*")} == {"kohya"}
    index, store = IndexTable(tmp_path / "i.parquet"), LatentStore(tmp_path / "cache")
    real = TrainDataset(index, latents=store, crop_conditioning="crop")
    for row, rec in enumerate(index.records(range(len(index)))):
        reso, kohya_tl, real_tl = _kohya_reference(rec, SMALL.buckets)  # sd-scripts' get_crop_ltrb / trim
        entry = store.get(rec["key"])
        assert entry.crop_convention == "kohya" and entry.crop_ltrb == ref_get_crop_ltrb(reso, entry.original_size)
        assert TrainDataset(index, latents=store)[(0, row)]["crop_top_left"] == kohya_tl
        assert real[(0, row)]["crop_top_left"] == real_tl


def test_store_reads_by_the_header_it_parsed_once_and_a_shard_cut_later_raises(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    rng = np.random.default_rng(3)
    entries = {f"k{i}": (rng.standard_normal((4, 2 + i % 3, 3)).astype(np.float16 if i % 2 else np.float32),
                         {"original_size": [24, 16], "crop_ltrb": [0, 0, 24, 16]}) for i in range(7)}
    shard = _write_shard(tmp_path, 0, entries)
    store = LatentStore(tmp_path)
    reference = load_file(str(shard))  # safetensors' own reader
    for key in entries:
        got = store.get(key).latents
        assert got.dtype == reference[key].dtype and np.array_equal(got, reference[key]) and got.flags.writeable
        assert store.shape(key) == reference[key].shape
    shard.write_bytes(shard.read_bytes()[:-40])  # cut under the open store (the last tensor's bytes)
    last = max(entries, key=lambda k: store._layout[shard][1][k][3])
    with pytest.raises(TunelabError, match="shorter than its header says"):
        store.get(last)
