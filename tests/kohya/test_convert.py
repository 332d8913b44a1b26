"""kohya flags -> run file: every supported flag maps, kohya's defaults are written where
tunelab's differ, the rest is listed with a reason, and the output passes `config check`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tunelab.config import parse_config
from tunelab.errors import TunelabError
from tunelab.kohya.convert import convert, read_launch
from tunelab.kohya.shell import parse_words

SDXL_LINE = ("accelerate launch --num_processes 4 --multi_gpu sdxl_train.py --pretrained_model_name_or_path=base.safetensors "
             "--train_data_dir=/data/img --in_json /data/meta.json --output_dir=/runs/prod --output_name=v3 "
             "--learning_rate=1.5e-6 --learning_rate_te1=1.2e-5 --learning_rate_te2=1.2e-5 --train_text_encoder "
             "--optimizer_type=AdamW8bit --optimizer_args weight_decay=1e-2 betas=0.9,0.99 relative_step=False "
             "--lr_scheduler=constant_with_warmup --lr_warmup_steps=0.05 --train_batch_size=1 "
             "--gradient_accumulation_steps=4 --max_train_steps=20000 --mixed_precision=bf16 --full_bf16 "
             "--gradient_checkpointing --max_token_length=225 --shuffle_caption --keep_tokens=1 "
             "--caption_dropout_rate=0.05 --caption_tag_dropout_rate=0.1 --resolution=1024,1024 --enable_bucket "
             "--min_bucket_reso=512 --max_bucket_reso=2048 --bucket_reso_steps=64 --bucket_no_upscale "
             "--save_every_n_steps=5000 --save_precision=fp16 --save_last_n_steps=20000 --seed=42 "
             "--loss_type=huber --huber_schedule=snr --huber_c=0.2 --min_snr_gamma=5 --v_parameterization "
             "--zero_terminal_snr --noise_offset=0.0357 --max_grad_norm=0 --cache_latents_to_disk "
             "--log_with=wandb --deepspeed --zero_stage=2 --fused_optimizer_groups=4 --xformers --my_fork_flag=1")


def _settings(line: str, index: str = "idx.parquet") -> tuple[dict, object]:
    result = convert(parse_words(line.split()), index)
    return tomllib.loads(result.text), result.conversion


def test_the_production_launch_maps_flag_by_flag():
    doc, c = _settings(SDXL_LINE)
    assert doc["run"] == {"output_dir": "/runs/prod", "name": "v3", "seed": 42}
    assert doc["model"] == {"base": "base.safetensors", "max_chunks": 3}
    o = doc["optim"]
    assert (o["lr_unet"], o["lr_text_encoder_1"], o["lr_text_encoder_2"]) == (1.5e-6, 1.2e-5, 1.2e-5)
    assert o["name"] == "adamw8bit" and o["weight_decay"] == 0.01 and o["betas"] == [0.9, 0.99]
    assert o["schedule"] == "constant_with_warmup" and o["warmup_steps"] == 1000  # 0.05 x 20000 steps, as kohya
    t = doc["train"]
    assert (t["batch_size"], t["grad_accumulation"], t["max_steps"], t["expect_world_size"]) == (1, 4, 20000, 4)
    assert t["mixed_precision"] == "bf16" and t["full_bf16"] and t["gradient_checkpointing"] and t["max_grad_norm"] == 0
    assert doc["train"]["parts"] == {"text_encoder": "on"}
    assert doc["data"]["captions"] == {"shuffle_tags": True, "keep_tags": 1, "caption_dropout": 0.05, "tag_dropout": 0.1,
                                       "mode": "concat", "concat_order": "caption_first"}  # kohya: caption, then tags
    assert doc["data"]["buckets"] == {"resolution": 1024, "min_side": 512, "max_side": 2048, "step": 64, "no_upscale": True}
    assert doc["data"]["latents"] == "/data/img" and doc["data"]["index"] == "idx.parquet"
    assert doc["save"] == {"every_n_steps": 5000, "dtype": "fp16", "keep_last": 4, "every_n_epochs": 0}
    assert doc["loss"] == {"type": "huber", "huber_schedule": "snr", "huber_c": 0.2, "min_snr_gamma": 5.0,
                           "noise_offset": 0.0357}
    assert doc["objective"] == {"prediction": "v", "zero_terminal_snr": True}
    assert doc["log"] == {"wandb": True}
    status = {r.flag: r.status for r in c.rows}
    assert status["fused_optimizer_groups"] == "not yet supported"
    assert status["deepspeed"] == status["zero_stage"] == "not applicable"  # DeepSpeed comes from the accelerate config
    assert status["xformers"] == status["accelerate --multi_gpu"] == "not applicable"
    assert status["my_fork_flag"] == "unknown"
    assert o["args"] == {"relative_step": False}  # handed to the optimizer, as kohya does
    assert c.data_sources == ["kohya:/data/meta.json,images=/data/img"]
    parse_config(doc)  # the run file validates
    assert "--my_fork_flag 1: unknown" in convert(parse_words(SDXL_LINE.split())).text  # kept in the header


def test_fused_backward_pass_maps_with_kohyas_per_parameter_clipping():
    """kohya's sdxl_train.py, in its --fused_backward_pass hook, clips each parameter's gradient on
    its own (`accelerator.clip_grad_norm_(tensor, args.max_grad_norm)`), at the default 1.0 here."""
    doc, c = _settings("sdxl_train.py --pretrained_model_name_or_path=b.safetensors --train_data_dir=img "
                       "--optimizer_type=Adafactor --fused_backward_pass --full_bf16 --mixed_precision=bf16")
    t = doc["train"]
    assert t["fused_backward"] is True and t["max_grad_norm_scope"] == "per_parameter" and t["max_grad_norm"] == 1.0
    assert {r.flag: r.status for r in c.rows}["fused_backward_pass"] == "mapped"
    doc["train"]["bf16_update"] = "nearest"  # tunelab's Adafactor rounds bf16 weights to nearest (docs)
    cfg = parse_config(doc)  # kohya's fused run validates as tunelab's
    assert cfg.train.fused_backward and cfg.optim.name == "adafactor"


def test_kohya_defaults_are_written_where_tunelab_differs():
    doc, c = _settings("sdxl_train.py --pretrained_model_name_or_path=b.safetensors --train_data_dir=img")
    assert doc["train"]["max_steps"] == 1600 and doc["optim"]["lr_unet"] == 2e-6
    assert doc["train"]["max_grad_norm"] == 1.0 and doc["train"]["mixed_precision"] == "no"
    assert doc["train"]["gradient_checkpointing"] is False and doc["model"]["max_chunks"] == 1
    assert doc["save"] == {"every_n_epochs": 0, "dtype": "fp32"}
    assert doc["train"]["parts"] == {"text_encoder": "off"} and doc["run"]["seed"] == 0
    assert doc["data"]["captions"] == {"mode": "caption"}  # kohya's default caption_extension: .caption
    assert any("1600 steps" in n for n in c.notes) and any("random seed" in n for n in c.notes)


def test_text_encoder_modes_and_block_lrs_follow_kohyas_rules():
    doc, _ = _settings("sdxl_train.py --learning_rate=0 --train_text_encoder --learning_rate_te1=1e-5 --max_train_epochs=3")
    assert doc["train"]["parts"] == {"text_encoder": "only"}
    assert doc["optim"]["lr_text_encoder_1"] == 1e-5 and doc["optim"]["lr_text_encoder_2"] == 0  # follows --learning_rate
    assert doc["train"]["epochs"] == 3 and doc["train"]["max_steps"] == 0  # epochs override steps
    lrs = ",".join(["1e-6"] * 3 + ["0"] * 6 + ["2e-6"] * 14)
    doc, _ = _settings(f"sdxl_train.py --learning_rate=2e-6 --block_lr={lrs}")
    assert doc["train"]["parts"]["block_lr_values"] == [1e-6] * 3 + [0.0] * 6 + [2e-6] * 14  # as kohya wrote them
    assert parse_config(doc).train.parts.block_lrs == [0.5] * 3 + [0.0] * 6 + [1.0] * 14  # the multipliers derived
    with pytest.raises(TunelabError, match="23"):
        _settings("sdxl_train.py --block_lr=1,2,3")
    with pytest.raises(TunelabError, match="trains nothing"):
        _settings("sdxl_train.py --learning_rate=0")


def test_kohya_config_file_and_accelerate_config_are_read(tmp_path):
    (tmp_path / "args.toml").write_text('[model]\npretrained_model_name_or_path = "b.safetensors"\n'
                                        '[training]\nlearning_rate = 3e-6\nmax_train_steps = 10\nfull_bf16 = false\n'
                                        'mixed_precision = "bf16"\n')
    (tmp_path / "acc.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 8\nmixed_precision: bf16\n")
    line = (f"accelerate launch --config_file {tmp_path / 'acc.yaml'} sdxl_train.py --config_file={tmp_path / 'args.toml'} "
            "--learning_rate=1e-6")
    doc, c = _settings(line)
    assert doc["optim"]["lr_unet"] == 1e-6  # the command line wins over the config file
    assert doc["train"]["max_steps"] == 10 and doc["train"]["expect_world_size"] == 8
    assert "full_bf16" not in doc["train"] and doc["model"]["base"] == "b.safetensors"


def test_dataset_toml_with_two_subsets_and_repeats(tmp_path):
    (tmp_path / "ds.toml").write_text("""
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 1024
batch_size = 2
min_bucket_reso = 512

  [[datasets.subsets]]
  image_dir = "/data/astolfo"
  num_repeats = 10
  class_tokens = "astolfo"

  [[datasets.subsets]]
  image_dir = "/data/general"
  metadata_file = "/data/general/meta.json"
  num_repeats = 2
  keep_tokens = 2
