"""`model convert --to diffusers` writes a folder diffusers loads as it is, under the key names
diffusers' own reverse script expects, and that converts back bit-exactly.

References:
- diffusers scripts/convert_diffusers_to_original_sdxl.py: `convert_openai_text_enc_state_dict`
  (text_encoder/ keys taken as they are, prefixed `conditioner.embedders.0.transformer.`) and
  `convert_openclip_text_enc_state_dict` (text_encoder_2/: `textenc_conversion_lst` renames, q/k/v
  concatenated into `in_proj_*`, prefixed `conditioner.embedders.1.model.`), re-derived below.
- diffusers StableDiffusionXLPipeline.from_pretrained: model_index.json names each component's
  (library, class); every sub-folder is loaded by that class.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tunelab.errors import TunelabError
from tunelab.models import keys as K
from tunelab.models.checkpoint import export_diffusers, import_diffusers, save_checkpoint

# convert_diffusers_to_original_sdxl.py, textenc_conversion_lst: (stable-diffusion, HF Diffusers)
TEXTENC_CONVERSION = [
    ("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"), ("ln_final.", "text_model.final_layer_norm."),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
]


def script_te1(sd: dict) -> dict:
    return {"conditioner.embedders.0.transformer." + k: v for k, v in sd.items()}


def script_te2(sd: dict) -> dict:
    protected = {re.escape(hf): orig for orig, hf in TEXTENC_CONVERSION}
    pattern = re.compile("|".join(protected))
    out, qkv = {}, {}
    for k, v in sd.items():
        if m := re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", k):
            qkv.setdefault((m[1] + ".self_attn", m[3]), [None] * 3)["qkv".index(m[2])] = v
            continue
        out[pattern.sub(lambda g: protected[re.escape(g.group(0))], k)] = v
    for (pre, kind), parts in qkv.items():
        out[pattern.sub(lambda g: protected[re.escape(g.group(0))], pre) + f".in_proj_{kind}"] = torch.cat(parts)
    return {"conditioner.embedders.1.model." + k: v for k, v in out.items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, toy_checkpoint):
    from tunelab.cli import app

    out = tmp_path_factory.mktemp("diffusers") / "toy"
    res = CliRunner().invoke(app, ["model", "convert", str(toy_checkpoint), "--to", "diffusers", "--dtype", "fp32",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_stable_diffusion_xl_pipeline_loads_the_folder_as_it_is(folder, toy_components):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tunelab.models.text import load_tokenizers

    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                        "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder"),
                     (CLIPTextModelWithProjection, "text_encoder_2")):
        _, info = cls.from_pretrained(folder / sub, output_loading_info=True, local_files_only=True)
        assert not any(info.values()), (sub, info)  # no missing, unexpected or mismatched keys
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(toy_components, "text_encoder_1" if sub == "text_encoder" else sub), getattr(pipe, sub)
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
        # Both loaders leave the weights as views into their files, where a tensor's address is
        # only 4-byte aligned; CPU kernels take other paths on other alignments (the last bits of
        # a float32 differ), so the outputs below are compared from freshly allocated copies.
        for module in (mine, theirs):
            for t in [*module.parameters(), *module.buffers()]:
                t.data = t.data.clone()
    ids = []
    for ours, theirs in zip(load_tokenizers("toy"), (pipe.tokenizer, pipe.tokenizer_2)):
        kw = dict(padding="max_length", max_length=77, return_tensors="pt")
        ids.append(theirs(["red circle, sky_background"], **kw).input_ids)
        assert torch.equal(ids[-1], ours(["red circle, sky_background"], **kw).input_ids)  # pads included
    with torch.no_grad():
        for mine, theirs, x in ((toy_components.text_encoder_1, pipe.text_encoder, ids[0]),
                                (toy_components.text_encoder_2, pipe.text_encoder_2, ids[1])):
            a, b = mine(x, output_hidden_states=True), theirs(x, output_hidden_states=True)
            assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])
        assert torch.equal(toy_components.text_encoder_2(ids[1]).text_embeds, pipe.text_encoder_2(ids[1]).text_embeds)
        gen = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 96, generator=gen)
        cond = {"text_embeds": torch.randn(1, 64, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        t = torch.tensor([500])
        assert torch.equal(toy_components.unet(x, t, ctx, added_cond_kwargs=cond).sample,
                           pipe.unet(x, t, ctx, added_cond_kwargs=cond).sample)


def test_text_encoder_keys_are_what_diffusers_reverse_script_expects(folder, toy_checkpoint):
    sgm = load_file(toy_checkpoint)  # tunelab's SGM names
    te1 = script_te1(load_file(folder / "text_encoder" / "model.safetensors"))
    ours1 = {k for k in sgm if k.startswith(K.TE1)}
    assert len(ours1) == 52 and te1.keys() == ours1  # all 52 land on their SGM names
    assert all(torch.equal(te1[k], sgm[k]) for k in ours1)
    te2 = script_te2(load_file(folder / "text_encoder_2" / "model.safetensors"))
    ours2 = {k for k in sgm if k.startswith(K.TE2)}
    # the script's one gap: it keeps transformers' Linear `text_projection.weight`; the OpenCLIP layout
    # (SGM files, tunelab's key map) stores `text_projection`, transposed
    projection = te2.pop(K.TE2 + "text_projection.weight")
    assert torch.equal(projection.t(), sgm[K.TE2 + "text_projection"])
    assert te2.keys() == ours2 - {K.TE2 + "text_projection"}
    assert all(torch.equal(te2[k], sgm[k]) for k in te2)


def test_the_folder_converts_back_bit_exactly_with_its_metadata(folder, toy_checkpoint, tmp_path):
    from tunelab.models.safetensors_io import read_header

    comps = import_diffusers(folder)
    out = save_checkpoint(comps, tmp_path / "back.safetensors", dtype="fp32")
    a, b = load_file(toy_checkpoint), load_file(out)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    before, after = read_header(toy_checkpoint).metadata, read_header(out).metadata
    for key in ("modelspec.title", "modelspec.date", "modelspec.resolution", "modelspec.hash_sha256"):
        assert after[key] == before[key], key  # the same tensors: the same hash, too


def test_an_sdxl_model_needs_tokenizers_and_nothing_is_written_without(tmp_path, toy_components):
    sdxl = dataclasses.replace(toy_components, arch="sdxl", source="model.safetensors")
    with pytest.raises(TunelabError, match="--tokenizers") as err:
        export_diffusers(sdxl, tmp_path / "out")
    assert "tokenizer_2" in str(err.value) and not (tmp_path / "out").exists()
