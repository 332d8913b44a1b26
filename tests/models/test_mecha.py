"""sd-mecha reads our files: it recognises the key sets of both presets as `sdxl-sgm`, merges two toy
checkpoints to exactly (a + b) / 2, and places per-block ratios where `blocks.merge_block_of` says."""

from __future__ import annotations

from pathlib import Path

import pytest
import sd_mecha
import torch
from safetensors.torch import load_file
from sd_mecha.extensions import model_configs

from tunelab.models import blocks, vocab
from tunelab.models.checkpoint import inspect_preset, new_checkpoint


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("mecha")
    return (new_checkpoint("toy", folder / "a.safetensors", seed=1, dtype="fp32"),
            new_checkpoint("toy", folder / "b.safetensors", seed=2, dtype="fp32"))


def _inferred_config(node, complete: bool) -> str:
    """The config sd-mecha infers for a model node (it ranks every known config by the keys it
    matches). `complete=False` for the toy preset: its UNet has fewer transformer layers than SDXL,
    so sdxl-sgm's mandatory keys are not all there, and sd-mecha treats those as merely missing."""
    with sd_mecha.open_graph(node) as graph:
        return graph.finalize_root(check_mandatory_keys=complete).model_config.identifier


def test_toy_checkpoint_is_recognised_as_sdxl_sgm(toy_pair):
    a, _ = toy_pair
    assert _inferred_config(sd_mecha.model(a), complete=False) == "sdxl-sgm"
    config = model_configs.resolve("sdxl-sgm").keys()
    assert set(load_file(a)) <= set(config)  # no key sd-mecha would call extra


def test_sdxl_preset_keys_are_recognised_as_sdxl_sgm():
    """The full preset's key list without allocating: `tunelab model inspect --preset sdxl --json`'s
    keys, as meta tensors; sd-mecha must infer sdxl-sgm with every mandatory key present."""
    keys = inspect_preset("sdxl")["keys"]
    meta = {k["key"]: torch.empty(k["shape"], device="meta") for k in keys}
    assert len(meta) == 2513
    assert _inferred_config(sd_mecha.model(meta), complete=True) == "sdxl-sgm"


@pytest.mark.parametrize("output_dtype", [None, torch.float32])
def test_weighted_sum_of_two_toy_checkpoints(toy_pair, output_dtype):
    """`weighted_sum(a, b, alpha=0.5)` is (a + b) / 2 on every key; fp16 output unless asked otherwise."""
    a, b = toy_pair
    recipe = sd_mecha.weighted_sum(sd_mecha.model(a), sd_mecha.model(b), alpha=0.5)
    kw = {} if output_dtype is None else {"output_dtype": output_dtype}
    out = sd_mecha.merge(recipe, output=None, strict_mandatory_keys=False, **kw)
    out.pop("__metadata__")
    A, B = load_file(a), load_file(b)
    assert set(out) == set(A)  # nothing dropped, nothing invented for the keys the toy lacks
    assert {v.dtype for v in out.values()} == {output_dtype or torch.float16}
    tol = {"rtol": 1e-3, "atol": 1e-6} if output_dtype is None else {"rtol": 1e-6, "atol": 1e-7}
    for key in A:
        torch.testing.assert_close(out[key].float(), (A[key] + B[key]) / 2, **tol, msg=key)
    # what was checked spans the UNet and both text encoders (and the VAE)
    assert {blocks.component_of(k) for k in A} == {"te1", "te2", "unet", "vae"}
    te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    te2 = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    unet = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    assert {te1, te2, unet} <= set(A) and not torch.equal(A[te2], B[te2])


def test_block_ratios_land_where_merge_block_of_says(toy_pair):
    """Per-block alphas through sd-mecha's `sdxl-supermerger_blocks` conversion, typed the way users
    type them (parsed by vocab.parse_block): each key gets the ratio of its `merge_block_of` block."""
    a, b = toy_pair
    typed = {"base": 0.0, **{f"in{i}": 0.05 * (i + 1) for i in range(9)}, "mid": 0.5,
             **{f"out{i}": 0.55 + 0.04 * i for i in range(9)}, "vae": 1.0}
    ratios = {vocab.parse_block(name, "merge"): value for name, value in typed.items()}
    assert list(ratios) == list(vocab.MERGE_BLOCKS)
    alpha = sd_mecha.convert(sd_mecha.literal(ratios, config="sdxl-supermerger_blocks"), "sdxl-sgm")
    recipe = sd_mecha.weighted_sum(sd_mecha.model(a), sd_mecha.model(b), alpha=alpha)
    out = sd_mecha.merge(recipe, output=None, strict_mandatory_keys=False, output_dtype=torch.float32)
    out.pop("__metadata__")
    A, B = load_file(a), load_file(b)
    for key in A:
        r = ratios[blocks.merge_block_of(key)]
        torch.testing.assert_close(out[key], A[key] * (1 - r) + B[key] * r, rtol=1e-6, atol=1e-7, msg=key)
