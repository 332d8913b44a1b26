"""Latent shards with the toy VAE: cache, checksums, verify + repair, resume after a kill; kohya .npz."""

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
    cache_latents,
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
    assert e2.original_size == (768, 1024) and e2.crop_ltrb == (0, 0, 0, 0)
    assert src.get("nope") is None
    with pytest.raises(TunelabError, match="re-cache"):
        src.get("img3")
