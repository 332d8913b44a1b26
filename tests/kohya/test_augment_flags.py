"""kohya's --flip_aug and --random_crop (flags and dataset-TOML subset keys) become data.flip_aug and
data.random_crop; --random_crop with --cache_latents_to_disk, which sdxl_train.py refuses
(`assert train_dataset_group.is_latent_cacheable()`, library/train_util.py
`BaseDataset.is_latent_cacheable`: no color_aug, no random_crop), converts to a run that encodes
images while training, and the result passes the config checks."""

from __future__ import annotations

import tomllib
from pathlib import Path

from tunelab.config import parse_config
from tunelab.kohya.convert import convert
from tunelab.kohya.shell import parse_words


def _settings(line: str) -> tuple[dict, object]:
    result = convert(parse_words(line.split()), "idx.parquet")
    return tomllib.loads(result.text), result.conversion


def test_flip_aug_keeps_the_npz_cache_and_random_crop_drops_it():
    doc, c = _settings("sdxl_train.py --train_data_dir=/data/img --flip_aug --cache_latents_to_disk")
    assert doc["data"]["flip_aug"] is True and doc["data"]["latents"] == "/data/img"
    assert {r.flag: r.status for r in c.rows}["flip_aug"] == "mapped"
    doc, c = _settings("sdxl_train.py --train_data_dir=/data/img --random_crop --cache_latents_to_disk")
    assert doc["data"]["random_crop"] is True and "latents" not in doc["data"]
    assert any("kohya refuses the two together" in n for n in c.notes)
    parse_config(doc)  # config check's rules: random_crop without a cache passes
    doc, c = _settings("sdxl_train.py --train_data_dir=/data/img --random_crop")
    assert doc["data"]["random_crop"] is True and not any("refuses" in n for n in c.notes)


def test_dataset_toml_subsets_carry_the_augmentations(tmp_path: Path):
    (tmp_path / "ds.toml").write_text("""
[general]
flip_aug = true

[[datasets]]
  [[datasets.subsets]]
  image_dir = "/data/a"
  random_crop = true
  [[datasets.subsets]]
  image_dir = "/data/b"
""")
    doc, c = _settings(f"sdxl_train.py --dataset_config={tmp_path / 'ds.toml'}")
    assert doc["data"]["flip_aug"] is True and doc["data"]["random_crop"] is True
    assert any("data.random_crop: subsets differ" in n for n in c.notes)  # one value per run: the first subset's
    assert not any("flip_aug" in n and "not supported" in n for n in c.notes)
