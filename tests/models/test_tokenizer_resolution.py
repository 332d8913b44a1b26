"""`model.tokenizers = "auto"` and the tokenizer / model mismatch check (models/text.py
`resolve_tokenizers`, models/checkpoint.py `base_arch`): header and vocab.json only."""

from __future__ import annotations

import pytest

from tests.sdxl_fakes import sdxl_header_file, sdxl_sized_tokenizers
from tunelab.errors import TunelabError
from tunelab.models.checkpoint import base_arch
from tunelab.models.text import load_tokenizers, own_tokenizers, resolve_tokenizers


def test_the_default_is_the_base_s_own_tokenizers():
    from tunelab.config import ModelSection

    assert ModelSection().tokenizers == "auto"  # was "toy", whatever the base
    assert resolve_tokenizers("auto", "toy", "toy") == "toy"
    assert own_tokenizers("toy", None) == "toy"


def test_base_arch_reads_headers_only(tmp_path, toy_checkpoint):
    assert base_arch("toy") == "toy"
    assert base_arch(toy_checkpoint) == "toy"
    assert base_arch(sdxl_header_file(tmp_path / "sdxl.safetensors")) == "sdxl"
    assert base_arch(tmp_path / "missing.safetensors") is None
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    assert base_arch(tmp_path / "old.ckpt") is None  # no header: only loading can tell


def test_an_sdxl_single_file_needs_a_tokenizer_folder(tmp_path):
    sdxl = sdxl_header_file(tmp_path / "sdxl.safetensors")
    with pytest.raises(TunelabError) as err:
        resolve_tokenizers("auto", "sdxl", sdxl)
    msg = str(err.value)
    assert "model.tokenizers" in msg and "tokenizer/ and tokenizer_2/" in msg
    assert "stabilityai/stable-diffusion-xl-base-1.0" in msg and "hf download" in msg  # the offline route
    with pytest.raises(TunelabError, match="--tokenizers = 'auto'"):
        resolve_tokenizers("auto", "sdxl", sdxl, option="--tokenizers")


def test_toy_tokenizers_with_an_sdxl_model_are_refused(tmp_path):
    sdxl = sdxl_header_file(tmp_path / "sdxl.safetensors")
    with pytest.raises(TunelabError, match=r"model.tokenizers = 'toy': its vocabulary has 718 tokens.*49,408"):
        resolve_tokenizers("toy", "sdxl", sdxl)
    toy_saved = tmp_path / "toy-tokenizers"  # the toy tokenizers saved to a folder: caught by their vocab.json
    for sub, tok in zip(("tokenizer", "tokenizer_2"), load_tokenizers("toy")):
        tok.save_pretrained(str(toy_saved / sub))
    with pytest.raises(TunelabError, match="718 tokens"):
        resolve_tokenizers(str(toy_saved), "sdxl", sdxl)


def test_sdxl_tokenizers_with_a_toy_model_are_refused(tmp_path, toy_checkpoint):
    folder = str(sdxl_sized_tokenizers(tmp_path / "sdxl-tokenizers"))
    assert resolve_tokenizers(folder, "sdxl", "base.safetensors") == folder
    with pytest.raises(TunelabError, match="49,408 tokens.*toy.*'auto'"):
        resolve_tokenizers(folder, "toy", toy_checkpoint)
    with pytest.raises(TunelabError, match="49,408 tokens"):
        resolve_tokenizers("hub", "toy", "toy")


def test_a_diffusers_folder_brings_its_own_tokenizers(tmp_path):
    folder = sdxl_sized_tokenizers(tmp_path / "sdxl-diffusers")
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text('{"block_out_channels": [320, 640, 1280]}')
    assert base_arch(folder) == "sdxl"
    assert resolve_tokenizers("auto", base_arch(folder), folder) == str(folder)


def test_unknown_architecture_leaves_the_setting_to_after_loading(tmp_path):
    assert resolve_tokenizers("auto", None, tmp_path / "old.ckpt") == "auto"
    with pytest.raises(TunelabError, match="resolve it against the model"):
        load_tokenizers("auto")


def test_a_folder_without_the_layout_names_it(tmp_path):
    with pytest.raises(TunelabError, match="tokenizer/ and tokenizer_2/"):
        resolve_tokenizers(str(tmp_path), "sdxl", "base.safetensors")
