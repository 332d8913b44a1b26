"""Converted kohya runs train on the toy preset: a DreamBooth folder (N_concept, repeats) and a
metadata JSON with its .npz latents in both of kohya's cache layouts, fp16 and fp32 (written the
way sd-scripts' `save_latents_to_disk` writes them); `data verify` on such a folder; exact names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from tunelab.data.latents import KohyaNpzLatents, read_kohya_npz
from tunelab.errors import TunelabError

BUCKETS = "--resolution=80 --min_bucket_reso=32 --max_bucket_reso=128 --bucket_reso_steps=32"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from tunelab.toy.world import make_world

    root = tmp_path_factory.mktemp("kohya-world")
    make_world(root / "flat", n=8, seed=0, split="concept")
    return root


def _script(path: Path, flags: str) -> Path:
    from tunelab.toy.pretrain import shipped_base

    path.write_text("#!/bin/bash\n"
                    f"BASE={shipped_base()}\n"
                    "accelerate launch --num_processes 1 sdxl_train.py \\\n"
                    '  --pretrained_model_name_or_path="$BASE" \\\n'
                    f"  {BUCKETS} \\\n"
                    "  # --xformers \\\n"
                    "  --learning_rate=1e-5 --train_batch_size=2 --max_train_steps=2 --save_every_n_steps=2 \\\n"
                    f"  {flags}\n")
    return path


def _train(run_toml: Path) -> str:
    return run_cli("train", run_toml, timeout=600).stderr


@pytest.mark.slow  # repeats are also trained by the dataset-TOML test below
def test_a_dreambooth_folder_with_repeats_trains(world, tmp_path):
    img = tmp_path / "img" / "3_astolfo"
    img.mkdir(parents=True)
    for p in (world / "flat").glob("toy_0000[0-3].*"):
        shutil.copy(p, img / p.name)
    script = _script(tmp_path / "train.sh", f"--train_data_dir={tmp_path / 'img'} --caption_extension=.txt "
                                            f"--output_dir={tmp_path / 'run'} --shuffle_caption --keep_tokens=1")
    out = run_cli("config", "from-kohya", script, "--out", tmp_path / "run.toml", "--build-index")
    assert "index:" in out.stdout and "4 images" in out.stdout
    table = pq.read_table(tmp_path / "index.parquet").to_pylist()
    assert {r["repeats"] for r in table} == {3}  # kohya's N_concept count
    log = _train(tmp_path / "run.toml")
    assert "12 samples per epoch with repeats" in log
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()


def _kohya_npz(path: Path, latents: np.ndarray, size: tuple[int, int], per_resolution: bool) -> None:
    """As sd-scripts' strategy_base.save_latents_to_disk: latents, original_size [w, h], crop_ltrb;
    `_{h}x{w}` key suffixes (latent size) in the per-resolution layout."""
    suffix = f"_{latents.shape[1]}x{latents.shape[2]}" if per_resolution else ""
    kwargs = {"latents" + suffix: latents, "original_size" + suffix: np.array(size),
              "crop_ltrb" + suffix: np.array([0, 0, latents.shape[2] * 8, latents.shape[1] * 8])}
    if per_resolution:  # another bucket cached into the same file earlier
        kwargs["latents_4x4"] = np.zeros((4, 4, 4), np.float32)
    np.savez(path, **kwargs)


@pytest.mark.parametrize("per_resolution,dtype", [pytest.param(False, np.float32, marks=pytest.mark.slow),
                                                   (True, np.float16)])  # the classic layout: slow (and tests/data)
def test_metadata_json_and_its_npz_latents_train_without_reencoding(world, tmp_path, per_resolution, dtype):
    images = tmp_path / "train"
    shutil.copytree(world / "flat", images)
    meta = {p.stem: {"tags": p.with_suffix(".txt").read_text(), "caption": p.with_suffix(".caption").read_text()}
            for p in sorted(images.glob("*.png"))}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    script = _script(tmp_path / "train.sh", f"--in_json={tmp_path / 'meta.json'} --train_data_dir={images} "
                                            f"--cache_latents --cache_latents_to_disk --output_dir={tmp_path / 'run'}")
    run_cli("config", "from-kohya", script, "--out", tmp_path / "run.toml", "--build-index")
    from tunelab.data.index import read_footer

    assert read_footer(tmp_path / "index.parquet")["exif_transpose"] is False  # kohya ignores EXIF, as its caches do
    rng = np.random.default_rng(0)
    for rec in pq.read_table(tmp_path / "index.parquet").to_pylist():  # kohya cached with the same buckets
        lat = rng.standard_normal((4, rec["bucket_height"] // 8, rec["bucket_width"] // 8)).astype(dtype)
        name = images / (f"{rec['key']}_{rec['width']:04d}x{rec['height']:04d}_sdxl.npz" if per_resolution
                         else f"{rec['key']}.npz")
        _kohya_npz(name, lat, (rec["width"], rec["height"]), per_resolution)
    verify = run_cli("data", "verify", tmp_path / "index.parquet", "--latents", images)
    assert "8 good, 0 missing, 0 unusable" in verify.stdout
    check = run_cli("config", "check", tmp_path / "run.toml")
    assert "latents: kohya .npz" in check.stdout
    log = _train(tmp_path / "run.toml")
    assert "data.latents: kohya .npz caches" in log
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()
    # a damaged and a missing file are named by `data verify`, with what to do
    first = sorted(images.glob("*.npz"))
    first[0].write_bytes(b"PK\x03\x04 broken")
    first[1].unlink()
    bad = run_cli("data", "verify", tmp_path / "index.parquet", "--latents", images, check=False)
    assert bad.returncode == 1 and "1 missing, 1 unusable" in bad.stdout and "re-cache" in bad.stdout
    assert first[0].name in bad.stdout


def test_kohya_names_match_exactly_and_buckets_are_checked(tmp_path):
    lat = np.zeros((4, 8, 8), np.float32)
    np.savez(tmp_path / "img_0_0064x0064_sdxl.npz", latents=lat)
    np.savez(tmp_path / "photo_x.npz", latents=lat)
    kohya = KohyaNpzLatents(tmp_path)
    assert kohya.find("img") is None  # not img_0's file
    assert kohya.find("photo") is None  # not photo_x's
    assert kohya.find("img_0") == tmp_path / "img_0_0064x0064_sdxl.npz"
    rec = {"key": "p", "bucket_width": 96, "bucket_height": 64}
    _kohya_npz(tmp_path / "p.npz", np.ones((4, 8, 8), np.float32), (64, 64), per_resolution=True)
    with pytest.raises(TunelabError, match=r"holds latents for the bucket\(s\) 32x32, 64x64, but the index puts 'p' in 96x64"):
        read_kohya_npz(tmp_path / "p.npz", "p", rec)
    got = read_kohya_npz(tmp_path / "p.npz", "p", {"key": "p", "bucket_width": 64, "bucket_height": 64})
    assert got.latents.shape == (4, 8, 8) and float(got.latents.mean()) == 1.0 and got.original_size == (64, 64)
    np.savez(tmp_path / "q.npz", something=lat)
    with pytest.raises(TunelabError, match="no `latents` and no per-resolution"):
        read_kohya_npz(tmp_path / "q.npz", "q")


def test_a_windows_script_with_a_two_subset_dataset_toml_trains(world, tmp_path):
    from tunelab.toy.pretrain import shipped_base

    concept, general = tmp_path / "astolfo", tmp_path / "general"
    concept.mkdir()
    general.mkdir()
    for p in sorted((world / "flat").glob("toy_0000[0-2].png")):
        shutil.copy(p, concept / p.name)  # no caption files: kohya's class tokens become the prompt
    meta = {}
    for p in sorted((world / "flat").glob("toy_0000[3-7].png")):
        shutil.copy(p, general / p.name)
        meta[p.stem] = {"tags": p.with_suffix(".txt").read_text(), "caption": p.with_suffix(".caption").read_text()}
    (general / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "dataset.toml").write_text(
        '[general]\nshuffle_caption = true\nkeep_tokens = 1\ncaption_extension = ".txt"\n\n'
        "[[datasets]]\nresolution = 80\nbatch_size = 2\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 32\n\n"
        f'  [[datasets.subsets]]\n  image_dir = "{concept.as_posix()}"\n  num_repeats = 4\n  class_tokens = "astolfo, solo"\n\n'
        f'  [[datasets.subsets]]\n  image_dir = "{general.as_posix()}"\n  metadata_file = "{(general / "meta.json").as_posix()}"\n'
        "  num_repeats = 1\n")
    bat = tmp_path / "train.bat"
    bat.write_text("\r\n".join([
        "@echo off", "REM kohya on Windows, two subsets",
        f"set BASE={shipped_base()}",
        "accelerate launch --num_cpu_threads_per_process 2 sdxl_train.py ^",
        '  --pretrained_model_name_or_path="%BASE%" ^',
        f'  --dataset_config="{tmp_path / "dataset.toml"}" ^',
        ":: --xformers ^",
        f'  --output_dir="{tmp_path / "run"}" --output_name=two-subsets ^',
        "  --learning_rate=1e-5 --max_train_steps=2 --save_every_n_steps=2 ^",
        '  --optimizer_type=AdamW --optimizer_args "weight_decay=0.01" "eps=1e-8"',
    ]))
    out = run_cli("config", "from-kohya", bat, "--out", tmp_path / "run.toml", "--build-index")
    assert "8 images" in out.stdout
    rows = pq.read_table(tmp_path / "index.parquet").to_pylist()
    assert sorted(r["repeats"] for r in rows) == [1] * 5 + [4] * 3
    assert {r["tags"] for r in rows if r["repeats"] == 4} == {"astolfo, solo"}
    log = _train(tmp_path / "run.toml")
    assert "17 samples per epoch with repeats" in log  # 3 x 4 + 5 x 1
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()
