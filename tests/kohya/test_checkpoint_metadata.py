"""A kohya-trained single-file checkpoint loads and `model inspect` shows its training (`ss_*`,
modelspec); tunelab's own checkpoints carry the keys kohya-reading tools display."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli

# the keys sd-scripts' train_util.get_training_metadata and sai_model_spec write for sdxl_train.py
KOHYA_META = {
    "ss_session_id": "1234", "ss_training_started_at": "1733000000.5", "ss_training_finished_at": "1733090000.0",
    "ss_output_name": "prod-v3", "ss_learning_rate": "1.5e-06", "ss_text_encoder_lr": "1.2e-05",
    "ss_num_train_images": "12000", "ss_num_epochs": "8", "ss_epoch": "8", "ss_steps": "6000",
    "ss_gradient_accumulation_steps": "4", "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)",
    "ss_lr_scheduler": "constant", "ss_mixed_precision": "bf16", "ss_full_fp16": "False", "ss_seed": "42",
    "ss_resolution": "(1024, 1024)", "ss_max_token_length": "225", "ss_base_model_version": "sdxl_base_v1-0",
    "ss_sd_model_name": "sd_xl_base_1.0.safetensors", "ss_sd_scripts_commit_hash": "0010c81a3353b6bb51e698ca64",
    "ss_dataset_dirs": json.dumps({"10_astolfo": {"n_repeats": 10, "img_count": 40}, "general": {"n_repeats": 1, "img_count": 11960}}),
    "ss_tag_frequency": json.dumps({"10_astolfo": {"astolfo": 40, " solo": 38}, "general": {"solo": 9000, "car": 300}}),
    "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models", "modelspec.title": "prod-v3",
    "modelspec.resolution": "1024x1024", "modelspec.prediction_type": "epsilon", "sshs_model_hash": "abc",
}


def test_a_kohya_trained_checkpoint_loads_and_shows_its_training(tmp_path, toy_checkpoint):
    from tunelab.models.checkpoint import load_checkpoint

    tensors = load_file(toy_checkpoint)
    path = tmp_path / "prod-v3.safetensors"
    save_file({k: v.to(torch.float16) for k, v in tensors.items()}, path, metadata=KOHYA_META)  # no tunelab keys
    comps = load_checkpoint(path)
    assert comps.arch == "toy" and comps.unet is not None
    text = run_cli("model", "inspect", path).stdout
    assert "training      trained by kohya sd-scripts 0010c81a: steps 6000, epoch 8, of epochs 8, lr 1.5e-06" in text
    assert "te lr 1.2e-05" in text and "images 12000" in text and "accumulation 4" in text
    assert "from base sd_xl_base_1.0.safetensors (sdxl_base_v1-0)" in text
    assert "data: 10_astolfo (40 images x 10), general (11960 images x 1)" in text
    assert "most frequent solo (9,038), car (300), astolfo (40)" in text
    assert "trained 2024-11-30" in text and "prediction    epsilon" in text
    assert "meta modelspec.title = prod-v3" in text and "meta ss_tag_frequency = {" in text


def test_tunelab_checkpoints_carry_kohyas_keys(tmp_path):
    from tests.train.conftest import write_run
    from tunelab.models.safetensors_io import read_header
    from tunelab.toy.world import make_world
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.train.trainer import train

    make_world(tmp_path / "img", n=4, seed=0)
    build_index([f"folder:{tmp_path / 'img'}"], tmp_path / "i.parquet",
                IndexOptions(buckets=BucketConfig(resolution=80, min_side=32, max_side=128, step=32)))
    cfg = write_run(tmp_path / "r.toml", tmp_path / "i.parquet", tmp_path / "run", train={"max_steps": 2},
                    report={"enabled": False})
    train(cfg)
    meta = read_header(tmp_path / "run" / "checkpoints" / "last.safetensors").metadata
    assert meta["ss_steps"] == "2" and meta["ss_text_encoder_lr"] == "1e-05" and meta["ss_learning_rate"] == "0.0001"
    assert meta["ss_gradient_accumulation_steps"] == "1" and meta["ss_sd_model_name"] == "toy"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.prediction_type"] == "epsilon"
