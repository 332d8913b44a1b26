"""The foundation's commands through a real `tunelab` subprocess, as a user runs them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]

COMMANDS = [
    [], ["model"], ["model", "new"], ["model", "inspect"], ["model", "convert"], ["data"], ["config"],
    ["config", "check"], ["config", "show"], ["train"], ["grid"], ["probe"], ["loss"], ["drift"], ["merge"],
    ["merge", "run"], ["merge", "preset"], ["merge", "back"], ["merge", "upgrade"], ["merge", "evolve"], ["toy"], ["toy", "world"], ["toy", "pretrain"], ["toy", "score"], ["toy", "experiment"], ["demo"], ["report"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "tunelab")
def test_every_command_has_help(command):
    proc = run_cli(*command, "--help")
    assert "Usage:" in proc.stdout and len(proc.stdout.splitlines()) > 5


def test_version():
    from tunelab import __version__

    assert run_cli("--version").stdout.strip() == f"tunelab {__version__}"


def test_model_new_inspect_and_json(tmp_path):
    out = tmp_path / "toy.safetensors"
    proc = run_cli("model", "new", "--arch", "toy", "--seed", "3", "--out", out, "--dtype", "bf16")
    assert "wrote" in proc.stdout and out.exists()
    text = run_cli("model", "inspect", out).stdout
    assert "architecture  toy" in text and "dtype         bf16" in text and "IN08" in text and "tunelab.version" in text
    report = json.loads(run_cli("model", "inspect", out, "--json").stdout)
    assert report["arch"] == "toy" and len(report["keys"]) == report["tensors"] == len(load_file(out))
    assert {k["dtype"] for k in report["keys"]} == {"BF16"}


def test_inspect_sdxl_preset_allocates_nothing():
    report = json.loads(run_cli("model", "inspect", "--arch", "sdxl", "--json").stdout)
    assert report["per_component"]["unet"] == 2_567_463_684
    assert report["tensors"] == 2513
    assert {"key": "model.diffusion_model.input_blocks.0.0.weight", "shape": [320, 4, 3, 3], "dtype": "F32"} in report["keys"]


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json!!!}", b"\xff" * 64])
def test_malformed_files_give_one_line_errors(tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    proc = run_cli("model", "inspect", bad, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_convert_to_diffusers_and_back_is_exact(tmp_path):
    src = tmp_path / "a.safetensors"
    run_cli("model", "new", "--out", src, "--dtype", "fp32")
    run_cli("model", "convert", src, "--to", "diffusers", "--out", tmp_path / "folder", "--dtype", "fp32")
    run_cli("model", "convert", tmp_path / "folder", "--out", tmp_path / "b.safetensors", "--dtype", "fp32")
    a, b = load_file(src), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_pickle_refused_with_reason(tmp_path):
    import torch

    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    proc = run_cli("model", "convert", ckpt, "--out", tmp_path / "x.safetensors", check=False)
    assert proc.returncode == 2 and "can execute arbitrary code" in proc.stderr and "--allow-pickle" in proc.stderr


def test_config_check_good_and_bad(tmp_path):
    ok = run_cli("config", "check", ROOT / "examples" / "sdxl-12m-epoch.toml").stdout
    assert "OK" in ok and "effective batch 16 = 4 process(es) x batch 1 x accumulation 4" in ok
    toy = run_cli("config", "check", ROOT / "examples" / "toy.toml", "--world-size", "2").stdout
    assert "effective batch 8 = 2 process(es) x batch 4 x accumulation 1" in toy
    bad = tmp_path / "bad.toml"
    bad.write_text('[optim]\nlr_unt = 1e-5\n[train]\nbatch_size = 0\n')
    proc = run_cli("config", "check", bad, check=False)
    assert proc.returncode == 2
    assert "did you mean 'optim.lr_unet'" in proc.stderr and "train.batch_size" in proc.stderr
    fields = run_cli("config", "show", "--fields").stdout
    assert "optim.lr_unet" in fields and "data.captions.mode" in fields


def test_world_size_mismatch_is_refused():
    proc = run_cli("config", "check", ROOT / "examples" / "sdxl-12m-epoch.toml", "--world-size", "1", check=False)
    assert proc.returncode == 2 and "expect_world_size is 4" in proc.stderr


def test_toy_world(tmp_path):
    run_cli("toy", "world", "--out", tmp_path / "w", "--n-images", "6", "--seed", "1")
    assert len(list((tmp_path / "w").glob("*.png"))) == 6
    assert len(list((tmp_path / "w").glob("*.caption"))) == 6
    run_cli("toy", "world", "--out", tmp_path / "s", "--n-images", "40", "--split", "base", "--stripe-share", "0.5")
    assert any("stripes" in p.read_text().split(", ") for p in (tmp_path / "s").glob("*.txt"))
    proc = run_cli("toy", "world", "--out", tmp_path / "x", "--split", "concept", "--stripe-share", "0.5", check=False)
    assert proc.returncode != 0 and "--stripe-share is for --split base only" in proc.stderr


def test_demo_runs_the_flow(tmp_path):
    proc = run_cli("demo", "--out", tmp_path / "demo", "--steps", "4", timeout=900)
    log = proc.stderr
    stages = ("1. toy world", "2. dataset index", "3. base model", "3b. what the shipped base draws",
              "4. latent cache", "5. prompts", "6. SDXL conditioning", "7. train", "7b. what the finetune draws",
              "8. loss curve", "9. weight drift", "10. run files", "11. merge back", "12. the run report")
    for stage in stages:
        assert stage in log
    assert "reloaded identical: True" in log and "all entries present and intact" in log
    assert re.search(r"concept +\d+\.\d % -> +\d+\.\d %", log) and re.search(r"preserve +\d+\.\d % -> ", log)
    out = tmp_path / "demo"
    for made in ("toy-world.png", "index.parquet", "run/checkpoints/last.safetensors", "scores-before.png",
                 "scores-after.png", "grid-timeline.png", "loss/loss.png", "run/drift/drift.json", "run/drift/trajectory.png",
                 "run/drift/heatmaps.png", "run/drift/map.png", "run/probes/training.png", "run/probes/training.parquet",
                 "run/report.html", "run/merges/back/merge-back.png", "run/merges/back/back-0.5.safetensors"):
        assert (out / made).exists(), made
    assert "sign agreement of the moves from [0]" in log
    assert re.search(r"learn loss on 8 held-out concept images \(the index.s holdout split\) +\d\.\d+ -> ", log)
    assert list((out / "run" / "samples").glob("step-*/grid*.png"))
    assert f"open {out / 'run' / 'report.html'} in a browser" in log
    html = (out / "run" / "report.html").read_text(encoding="utf-8")
    assert "weight drift" in html and "not computed yet" not in html  # the demo's drift is the report's