""")
    doc, c = _settings(f"sdxl_train.py --dataset_config={tmp_path / 'ds.toml'} --train_data_dir=ignored")
    assert c.data_sources == ["folder:/data/astolfo,class_tokens=astolfo,repeats=10",
                              "kohya:/data/general/meta.json,images=/data/general,repeats=2"]
    assert doc["data"]["captions"]["mode"] == "tags" and doc["data"]["captions"]["keep_tags"] == 1
    assert doc["data"]["buckets"] == {"resolution": 1024, "min_side": 512} and doc["train"]["batch_size"] == 2
    assert any("keep_tags: subsets differ" in n for n in c.notes)
    assert any("ignores --train_data_dir" in n for n in c.notes)


def test_cli_writes_a_run_file_that_config_check_accepts(tmp_path):
    script = tmp_path / "train.sh"
    script.write_text("accelerate launch --num_processes 2 sdxl_train.py \\\n  --pretrained_model_name_or_path=toy \\\n"
                      "  --learning_rate=1e-5 --train_batch_size=2 --gradient_accumulation_steps=2 \\\n"
                      "  --deepspeed --train_data_dir=imgs\n")
    out = run_cli("config", "from-kohya", script, "--out", tmp_path / "run.toml")
    assert "effective batch 8 = 2 process(es) x batch 2 x accumulation 2" in out.stdout
    assert "--deepspeed" in out.stdout and "takes DeepSpeed from the accelerate config" in out.stdout
    assert "next: tunelab data index --out" in out.stdout and "-s folder:imgs" in out.stdout
    assert "--no-exif-transpose" in out.stdout  # kohya reads images as stored (sd-scripts train_util.load_image)
    check = run_cli("config", "check", tmp_path / "run.toml")
    assert "OK" in check.stdout and "effective batch 8" in check.stdout
    words = run_cli("config", "from-kohya", "--out", tmp_path / "w.toml", "--", "sdxl_train.py", "--learning_rate=3e-6",
                    "--pretrained_model_name_or_path=toy")
    assert "mapped" in words.stdout and tomllib.loads((tmp_path / "w.toml").read_text())["optim"]["lr_unet"] == 3e-6
    bad = run_cli("config", "from-kohya", "--out", tmp_path / "x.toml", "--", "train_network.py", "--network_dim=8",
                  check=False)
    assert bad.returncode == 2 and "not kohya's full SDXL finetune" in bad.stderr


def test_read_launch_takes_a_file_or_words(tmp_path):
    p = tmp_path / "t.sh"
    p.write_text("sdxl_train.py --learning_rate=1\n")
    assert read_launch([str(p)]).source == str(p)
    assert read_launch(["--learning_rate=1"]).script == "sdxl_train.py"
    with pytest.raises(TunelabError, match="give a kohya launch script"):
        read_launch([])
    assert Path(p).is_file()


def test_the_docs_list_every_flag_tunelab_knows():
    from tunelab.kohya.flags import ACCELERATE, flag_reference

    doc = (Path(__file__).parents[2] / "docs" / "coming-from-kohya.md").read_text()
    missing = [name for name, _, _ in flag_reference() if f"| `--{name}` |" not in doc]
    missing += [name for name in ACCELERATE if f"| `--{name}` |" not in doc]
    assert not missing, f"docs/coming-from-kohya.md lacks {missing}: regenerate its flag table"
