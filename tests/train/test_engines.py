"""Which engine a launch asks for, and what tunelab accepts or refuses (train/engines.py).

The launch environments come from accelerate's own launcher code on the shipped configs
(`accelerate launch` for FSDP; accelerate's `prepare_deepspeed_cmd_env` for DeepSpeed, whose
launcher needs DeepSpeed installed), so a change in accelerate's variables breaks these tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import write_run
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train.engines import Engine, FsdpSettings, check_engine, deepspeed_settings, launch_engine

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "accelerate"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def deepspeed_env(config: Path, *extra: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file config` gives each process under DeepSpeed."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), *extra, "-m", "tunelab", "train", "x"])
    args, defaults, _ = _validate_launch_command(args)
    # what accelerate's launch_command sets before calling its DeepSpeed launcher
    args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def plugin_config(env: dict[str, str], monkeypatch) -> dict:
    """The DeepSpeed config accelerate builds in each process from those variables."""
    from accelerate.utils import DeepSpeedPlugin

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return DeepSpeedPlugin().deepspeed_config


def run_config(tmp_path, world, **sections):
    return load_config(write_run(tmp_path / "r.toml", world, tmp_path / "out", **sections))


def test_the_shipped_fsdp_config_is_read_as_accelerate_launch_passes_it(tmp_path):
    dump = tmp_path / "env.py"
    dump.write_text("import json, os; print(json.dumps(dict(os.environ)))\n")
    proc = subprocess.run([ACCELERATE, "launch", "--config_file", str(EXAMPLES / "fsdp.yaml"), "--num_processes", "1",
                           str(dump)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = json.loads(proc.stdout.strip().splitlines()[-1])
    engine = launch_engine(env)
    assert engine.kind == "fsdp" and engine.sharded
    assert engine.fsdp == FsdpSettings(reshard_after_forward=True, offload_params=False,
                                       units=("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer"), version=2)


def test_deepspeed_stages_come_from_the_launch_or_its_deepspeed_file(tmp_path):
    env = deepspeed_env(EXAMPLES / "deepspeed-zero2.yaml", "--num_processes", "2")
    assert launch_engine(env) == Engine("deepspeed", 2)
    assert not launch_engine(env).sharded
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    three = launch_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_file)})
    assert three.zero_stage == 3 and three.sharded
    assert launch_engine({"WORLD_SIZE": "2"}).kind == "ddp"
    assert launch_engine({}).kind == "single"


def test_the_shipped_deepspeed_config_takes_the_run_files_accumulation(tmp_path, world, monkeypatch):
    """accelerate's 'auto' fields get tunelab's numbers: one accumulation for tunelab and the engine."""
    cfg = run_config(tmp_path, world, train={"batch_size": 3, "grad_accumulation": 4, "max_grad_norm": 1.0,
                                             "mixed_precision": "bf16"})
    ds = plugin_config(deepspeed_env(EXAMPLES / "deepspeed-zero2.yaml", "--num_processes", "2"), monkeypatch)
    filled = deepspeed_settings(ds, cfg, world=2, accumulation=4)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"], filled["gradient_clipping"]) == (3, 4, 24, 1.0)
    assert filled["bf16"] == {"enabled": True, "check_grad_overflow": True}  # the NaN guard's skip
    assert filled["zero_optimization"]["stage"] == 2


def test_a_deepspeed_value_that_disagrees_with_the_run_file_is_refused(tmp_path, world, monkeypatch):
    cfg = run_config(tmp_path, world, train={"batch_size": 1, "grad_accumulation": 4, "mixed_precision": "bf16"})
    ds = plugin_config(deepspeed_env(EXAMPLES / "deepspeed-zero2.yaml", "--num_processes", "2",
                                     "--gradient_accumulation_steps", "1"), monkeypatch)
    assert ds["gradient_accumulation_steps"] == 1
    with pytest.raises(TunelabError, match=r"gradient_accumulation_steps = 1, but the run's accumulation .* gives 4"):
        deepspeed_settings(ds, cfg, world=2, accumulation=4)
    assert deepspeed_settings(ds, cfg, world=2, accumulation=1)["gradient_accumulation_steps"] == 1  # they agree
    with pytest.raises(TunelabError, match="gradient_clipping = 0.5, but train.max_grad_norm gives 0"):
        deepspeed_settings({"gradient_clipping": 0.5}, cfg, world=2, accumulation=4)
    with pytest.raises(TunelabError, match="names an optimizer"):
        deepspeed_settings({"optimizer": {"type": "Adam"}}, cfg, world=2, accumulation=4)
    with pytest.raises(TunelabError, match="check_grad_overflow = false"):
        deepspeed_settings({"bf16": {"enabled": True, "check_grad_overflow": False}}, cfg, world=2, accumulation=4)


def test_zero3_saves_gather_and_tunelab_keeps_its_own_schedule(tmp_path, world):
    cfg = run_config(tmp_path, world, train={"mixed_precision": "bf16"})
    filled = deepspeed_settings({"zero_optimization": {"stage": 3}, "scheduler": {"type": "WarmupLR"}}, cfg, 2, 1)
    assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "scheduler" not in filled


@pytest.mark.parametrize("engine, sections, words", [
    (Engine("deepspeed", 2), {"train": {"mixed_precision": "no"}}, "does not check gradients for NaN"),
    (Engine("deepspeed", 2), {"train": {"mixed_precision": "bf16", "full_bf16": True}}, "set train.full_bf16 = false"),
    (Engine("deepspeed", 2), {"train": {"mixed_precision": "bf16"}, "optim": {"name": "adamw_schedulefree"}},
     "schedule-free"),
    (Engine("deepspeed", 2), {"train": {"mixed_precision": "bf16", "max_grad_norm": 1.0,
                                        "max_grad_norm_scope": "per_parameter"}}, "max_grad_norm_scope = 'global'"),
    (Engine("deepspeed", 3), {"train": {"mixed_precision": "bf16"}, "ema": {"enabled": True}}, "ema.enabled = false"),
    (Engine("fsdp", fsdp=FsdpSettings(version=1)), {}, "fsdp_version: 2"),
    (Engine("fsdp", fsdp=FsdpSettings()), {"ema": {"enabled": True}}, "ema.enabled = false"),
    (Engine("fsdp", fsdp=FsdpSettings()), {"optim": {"name": "adamw8bit"}}, "does not step FSDP's sharded"),
    (Engine("fsdp", fsdp=FsdpSettings()), {"train": {"mixed_precision": "bf16", "full_bf16": True}},
     "set train.full_bf16 = false"),
])
def test_what_an_engine_cannot_honour_is_refused_with_the_fix(tmp_path, world, engine, sections, words):
    cfg = run_config(tmp_path, world, **sections)
    with pytest.raises(TunelabError, match="the launch config asks for") as err:
        check_engine(engine, cfg, cuda=True)
    assert words in str(err.value)


def test_what_the_engines_run_is_accepted(tmp_path, world):
    check_engine(Engine("deepspeed", 2), run_config(tmp_path, world, train={"mixed_precision": "bf16"}), cuda=True)
    check_engine(Engine("deepspeed", 3), run_config(tmp_path, world, train={"mixed_precision": "bf16"}), cuda=True)
    check_engine(Engine("fsdp", fsdp=FsdpSettings()), run_config(tmp_path, world), cuda=False)  # FSDP2 runs on gloo
    check_engine(Engine("ddp"), run_config(tmp_path, world, ema={"enabled": True}), cuda=False)


def test_a_multi_process_deepspeed_launch_on_the_cpu_is_refused_before_anything_starts(tmp_path, world):
    """On several CPU processes accelerate would run each alone: tunelab says so and writes nothing."""
    run = write_run(tmp_path / "r.toml", world, tmp_path / "out", train={"mixed_precision": "bf16"})
    env = deepspeed_env(EXAMPLES / "deepspeed-zero2.yaml", "--num_processes", "2")
    env["WORLD_SIZE"] = "2"  # what the launcher gives each of the two processes
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(run)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "DeepSpeed ZeRO-2" in proc.stderr and "only on GPUs" in proc.stderr and "--multi_gpu" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
