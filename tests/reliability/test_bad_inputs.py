"""Every kind of bad image and caption file through `data index`, `data cache` and `train` (real
processes): the jobs complete, each bad item is in a rejects log with its reason, each good item
(odd formats and odd text included) is indexed, cached and trained."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from tests.conftest import run_cli
from tests.reliability.corpus import KINDS_BAD, KINDS_GOOD_ODD, build
from tests.train.conftest import write_run


def test_bad_images_and_captions_lose_nothing_good(tmp_path):
    expect = build(tmp_path / "images")
    good = {k for k, e in expect.items() if e.good}
    assert len(expect) - len(good) == KINDS_BAD and len(good) - 6 == KINDS_GOOD_ODD  # 17 kinds besides plain images

    index = tmp_path / "index.parquet"
    run_cli("data", "index", "--out", index, "-s", f"folder:{tmp_path / 'images'}", "--resolution", "80",
            "--min-side", "32", "--max-side", "128", "--step", "32")
    latents = tmp_path / "latents"
    run_cli("data", "cache", index, "--out", latents, "--model", "toy")

    rejects = {}
    for log in [tmp_path / "index.rejects.jsonl", *latents.glob("rejects-r*.jsonl")]:
        for line in log.read_text().splitlines():
            row = json.loads(line)
            rejects[row["key"]] = row["reason"]
    assert set(rejects) == set(expect) - good, rejects
    for key, reason in rejects.items():
        assert expect[key].reason in reason, (key, reason)

    indexed = pq.read_table(index).to_pydict()
    rows = dict(zip(indexed["key"], range(len(indexed["key"]))))
    assert good <= set(rows)
    turned = rows["exif-rotated"]
    assert (indexed["width"][turned], indexed["height"][turned]) == (96, 64)  # EXIF orientation applied
    assert "\ufffd" in indexed["tags"][rows["non-utf8-caption"]]  # undecodable bytes replaced, not fatal
    assert indexed["tags"][rows["missing-caption"]] is None

    run = tmp_path / "run"
    cfg = write_run(tmp_path / "run.toml", index, run, data={"index": str(index), "latents": str(latents)},
                    train={"batch_size": 1, "max_steps": 0, "epochs": 1}, save={"every_n_steps": 0, "every_n_epochs": 1},
                    report={"enabled": False})
    proc = run_cli("train", cfg, timeout=900)
    out = proc.stdout + proc.stderr
    assert f"dataset {len(good)} images" in out  # the image the cache rejected is left out up front
    assert "left out of training" in out
    assert f"trained {len(good)} steps ({len(good)} samples)" in proc.stdout  # one epoch: every good image once
    assert (run / "checkpoints" / "last.safetensors").exists()
