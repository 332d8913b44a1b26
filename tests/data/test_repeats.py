"""kohya's folder repeats (`10_astolfo/` -> every image in it counts 10 times per epoch): the folder
name rule, what the folder source indexes and leaves out, the `repeats` column, and a sampler that
repeats rows within an epoch while staying deterministic, resumable and shardable.

The rules matched are kohya-ss/sd-scripts':
- library/config_util.py, `generate_dreambooth_subsets_config_by_subdirs` ->
  `extract_dreambooth_params(name)`: `tokens = name.split("_")`, `n_repeats = int(tokens[0])`; a
  ValueError means "ignore directory without repeats"; `num_repeats < 1` is skipped too; the rest,
  `"_".join(tokens[1:])`, is the class token used when an image has no caption file. Only the
  immediate sub-folders of the train folder are read (`base_dir.iterdir()`).
- library/train_util.py, `DreamBoothDataset.load_dreambooth_dir`: `glob_images(subset.image_dir,
  "*")` — the images directly in the folder, not below it.
- library/train_util.py, `BaseDataset.make_buckets`: `for _ in range(image_info.num_repeats):
  self.bucket_manager.add_image(...)` — an epoch is every copy; kohya logs "N train images with
  repeating".
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tunelab.data.captions import CaptionConfig
from tunelab.data.index import (
    META_KEY, IndexOptions, _canonical_bytes, build_index, index_digest, index_stats, read_footer, stats_text,
)
from tunelab.data.loader import BucketBatchSampler, IndexTable, TrainDataset
from tunelab.data.sources import kohya_repeats
from tunelab.errors import TunelabError

from .conftest import write_image


@pytest.mark.parametrize("name, expected", [
    ("10_astolfo", (10, "astolfo")),
    ("3_sks dog", (3, "sks dog")),
    ("2_pink_hair", (2, "pink_hair")),  # only the first "_" separates the count
    ("10", (10, "")),
    ("05_x", (5, "x")),
    ("0_off", (0, "off")),  # parsed, then skipped (< 1)
    ("-1_x", (-1, "x")),
    ("misc", None),
    ("astolfo_10", None),
    ("1e3_x", None),
])
def test_folder_name_rule_is_kohyas_extract_dreambooth_params(name, expected) -> None:
    assert kohya_repeats(name) == expected


def _kohya_tree(root: Path) -> Path:
    for i in range(3):
        write_image(root / "10_astolfo" / f"a{i}.png", (64, 64))
    (root / "10_astolfo" / "a0.txt").write_text("astolfo, pink_hair")
    (root / "10_astolfo" / "a1.caption").write_text("A knight.")
    write_image(root / "2_sks dog" / "d0.png", (64, 64))
    write_image(root / "misc" / "m0.png", (64, 64))  # no count: kohya ignores the folder
    write_image(root / "0_off" / "o0.png", (64, 64))  # count 0: ignored
    write_image(root / "loose.png", (64, 64))  # directly in the train folder: ignored
    write_image(root / "10_astolfo" / "sub" / "n0.png", (64, 64))  # below an N_ folder: not globbed
    return root


def test_folder_source_reads_kohya_layout_with_repeats(tmp_path: Path, caplog) -> None:
    root = _kohya_tree(tmp_path / "train")
    opts = IndexOptions(holdout=0.0)
    with caplog.at_level(logging.INFO, logger="tunelab.data.sources"):
        summary = build_index([f"folder:{root}"], tmp_path / "i.parquet", opts, progress=False)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "i.parquet").to_pylist()}
    assert sorted(rows) == ["10_astolfo/a0", "10_astolfo/a1", "10_astolfo/a2", "2_sks dog/d0"]
    assert [rows[k]["repeats"] for k in sorted(rows)] == [10, 10, 10, 2]
    # kohya's caption fallback: no caption file -> the folder's class tokens
    assert rows["10_astolfo/a0"]["tags"] == "astolfo, pink_hair"
    assert rows["10_astolfo/a1"]["tags"] is None and rows["10_astolfo/a1"]["caption"] == "A knight."
    assert rows["10_astolfo/a2"]["tags"] == "astolfo" and rows["2_sks dog/d0"]["tags"] == "sks dog"
    assert summary.rows == 4 and summary.train_samples == 32  # kohya: "32 train images with repeating"
    assert read_footer(tmp_path / "i.parquet")["train_samples"] == 32
    # Nothing is left out silently.
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "2 image(s) in folders without a repeat count (0_off, misc)" in warning
    assert "1 image(s) directly in train/" in warning and "1 image(s) in folders below" in warning
    assert "--no-repeats" in warning
    assert any("10_astolfo x10 (3 images)" in r.getMessage() for r in caplog.records)
    stats = index_stats(tmp_path / "i.parquet", progress=False)
    assert stats["samples_per_split"] == {"train": 32} and stats["rows"] == 4
    assert "samples per epoch (images x repeats): train 32 from 4 images" in stats_text(stats)


def test_no_repeats_reads_the_layout_as_a_plain_folder(tmp_path: Path) -> None:
    root = _kohya_tree(tmp_path / "train")
    summary = build_index([f"folder:{root}"], tmp_path / "i.parquet", IndexOptions(repeats=False), progress=False)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "i.parquet").to_pylist()}
    assert len(rows) == 8 and summary.train_samples == 8 and {r["repeats"] for r in rows.values()} == {1}
    assert rows["10_astolfo/a2"]["tags"] is None  # a plain folder: no class-token fallback
    assert read_footer(tmp_path / "i.parquet")["repeats"] is False


def test_a_folder_without_counted_subfolders_is_unchanged(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "a.png", (64, 64))
    write_image(tmp_path / "imgs" / "photos" / "b.png", (64, 64))
    build_index([f"folder:{tmp_path / 'imgs'}"], tmp_path / "i.parquet", progress=False)
    rows = {r["key"]: r["repeats"] for r in pq.read_table(tmp_path / "i.parquet").to_pylist()}
    assert rows == {"a": 1, "photos/b": 1}


def test_index_without_repeats_column_reads_as_ones_and_keeps_its_digest(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "imgs" / f"{i}.png", (64, 64))
    build_index([f"folder:{tmp_path / 'imgs'}"], tmp_path / "new.parquet", progress=False)
    footer = pq.ParquetFile(tmp_path / "new.parquet").metadata.metadata[META_KEY]
    old = pq.read_table(tmp_path / "new.parquet").drop_columns(["repeats"])  # written before the column existed
    pq.write_table(old.replace_schema_metadata({META_KEY: footer}), tmp_path / "old.parquet")
    assert IndexTable(tmp_path / "old.parquet").repeats().tolist() == [1, 1, 1, 1]
    assert index_stats(tmp_path / "old.parquet", progress=False)["samples_per_split"] == {"train": 4}
    # The digest of an old index is what it was before repeats existed (runs on it still resume).
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(json.loads(footer), sort_keys=True).encode())
    for name in ("key", "bucket", "split"):
        h.update(_canonical_bytes(old[name].combine_chunks()))
    assert index_digest(tmp_path / "old.parquet") == h.hexdigest() != index_digest(tmp_path / "new.parquet")


# --- the sampler -------------------------------------------------------------------------------------

BUCKETS = np.random.default_rng(0).integers(0, 3, 60).astype(np.int16)
REPEATS = np.random.default_rng(1).integers(1, 5, 60)


def _items(batches):
    return [tuple(i) for b in batches for i in b]


def test_sampler_repeats_rows_within_one_epoch() -> None:
    s = BucketBatchSampler(BUCKETS, 4, seed=1, repeats=REPEATS, drop_last=False)
    epoch0 = list(s)
    assert s.num_samples == REPEATS.sum() and sum(len(b) for b in epoch0) == REPEATS.sum()
    rows = [i[1] for b in epoch0 for i in b]
    assert np.bincount(rows, minlength=60).tolist() == REPEATS.tolist()  # each row, repeats times
    copies = sorted((i[1], i[2] if len(i) == 3 else 0) for b in epoch0 for i in b)
    assert copies == sorted((r, c) for r in range(60) for c in range(REPEATS[r]))  # copy 0 is a pair
    assert all(len({BUCKETS[i[1]] for i in b}) == 1 for b in epoch0)  # one bucket per batch
    again = BucketBatchSampler(BUCKETS, 4, seed=1, repeats=REPEATS, drop_last=False)
    assert list(again) == epoch0 and list(s) != epoch0  # deterministic, reshuffled per epoch
    # All-ones repeats are exactly the sampler without repeats (runs from before keep their batches).
    plain = BucketBatchSampler(BUCKETS, 4, seed=1)
    assert list(BucketBatchSampler(BUCKETS, 4, seed=1, repeats=np.ones(60))) == list(plain)
    with pytest.raises(TunelabError, match="repeats"):
        BucketBatchSampler(BUCKETS, 4, repeats=np.zeros(60))


def test_sampler_with_repeats_resumes_exactly_and_shards() -> None:
    full = BucketBatchSampler(BUCKETS, 4, seed=3, repeats=REPEATS)
    reference = list(full)
    s = BucketBatchSampler(BUCKETS, 4, seed=3, repeats=REPEATS)
    it = iter(s)
    seen = [next(it) for _ in range(5)]
    resumed = BucketBatchSampler(BUCKETS, 4, seed=3, repeats=REPEATS)
    resumed.load_state_dict(s.state_dict())
    assert seen + list(resumed) == reference
    ranks = [list(BucketBatchSampler(BUCKETS, 4, seed=3, rank=r, world_size=2, repeats=REPEATS)) for r in range(2)]
    assert [b for step in zip(*ranks) for b in step] == reference[: 2 * len(ranks[0])]
    with pytest.raises(TunelabError, match="num_samples"):  # repeats changed under a run: refused
        BucketBatchSampler(BUCKETS, 4, seed=3, repeats=REPEATS + 1).load_state_dict(s.state_dict())


def test_each_copy_gets_its_own_prompt(tmp_path: Path) -> None:
    root = tmp_path / "train"
    write_image(root / "3_x" / "a.png", (64, 64))
    (root / "3_x" / "a.txt").write_text(", ".join(f"tag{i}" for i in range(12)))
    build_index([f"folder:{root}"], tmp_path / "i.parquet", progress=False)
    ds = TrainDataset(tmp_path / "i.parquet", CaptionConfig(shuffle_tags=True), seed=0)
    prompts = [ds[item]["prompt"] for item in [(0, 0), (0, 0, 1), (0, 0, 2)]]
    assert len(set(prompts)) == 3  # kohya draws a fresh shuffle per copy too
    assert ds[(0, 0, 1)]["prompt"] == prompts[1]  # and each is reproducible


def test_trainer_banner_shows_images_and_samples_per_epoch(tmp_path: Path) -> None:
    from tests.train.conftest import write_run
    from tunelab.config import load_config
    from tunelab.train.trainer import banner, setup

    root = tmp_path / "train"
    for i in range(4):
        write_image(root / "5_a" / f"{i}.png", (64, 64))
    write_image(root / "1_b" / "x.png", (64, 64))
    build_index([f"folder:{root}"], tmp_path / "i.parquet", progress=False)
    cfg = load_config(write_run(tmp_path / "r.toml", tmp_path / "i.parquet", tmp_path / "run"))
    s = setup(cfg, dry_run=True)
    line = next(line for line in banner(s) if line.startswith("dataset"))
    assert line.startswith("dataset 5 images, 21 samples per epoch with repeats (train split)")
    assert s.data.steps_per_epoch == 21 // 2  # batch 2, accumulation 1: epochs are counted in samples
