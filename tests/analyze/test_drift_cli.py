"""`tunelab drift` end to end, through the installed console script in a real subprocess."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.analyze.test_drift import write_models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_drift_command_writes_json_csv_and_plots(tmp_path, cli):
    paths = write_models(tmp_path, 3, step=0.05)
    out = tmp_path / "report"
    proc = cli("drift", *paths, "--out", out, "--pair", "1,2", "--signs")
    assert "L2 distance from [0]" in proc.stdout and "problems: none" in proc.stdout
    assert "sign agreement of the moves from [0], [1] vs [2]" in proc.stdout
    assert "Traceback" not in proc.stderr

    doc = json.loads((out / "drift.json").read_text())
    assert doc["ml"] == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]
    assert list(doc["dm"]) == ["te1", "te2", "unet", "vae", "other", "all"]
    for name, m in doc["dm"].items():
        assert len(m) == 3 and all(len(row) == 3 for row in m)
        assert all(m[i][i] == 0 for i in range(3))
        assert all(m[i][j] == m[j][i] > 0 for i in range(3) for j in range(3) if i != j), name
    # The trajectory grows: each checkpoint adds noise on top of the last.
    assert doc["dm"]["all"][0][1] < doc["dm"]["all"][0][2]
    for section in ("blocks", "kinds"):
        assert doc[section]
    assert set(doc["relative"]) == {"components", "blocks", "kinds"}
    assert doc["cosine_deltas"]["components"]["unet"][0] == [None, None, None]
    signs = doc["sign_agreement"]["components"]["unet"]  # independent noise: about half agree
    assert signs[0] == [None, None, None] and signs[1][1] == 1.0 and 0.3 < signs[1][2] == signs[2][1] < 0.7
    assert doc["problems"] == {"missing": [], "shape_mismatch": [], "non_finite": []}

    with (out / "drift.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["model_a"], r["model_b"]) for r in rows] == [
        ("m0.safetensors", "m1.safetensors"), ("m0.safetensors", "m2.safetensors"), ("m1.safetensors", "m2.safetensors")]
    assert float(rows[2]["component.unet"]) == pytest.approx(doc["dm"]["unet"][1][2], rel=1e-8)
    assert {"block.M00", "kind.cross-attention", "component.all"} <= set(rows[0])
    with (out / "tensors.csv").open() as f:
        assert sum(1 for _ in csv.DictReader(f)) == 12 * 3  # every tensor, every pair

    pngs = ["trajectory.png", "blocks_1_vs_2.png", "heatmaps.png", "map.png"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_summary_lists_problems(tmp_path):
    from tunelab.analyze import drift

    def drop(i, sd):
        if i == 1:
            sd["model.diffusion_model.out.2.bias"] = torch.full((4,), float("nan"), dtype=torch.float16)

    paths = write_models(tmp_path, 2, edit=drop)
    rep = drift.run_drift(paths, tmp_path / "o", plots=False, progress=False)
    text = "\n".join(drift.summary(rep))
    assert "1 non-finite tensors" in text and "[0] m0.safetensors" in text
    assert rep.doc["problems"]["non_finite"] == [{"key": "model.diffusion_model.out.2.bias",
                                                 "model": "m1.safetensors", "count": 4}]
    assert not list((tmp_path / "o").glob("*.png"))


def test_drift_bad_input_is_one_line_error(tmp_path, cli, monkeypatch, capsys):
    from tunelab import cli as cli_module

    (p,) = write_models(tmp_path, 1)
    not_st = tmp_path / "model.ckpt"
    not_st.write_bytes(b"\x80\x02}q\x00pickle, not safetensors" * 10)
    # Through a real process once: exit status 2, one line on stderr, no traceback.
    proc = cli("drift", p, not_st, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "refusing a pickle file" in lines[0], proc.stderr
    # The other guards through the same entry point, in-process (each is tested in test_drift.py).
    for args, expected in [([str(p)], "at least 2"), ([str(p), str(p), "--pair", "0,7"], "out of range"),
                           ([str(p), str(p), "--pair", "first"], "two model indices")]:
        monkeypatch.setattr("sys.argv", ["tunelab", "drift", *args, "--out", str(tmp_path / "x")])
        with pytest.raises(SystemExit) as exit_:
            cli_module.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "x").exists()  # nothing written before the inputs were checked
