"""benchmarks/gpu_distributed.py on the CPU: it refuses cleanly without CUDA GPUs, and its dry run
writes accelerate configs and run files that tunelab itself reads (the GPU run itself is not
exercised here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_distributed.py"
ENGINES = ("ddp", "zero2", "zero3", "fsdp")


def _run(*args: str) -> subprocess.CompletedProcess:
    # CUDA hidden: the same answer on a machine that has GPUs
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("gpus, need", [((), "needs CUDA GPUs (found none)"),
                                        (("--gpus", "4"), "needs 4 CUDA GPUs (found none)")])
def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(tmp_path, gpus, need):
    out = tmp_path / "out"
    proc = _run("--out", str(out), "--json", str(tmp_path / "results.json"), *gpus)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and need in lines[0] and "nothing was run" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists() and not (tmp_path / "results.json").exists()


def test_dry_run_writes_configs_and_run_files_tunelab_reads(tmp_path):
    from tunelab.config import load_config
    from tunelab.train.memory import launch_for, launch_from_accelerate

    out = tmp_path / "out"
    proc = _run("--out", str(out), "--gpus", "2", "--steps", "20", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    configs = {e: yaml.safe_load((out / e / "accelerate.yaml").read_text()) for e in ENGINES}
    assert [configs[e]["distributed_type"] for e in ENGINES] == ["MULTI_GPU", "DEEPSPEED", "DEEPSPEED", "FSDP"]
    assert [configs[e]["deepspeed_config"]["zero_stage"] for e in ("zero2", "zero3")] == [2, 3]
    # tunelab fills the engine's accumulation from the run file: the config must not set it
    assert all("gradient_accumulation_steps" not in configs[e]["deepspeed_config"] for e in ("zero2", "zero3"))
    fsdp = configs["fsdp"]["fsdp_config"]
    assert (fsdp["fsdp_version"], fsdp["fsdp_reshard_after_forward"], fsdp["fsdp_state_dict_type"]) == \
        (2, True, "SHARDED_STATE_DICT")
    assert all(c["num_processes"] == 2 for c in configs.values())
    for engine in ENGINES:
        path = out / engine / "accelerate.yaml"
        launch = launch_from_accelerate(path)
        assert (launch.engine, launch.world_size) == (engine, 2)
        cfg = load_config(out / engine / "run.toml")
        assert launch_for(cfg, accelerate_config=path) == launch
        t = cfg.train
        assert (Path(cfg.model.base), t.batch_size, t.grad_accumulation, t.max_steps, t.mixed_precision) == \
            ((out / "world" / "base.safetensors").resolve(), 2, 2, 20, "bf16")
        assert (t.parts.text_encoder, cfg.save.every_n_steps, cfg.save.dtype) == ("on", 10, "fp32")
        assert Path(cfg.run.output_dir) == (out / engine / "run").resolve()  # a run folder per engine
        run = (out / engine / "run.toml").resolve()
        assert f"--config_file {path.resolve()} --num_processes 2 -m tunelab train {run}" in proc.stdout
    assert "tunelab toy world --out" in proc.stdout and "--n-images 64" in proc.stdout
    assert "model new --arch toy --out" in proc.stdout  # the base every engine starts from
    assert not (out / "world").exists()  # nothing is built or trained in a dry run


def test_cpu_rehearsal_trains_checks_and_resumes(tmp_path):
    """The script itself, end to end on the CPU (DDP, one process): it builds the world and the
    base, trains, reads the figures, resumes from the middle state and reports the row."""
    import json

    out, report = tmp_path / "out", tmp_path / "rehearsal.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--cpu", "--engines", "ddp", "--steps", "4",
                           "--json", str(report)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(report.read_text())["engines"][0]
    assert (row["engine"], row["result"], row["resumed_from"]) == ("ddp", "pass", "step-00000002"), row
    assert row["resume_diff"] < 1e-3 and row["img_per_s"] > 0 and row["estimate_gib"] > 0
    assert "| ddp | pass |" in proc.stdout
    assert (out / "world" / "base.safetensors").is_file()
