"""`tunelab train` end to end on the toy world, through real processes: logging, checkpoints,
exact resume after SIGKILL, refusal of a changed config, the NaN guard, and 2-process DDP (gloo)
reaching the same weights as 1 process with twice the accumulation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, tunelab_cli
from tests.train.conftest import write_run


def _same_tensors(a: Path, b: Path, atol: float = 0.0) -> bool:
    A, B = load_file(a), load_file(b)
    assert A.keys() == B.keys()
    if atol == 0:
        return all(torch.equal(A[k], B[k]) for k in A)
    return all(torch.allclose(A[k], B[k], atol=atol, rtol=0) for k in A)


def test_train_end_to_end(tmp_path, world):
    run = tmp_path / "run"
    cfg = write_run(tmp_path / "run.toml", world, run, **{"save": {"every_n_steps": 3, "every_n_epochs": 0}})
    dry = run_cli("train", cfg, "--dry-run").stderr
    assert "effective batch 2" in dry and "trainable parameters" in dry and not run.exists()
    proc = run_cli("train", cfg, timeout=900)
    assert "trained 6 steps (12 samples)" in proc.stdout
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.safetensors", "step-00000003.safetensors"]
    assert (run / "config.json").is_file() and (run / "state" / "step-00000006" / "trainer.json").is_file()
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows if r["tag"] == "loss"] == [1, 2, 3, 4, 5, 6]  # one value per optimizer step
    assert {"lr/unet", "lr/text_encoder_1", "lr/text_encoder_2", "grad_norm", "img_per_s"} <= {r["tag"] for r in rows}
    from tunelab.models.safetensors_io import read_header

    meta = read_header(run / "checkpoints" / "last.safetensors").metadata
    assert meta["ss_steps"] == "6" and meta["tunelab.arch"] == "toy"
    assert not _same_tensors(run / "checkpoints" / "step-00000003.safetensors", run / "checkpoints" / "last.safetensors")
    # the next stage reads what training wrote: tensorboard events -> loss curve and verdict
    report = run_cli("loss", run / "events", "--out", tmp_path / "loss")
    assert (tmp_path / "loss" / "loss.png").is_file() and "loss" in report.stdout


def _train_until_state(cfg: Path, state_dir: Path, step: int) -> None:
    """Start training in a real process and SIGKILL it once the state of `step` exists."""
    proc = subprocess.Popen([*tunelab_cli(), "train", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = state_dir / f"step-{step:08d}" / "trainer.json"
    deadline = time.time() + 600
    while not target.exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # the fast twin: tests/reliability/test_kill.py (kills inside checkpoint and state writes)
def test_sigkill_and_resume_is_bitwise_identical(tmp_path, world):
    straight = write_run(tmp_path / "a.toml", world, tmp_path / "a")
    run_cli("train", straight, timeout=900)
    killed = write_run(tmp_path / "b.toml", world, tmp_path / "b")
    _train_until_state(killed, tmp_path / "b" / "state", step=2)
    proc = run_cli("train", killed, timeout=900)
    assert "trained 6 steps" in proc.stdout
    assert _same_tensors(tmp_path / "a" / "checkpoints" / "last.safetensors",
                         tmp_path / "b" / "checkpoints" / "last.safetensors")
    rows = pq.read_table(tmp_path / "b" / "metrics.parquet").to_pylist()
    steps = [r["step"] for r in rows if r["tag"] == "loss"]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step logged twice across the restart

    changed = write_run(tmp_path / "b.toml", world, tmp_path / "b", optim={"lr_unet": 2e-4})
    refused = run_cli("train", changed, check=False)
    assert refused.returncode == 2 and "--allow-config-change" in refused.stderr
    bigger = write_run(tmp_path / "b.toml", world, tmp_path / "b", train={"grad_accumulation": 2})
    refused = run_cli("train", bigger, check=False)
    assert refused.returncode == 2 and "effective batch" in refused.stderr


@pytest.mark.slow  # the fast twin: tests/reliability/test_numerics.py (forced NaN, once and for good)
def test_nan_guard_stops_and_keeps_the_last_good_state(tmp_path, world):
    run = tmp_path / "run"
    good = write_run(tmp_path / "run.toml", world, run, train={"max_steps": 2, "max_nonfinite_steps": 2},
                     save={"every_n_steps": 1})
    run_cli("train", good, timeout=900)
    before = (run / "state" / "step-00000002" / "trainer.json").read_text()
    # An absurd learning rate makes the weights overflow: the next losses are inf/NaN.
    bad = write_run(tmp_path / "run.toml", world, run, train={"max_steps": 8, "max_nonfinite_steps": 2},
                    save={"every_n_steps": 1}, optim={"lr_unet": 1e30, "lr_text_encoder_1": 1e30})
    proc = run_cli("train", bad, "--allow-config-change", check=False, timeout=900)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "NaN/inf" in proc.stderr and "max_nonfinite_steps" in proc.stderr
    assert "Traceback" not in proc.stderr
    good_states = sorted(p.name for p in (run / "state").iterdir())
    assert "step-00000002" in good_states
    assert (run / "state" / "step-00000002" / "trainer.json").read_text() == before


def test_two_processes_match_one_process_with_double_accumulation(tmp_path, world):
    one = write_run(tmp_path / "one.toml", world, tmp_path / "one",
                    train={"batch_size": 1, "grad_accumulation": 4, "max_steps": 2})
    run_cli("train", one, timeout=900)
    two = write_run(tmp_path / "two.toml", world, tmp_path / "two",
                    train={"batch_size": 1, "grad_accumulation": 2, "max_steps": 2, "expect_world_size": 2})
    accelerate = Path(sys.executable).with_name("accelerate")
    # `--multi_gpu` selects accelerate's torchrun launcher; without CUDA each process runs DDP on gloo.
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "tunelab", "train", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 4" in proc.stderr
    # the final step is saved once, as `last` (every_n_steps = 2 = max_steps), by rank 0 only
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["last.safetensors"]
    assert _same_tensors(tmp_path / "one" / "checkpoints" / "last.safetensors",
                         tmp_path / "two" / "checkpoints" / "last.safetensors", atol=1e-5)


def test_the_toy_example_trains_as_documented(tmp_path):
    """examples/toy.toml, prepared exactly as its header says, in a fresh folder."""
    example = Path(__file__).resolve().parents[2] / "examples" / "toy.toml"
    run_cli("toy", "world", "--out", "toy-world", "--n-images", "32", cwd=tmp_path)
    run_cli("data", "index", "--out", "toy-world/index.parquet", "-s", "folder:toy-world", "--resolution", "80",
            "--min-side", "32", "--max-side", "128", "--step", "32", cwd=tmp_path)
    run_cli("data", "cache", "toy-world/index.parquet", "--out", "toy-world/latents", "--model", "toy", cwd=tmp_path)
    proc = run_cli("train", example, cwd=tmp_path, timeout=900)
    assert "trained" in proc.stdout
    run = tmp_path / "runs" / "toy"
    assert (run / "checkpoints" / "last.safetensors").is_file() and (run / "checkpoints" / "epoch-0001.safetensors").is_file()
    assert list((run / "samples").glob("step-*/grid*.png"))


def test_init_from_starts_a_new_run_from_a_checkpoint(tmp_path, world):
    from tunelab.config import load_config
    from tunelab.models.checkpoint import new_checkpoint
    from tunelab.train.trainer import load_model

    ckpt = new_checkpoint("toy", tmp_path / "other.safetensors", seed=11, dtype="fp32")
    cfg = load_config(write_run(tmp_path / "r.toml", world, tmp_path / "r"))  # model.base = "toy" (seed 3)
    comps, _ = load_model(cfg, ckpt, meta=False)
    assert torch.equal(comps.unet.conv_in.weight, load_file(ckpt)["model.diffusion_model.input_blocks.0.0.weight"])
    fresh, _ = load_model(cfg, None, meta=False)
    assert not torch.equal(fresh.unet.conv_in.weight, comps.unet.conv_in.weight)
