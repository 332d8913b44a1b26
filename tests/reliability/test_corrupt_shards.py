"""Corrupt latent shards — truncated, bit-flipped, deleted — are found by their checksums and
repaired; the repaired cache holds bitwise the latents of the untouched one, so training from it
is unaffected (a run is a function of its latents: tests/train/test_trainer.py shows resume and
replay are bitwise)."""

from __future__ import annotations

import torch

from tunelab.data.latents import LatentStore, cache_latents, repair_cache, verify_cache


def test_truncated_flipped_and_deleted_shards_are_found_and_repaired_bitwise(tmp_path, world):
    from diffusers import AutoencoderKL

    from tunelab.models.arch import load_arch

    torch.manual_seed(0)
    vae = AutoencoderKL(**load_arch("toy").vae).eval()
    cache = tmp_path / "cache"
    cache_latents(world, cache, vae, batch_size=1, shard_size=4, progress=False)  # 24 images, 6 shards
    store = LatentStore(cache)
    before = {k: store.get(k).latents.copy() for k in store.keys()}
    shards = sorted(cache.glob("shard-*.safetensors"))
    assert len(shards) == 6 and len(before) == 24

    truncated, flipped, deleted = shards[0], shards[2], shards[4]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 2 // 3])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2 + 5] ^= 0x04  # one bit inside the tensors
    flipped.write_bytes(bytes(data))
    deleted.unlink()

    report = verify_cache(world, cache, progress=False)
    assert not report.ok and report.bad_shards == [truncated.name] and list(report.corrupt) == [flipped.name]
    assert len(report.corrupt[flipped.name]) == 1 and report.entries_ok == 15
    assert len(report.missing) == 9  # the truncated and the deleted shard's 4 each, and the corrupt entry

    fixed = repair_cache(world, cache, vae, batch_size=1, progress=False)
    assert fixed.ok and fixed.entries_ok == 24 and not fixed.duplicates, fixed.text()
    after = LatentStore(cache)
    assert sorted(after.keys()) == sorted(before)
    for key, arr in before.items():
        assert (after.get(key).latents == arr).all(), key  # re-encoded one image at a time: bitwise
