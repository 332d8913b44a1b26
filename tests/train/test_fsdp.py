"""FSDP2 on two real processes (gloo): the shipped examples/accelerate/fsdp.yaml, launched by
`accelerate launch`, with really sharded modules (torch's fully_shard, train/sharding.py).

One run checks what the issue lists: a partial UNet (frozen parameters inside sharded modules)
and both text encoders train as one process with twice the accumulation does; the checkpoint is
gathered into one SGM file; the grid and the probes, which need a forward of the sharded modules,
run on every process and give the one-process numbers; the state is sharded (one file per
process) and a resume from it ends bitwise equal to the uninterrupted run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from tests.train.conftest import write_run
from tests.conftest import run_cli

FSDP_YAML = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "fsdp.yaml"

SECTIONS = {
    "train.parts": {"text_encoder": "on", "unet": "unet71"},
    "grid": {"prompts": ["a red circle"], "every_n_steps": 2, "steps": 2, "seeds": [1]},
    "probe": {"enabled": True, "every_n_steps": 2, "learn": "train", "learn_samples": 2,
              "preserve_prompts": ["a blue square"], "preserve_steps": 3, "timesteps": 2},
}


def fsdp_train(run_file: Path) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(FSDP_YAML), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "29547", "-m", "tunelab", "train", str(run_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def probe_losses(run: Path) -> dict[tuple[int, str], float]:
    rows = pq.read_table(run / "probes" / "training.parquet").to_pylist()
    return {(r["step"], r["set"], r["band"]): r["value"] for r in rows if r["metric"] == "loss"}


def test_fsdp_on_two_processes_trains_gathers_probes_and_resumes_bitwise(tmp_path, world):
    one = write_run(tmp_path / "one.toml", world, tmp_path / "one",
                    train={"batch_size": 1, "grad_accumulation": 4, "max_steps": 4}, **SECTIONS)
    run_cli("train", one, timeout=900)
    two = write_run(tmp_path / "two.toml", world, tmp_path / "two",
                    train={"batch_size": 1, "grad_accumulation": 2, "max_steps": 4, "expect_world_size": 2}, **SECTIONS)
    proc = fsdp_train(two)
    assert "engine: FSDP2 full shard on 2 process(es)" in proc.stderr
    run = tmp_path / "two"

    # one gathered SGM file, the one-process run's weights (the order of the reductions differs)
    ckpt = load_file(run / "checkpoints" / "last.safetensors")
    ref = load_file(tmp_path / "one" / "checkpoints" / "last.safetensors")
    assert ckpt.keys() == ref.keys()
    for key in ref:
        assert torch.allclose(ckpt[key].float(), ref[key].float(), atol=1e-5), key
    earlier = load_file(tmp_path / "one" / "checkpoints" / "step-00000002.safetensors")
    frozen = [k for k in ref if k.startswith("model.diffusion_model.") and torch.equal(ref[k], earlier[k])]
    assert frozen  # unet71 leaves parts of the UNet frozen: sharded with the rest, saved unchanged
    assert all(torch.equal(ckpt[k], ref[k]) for k in frozen)

    # the state: accelerate's part plus one shard file per process
    state = run / "state" / "step-00000004"
    assert sorted(p.name for p in (state / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    # callbacks with a forward ran on both processes: the main one wrote, with the one-process numbers
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002", "step-00000004"]
    assert list((run / "samples" / "step-00000004").glob("grid*.png"))
    fsdp_probes, one_probes = probe_losses(run), probe_losses(tmp_path / "one")
    assert fsdp_probes.keys() == one_probes.keys() and len(fsdp_probes) >= 6
    for key, value in one_probes.items():
        assert abs(fsdp_probes[key] - value) < 1e-4 * max(1.0, abs(value)), key

    # resume from the sharded state at step 2: the same final weights, bit for bit
    first = run / "first.safetensors"
    shutil.move(run / "checkpoints" / "last.safetensors", first)
    shutil.rmtree(state)
    proc = fsdp_train(two)
    assert "resuming" in proc.stderr and "from step 2" in proc.stderr
    again, first_ = load_file(run / "checkpoints" / "last.safetensors"), load_file(first)
    assert all(torch.equal(again[k], first_[k]) for k in first_)


UNITS_SCRIPT = """
import os, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
dist.init_process_group("gloo", rank=0, world_size=1)
from tunelab.models.arch import build_components
from tunelab.train.engines import FSDP_UNITS, FsdpSettings
from tunelab.train.sharding import shard
unet = build_components("toy", seed=0).unet
nested = [m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"
          and any(type(c).__name__ == "BasicTransformerBlock" for c in m.modules())]
shard({"unet": unet}, FsdpSettings(True, False, FSDP_UNITS, 2))
plain = [n for n, p in unet.named_parameters() if not isinstance(p, DTensor)]
c = unet.config
pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
out = unet(torch.randn(1, c.in_channels, 8, 8), 10, torch.randn(1, 77, c.cross_attention_dim),
           added_cond_kwargs={"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}).sample
print(len(nested), len(plain), tuple(out.shape))
dist.destroy_process_group()
"""


def test_default_units_shard_nested_blocks_innermost_first():
    """tunelab's default units nest (Transformer2DModel holds BasicTransformerBlocks): sharding the
    outer one first would take the inner ones' parameters, and FSDP2 refuses to shard them again."""
    proc = subprocess.run([sys.executable, "-c", UNITS_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    nested, plain, shape = proc.stdout.split(maxsplit=2)
    assert int(nested) > 0 and int(plain) == 0
    assert shape.strip() == "(1, 4, 8, 8)"
