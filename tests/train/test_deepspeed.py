"""DeepSpeed ZeRO-2 through accelerate, for real, on the CPU: one process (accelerate routes
DeepSpeed onto the CPU correctly for one process only). Skipped unless DeepSpeed is installed
(`pip install deepspeed`; CI does not install it, so benchmarks/gpu_distributed.py checks the
same on GPUs).

One run checks what tunelab and the engine must agree on: the engine steps once per tunelab step
(its own step count), sees the same accumulated gradient (the logged norm of the first step equals
the plain run's), skips a step whose loss is NaN (its overflow check) while tunelab counts it, the
frozen parts of a partial UNet come out of DeepSpeed's 16-bit module unchanged, and a resume from
its state ends bitwise equal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.train.conftest import write_run

pytest.importorskip("deepspeed")

ZERO2 = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 2
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
num_machines: 1
num_processes: 1
machine_rank: 0
mixed_precision: bf16
use_cpu: false
"""

SECTIONS = {"train": {"batch_size": 1, "grad_accumulation": 2, "max_steps": 4, "mixed_precision": "bf16",
                      "max_grad_norm": 1.0},
            "train.parts": {"text_encoder": "on", "unet": "unet71"}}


def deepspeed_train(tmp_path: Path, run_file: Path, stage: int = 2, **env: str) -> subprocess.CompletedProcess:
    config = tmp_path / f"zero{stage}.yaml"
    config.write_text(ZERO2.replace("zero_stage: 2", f"zero_stage: {stage}"))
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(config), "--main_process_port", "29549",
           "-m", "tunelab", "train", str(run_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def scalars(run: Path, tag: str) -> list[float]:
    return [r["value"] for r in pq.read_table(run / "metrics.parquet").to_pylist() if r["tag"] == tag]


def engine_steps(state: Path) -> tuple[int, int]:
    d = torch.load(state / "pytorch_model" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return d["global_steps"], d["skipped_steps"]


def test_zero2_steps_once_per_step_skips_nan_keeps_frozen_weights_and_resumes(tmp_path, world):
    plain = write_run(tmp_path / "plain.toml", world, tmp_path / "plain", **SECTIONS)
    run_cli("train", plain, timeout=900)
    ds = write_run(tmp_path / "ds.toml", world, tmp_path / "ds", **SECTIONS)
    # the 3rd micro-batch's loss is NaN: the step it belongs to is skipped and taken again
    proc = deepspeed_train(tmp_path, ds, TUNELAB_FAULT="loss.nonfinite:3")
    assert "engine: DeepSpeed ZeRO-2 on 1 process(es)" in proc.stderr
    assert "loss was not finite; step skipped (1 in a row, 1 in total)" in proc.stderr
    run = tmp_path / "ds"
    assert scalars(run, "nonfinite_skipped")[-1] == 1
    # 4 tunelab steps + the skipped one = 5 engine steps from 10 micro-batches: one per tunelab step
    assert engine_steps(run / "state" / "step-00000004") == (5, 1)
    # the same accumulated gradient on the first step (bf16 weights vs fp32 weights under autocast)
    first, ref = scalars(run, "grad_norm")[0], scalars(tmp_path / "plain", "grad_norm")[0]
    assert abs(first - ref) < 0.01 * ref

    ckpt = load_file(run / "checkpoints" / "last.safetensors")
    ref_last = load_file(tmp_path / "plain" / "checkpoints" / "last.safetensors")
    ref_mid = load_file(tmp_path / "plain" / "checkpoints" / "step-00000002.safetensors")
    frozen = [k for k in ref_last if k.startswith("model.diffusion_model.") and torch.equal(ref_last[k], ref_mid[k])]
    assert frozen and all(torch.equal(ckpt[k], ref_last[k]) for k in frozen)  # not rounded through bf16
    assert all(v.dtype == torch.float32 for v in ckpt.values() if v.is_floating_point())  # save.dtype fp32

    first_last = run / "first.safetensors"
    shutil.move(run / "checkpoints" / "last.safetensors", first_last)
    shutil.rmtree(run / "state" / "step-00000004")
    proc = deepspeed_train(tmp_path, ds)
    assert "from step 2" in proc.stderr
    again, before = load_file(run / "checkpoints" / "last.safetensors"), load_file(first_last)
    assert all(torch.equal(again[k], before[k]) for k in before)


def test_zero3_accumulates_gathers_its_checkpoint_and_resumes(tmp_path, world):
    """ZeRO-3 partitions the weights themselves; at accumulation 2 it adds both micro-batches'
    gradients (the count DeepSpeed's own forward keeps: trainer._micro_batch_begins), trains as
    the plain run does, and its checkpoint is gathered whole."""
    one = SECTIONS
    plain = write_run(tmp_path / "plain.toml", world, tmp_path / "plain", **one)
    run_cli("train", plain, timeout=900)
    ds = write_run(tmp_path / "ds.toml", world, tmp_path / "ds", **one)
    proc = deepspeed_train(tmp_path, ds, stage=3)
    assert "engine: DeepSpeed ZeRO-3 on 1 process(es)" in proc.stderr
    run = tmp_path / "ds"
    first, ref = scalars(run, "grad_norm")[0], scalars(tmp_path / "plain", "grad_norm")[0]
    assert abs(first - ref) < 0.01 * ref
    ckpt = load_file(run / "checkpoints" / "last.safetensors")
    ref_last = load_file(tmp_path / "plain" / "checkpoints" / "last.safetensors")
    ref_mid = load_file(tmp_path / "plain" / "checkpoints" / "step-00000002.safetensors")
    assert ckpt.keys() == ref_last.keys()
    for k in ref_last:  # gathered whole: every tensor has its shape, and trained ones moved like the plain run's
        assert ckpt[k].shape == ref_last[k].shape, k
    frozen = [k for k in ref_last if k.startswith("model.diffusion_model.") and torch.equal(ref_last[k], ref_mid[k])]
    assert frozen and all(torch.equal(ckpt[k], ref_last[k]) for k in frozen)
    moved = [k for k in ref_last if ref_last[k].is_floating_point() and k not in frozen and k.startswith("model.")]
    assert max((ckpt[k] - ref_last[k]).abs().max().item() for k in moved) < 5e-3  # bf16 weights in the forward

    first_last = run / "first.safetensors"
    shutil.move(run / "checkpoints" / "last.safetensors", first_last)
    shutil.rmtree(run / "state" / "step-00000004")
    proc = deepspeed_train(tmp_path, ds, stage=3)
    assert "from step 2" in proc.stderr
    again, before = load_file(run / "checkpoints" / "last.safetensors"), load_file(first_last)
    assert all(torch.equal(again[k], before[k]) for k in before)
