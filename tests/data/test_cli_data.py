"""`tunelab data ...` end to end, through the installed console script in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import write_image

TUNELAB = str(Path(sys.executable).with_name("tunelab"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TUNELAB, *args], capture_output=True, text=True, timeout=120)


def test_index_then_stats(tmp_path: Path) -> None:
    for i in range(6):
        write_image(tmp_path / "imgs" / f"{i}.png", (512 + 64 * i, 512))
        (tmp_path / "imgs" / f"{i}.txt").write_text("astolfo, pink_hair" if i < 4 else "solo")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"")
    out = tmp_path / "idx.parquet"
    res = _run("data", "index", "--out", str(out), "--source", f"folder:{tmp_path / 'imgs'},prefix=mine/",
               "--where-tag", "pink hair", "--holdout", "0.25")
    assert res.returncode == 0, res.stderr
    assert "4 images, 1 rejected" in res.stdout and "mean aspect error" in res.stdout
    res = _run("data", "stats", str(out), "--json")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    assert stats["rows"] == 4 and stats["per_source"] == {"mine": 4}
    assert dict(stats["top_tags"])["astolfo"] == 4
    res = _run("data", "stats", str(out))
    assert "with caption: 0 (0.0%)" in res.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    res = _run("data", "index", "--out", str(tmp_path / "x.parquet"), "--source", "imgs")
    assert res.returncode == 2 and res.stderr.startswith("error: source 'imgs'") and "Traceback" not in res.stderr
    res = _run("data", "index", "--out", str(tmp_path / "x.parquet"), "--source", f"folder:{tmp_path}", "--min-side", "250")
    assert res.returncode == 2 and "bucket options" in res.stderr
    res = _run("data", "stats", str(tmp_path / "missing.parquet"))
    assert res.returncode == 2 and "tunelab data index" in res.stderr


def _small_index(tmp_path: Path) -> Path:
    for i in range(5):
        write_image(tmp_path / "imgs" / f"{i}.png", ((64, 64), (128, 32))[i % 2])
        (tmp_path / "imgs" / f"{i}.txt").write_text(", ".join(f"tag_{j}" for j in range(10 + 30 * i)))
        (tmp_path / "imgs" / f"{i}.caption").write_text(f"picture number {i}")
    out = tmp_path / "idx.parquet"
    res = _run("data", "index", "--out", str(out), "-s", f"folder:{tmp_path / 'imgs'}",
               "--resolution", "64", "--min-side", "32", "--max-side", "128", "--step", "32")
    assert res.returncode == 0, res.stderr
    return out


def test_preview_shows_prompts_tokens_and_truncation(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app

    index = _small_index(tmp_path)
    # In-process: a subprocess would import transformers again (the index step above is the e2e one).
    res = CliRunner().invoke(app, ["data", "preview", str(index), "--n-prompts", "5", "--mode", "concat", "--max-chunks", "1"])
    assert res.exit_code == 0, res.output
    assert "picture number 0" in res.output and "TE1" in res.output
    assert "TRUNCATED" in res.output and "fits" in res.output
    assert "exceed max_chunks=1" in res.output


@pytest.mark.slow
def test_cache_verify_repair_cli(tmp_path: Path) -> None:
    index = _small_index(tmp_path)
    cache = tmp_path / "cache"
    res = _run("data", "cache", str(index), "--out", str(cache), "--model", "toy", "--shard-size", "2")
    assert res.returncode == 0, res.stderr
    assert "encoded 5" in res.stdout
    assert _run("data", "verify", str(index), "--latents", str(cache)).returncode == 0
    shard = sorted(cache.glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    res = _run("data", "verify", str(index), "--latents", str(cache))
    assert res.returncode == 1 and "1 unreadable shards" in res.stdout
    res = _run("data", "verify", str(index), "--latents", str(cache), "--repair")
    assert res.returncode == 2 and "--model" in res.stderr
    res = _run("data", "verify", str(index), "--latents", str(cache), "--repair", "--model", "toy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "after repair: " in res.stdout and "0 missing" in res.stdout.split("after repair: ")[1]


def test_index_kohya_repeats_no_repeats_and_bucket_no_upscale(tmp_path: Path) -> None:
    train = tmp_path / "train"
    write_image(train / "10_astolfo" / "a.png", (1000, 700))  # within 1024²: no-upscale bucket 960 x 640
    write_image(train / "10_astolfo" / "b.png", (300, 200))  # small: 256 x 192, never enlarged
    write_image(train / "2_misc" / "tiny.png", (40, 300))  # under one 64-px step wide: rejected
    write_image(train / "photos" / "c.png", (512, 512))  # no count: left out, as in kohya
    out = tmp_path / "idx.parquet"
    res = _run("data", "index", "--out", str(out), "-s", f"folder:{train}", "--bucket-no-upscale")
    assert res.returncode == 0, res.stderr
    assert "2 images, 1 rejected" in res.stdout and "samples per epoch (train split, images x repeats): 20" in res.stdout
    assert "10_astolfo x10 (2 images)" in res.stderr and "1 image(s) in folders without a repeat count (photos)" in res.stderr
    assert "960 x 640" in res.stdout and "256 x 192" in res.stdout
    rejects = (tmp_path / "idx.rejects.jsonl").read_text()
    assert "tiny" in rejects and "no_upscale never enlarges" in rejects
    stats = json.loads(_run("data", "stats", str(out), "--json").stdout)
    assert stats["samples_per_split"] == {"train": 20} and sorted(stats["buckets"]) == [[256, 192], [960, 640]]
    res = _run("data", "index", "--out", str(out), "-s", f"folder:{train}", "--no-repeats", "--no-exif-transpose")
    assert res.returncode == 0, res.stderr
    assert json.loads(pq.ParquetFile(out).metadata.metadata[b"tunelab.index"])["exif_transpose"] is False
    assert "4 images, 0 rejected" in res.stdout and "images x repeats): 4" in res.stdout
    assert "samples per epoch (images x repeats): train 4 from 4 images" in _run("data", "stats", str(out)).stdout
