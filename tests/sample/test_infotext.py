"""Infotext against the tools that read it: A1111 v1.10's writer and reader (re-derived below from
its code), piexif (A1111's EXIF library), and the field names of the extensions that restore PAG,
SEG and CFG rescale in A1111 / Forge."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from itertools import groupby

import pytest

from tunelab.sample.infotext import (exif_user_comment, extension_block_list, format_infotext, parse_infotext,
                                     read_infotext, save_with_infotext, settings_params)
from tunelab.sample.pipeline import SampleSettings

piexif = pytest.importorskip("piexif")  # the dev extra; A1111's own EXIF library
import piexif.helper  # noqa: E402

TEXT = 'café ☕, (1boy:0.8)\nNegative prompt: "worst" quality\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64'


# --- A1111 v1.10, re-derived --------------------------------------------------------------------------------

def a1111_read_info(path) -> str | None:
    """A1111 v1.10 modules/images.py `read_info_from_image`: the "parameters" text, replaced by a
    non-empty EXIF UserComment read with piexif."""
    from PIL import Image

    with Image.open(path) as im:
        items = (im.info or {}).copy()
    geninfo = items.pop("parameters", None)
    if "exif" in items:
        exif = piexif.load(items.pop("exif"))
        comment = (exif or {}).get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
        try:
            comment = piexif.helper.UserComment.load(comment)
        except ValueError:
            comment = comment.decode("utf8", errors="ignore")
        if comment:
            geninfo = comment
    return geninfo


def a1111_save(image, path, geninfo: str) -> None:
    """A1111 v1.10 modules/images.py `save_image_with_geninfo` for .jpg / .webp: save, then insert
    EXIF {Exif: {UserComment: UserComment.dump(geninfo, encoding="unicode")}} with piexif."""
    image.save(path, format="JPEG" if path.suffix == ".jpg" else "WEBP", quality=80)
    exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(geninfo, encoding="unicode")}})
    piexif.insert(exif, str(path))


_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # infotext_utils.re_param_code


def a1111_parse(text: str) -> dict[str, str]:
    """The core of A1111 v1.10 modules/infotext_utils.py `parse_generation_parameters`: prompt,
    negative, the last line's pairs (JSON-unquoted, "WxH" split into -1 / -2), Clip skip 1 when absent."""
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    res: dict[str, str] = {}
    for k, v in _RE_PARAM.findall(last):
        if v[:1] == '"' and v[-1:] == '"':
            v = json.loads(v)
        size = re.match(r"^(\d+)x(\d+)$", v)
        if size:
            res[f"{k}-1"], res[f"{k}-2"] = size.group(1), size.group(2)
        else:
            res[k] = v
    res.setdefault("Clip skip", "1")  # "Missing CLIP skip means it was set to 1 (the default)"
    return res


# --- JPEG / WebP: the EXIF UserComment --------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jpg", "webp"])
def test_a1111_reads_tunelab_jpeg_and_webp(tmp_path, ext):
    from PIL import Image

    path = save_with_infotext(Image.new("RGB", (16, 16), (200, 30, 30)), tmp_path / f"x.{ext}", TEXT)
    assert a1111_read_info(path) == TEXT
    with Image.open(path) as im:
        comment = piexif.load(im.info["exif"])["Exif"][piexif.ExifIFD.UserComment]
    # type UNDEFINED (piexif hands BYTE back as a tuple of ints, on which A1111 crashes), and the
    # bytes exactly what A1111 stores: "UNICODE\0" + UTF-16BE
    assert isinstance(comment, bytes) and comment == piexif.helper.UserComment.dump(TEXT, encoding="unicode")
    assert read_infotext(path) == TEXT


def test_exif_block_is_what_piexif_dumps():
    ours = exif_user_comment(TEXT)
    theirs = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(TEXT, encoding="unicode")}})
    assert piexif.load(ours)["Exif"] == piexif.load(theirs)["Exif"]
    # the UserComment entry (tag 0x9286) is typed 7 = UNDEFINED, big-endian as piexif writes it
    entry = ours.index(b"\x92\x86")
    assert struct.unpack(">HHI", ours[entry:entry + 8]) == (0x9286, 7, len(TEXT.encode("utf_16_be")) + 8)


@pytest.mark.parametrize("ext", ["jpg", "webp"])
def test_tunelab_reads_a1111_jpeg_and_webp(tmp_path, ext):
    from PIL import Image

    path = tmp_path / f"a.{ext}"
    a1111_save(Image.new("RGB", (16, 16), (10, 90, 200)), path, TEXT)
    assert a1111_read_info(path) == TEXT and read_infotext(path) == TEXT


def test_read_infotext_charsets_and_old_files(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    # an ASCII-prefixed comment (piexif's default encoding)
    path = tmp_path / "ascii.jpg"
    img.save(path, format="JPEG")
    piexif.insert(piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump("a cat, Steps: 2")}}),
                  str(path))
    assert read_infotext(path) == a1111_read_info(path) == "a cat, Steps: 2"
    # what tunelab wrote before: the tag typed BYTE (Pillow's default for bytes) still reads back
    old = tmp_path / "old.jpg"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + TEXT.encode("utf-16-be")
    img.save(old, format="JPEG", exif=exif)
    assert read_infotext(old) == TEXT
    img.save(tmp_path / "none.jpg", format="JPEG")
    assert read_infotext(tmp_path / "none.jpg") is None


# --- the fields ------------------------------------------------------------------------------------------


def _line(s: SampleSettings, **kw) -> str:
    params = settings_params(s, (1024, 1024), "step-100", "1a2b3c4d5e", kw.pop("vae", None), kw.pop("extra", None), **kw)
    return format_infotext(s.prompt, s.negative, params).split("\n")[-1]


def test_numbers_as_a1111_ui_writes_them():
    # A1111 v1.10 processing.py create_infotext writes p.cfg_scale, p.denoising_strength, p.hr_scale
    # as they arrive; gradio 3.41's Slider has no preprocess, so they arrive as the JSON numbers the
    # browser sent: 6 (not 6.0), 7.5, 0.7, 2 (not 2.0)
    s = SampleSettings(prompt="p", steps=48, cfg=6.0, seed=460372993, hires_scale=2.0, hires_denoise=0.7)
    back = parse_infotext(format_infotext("p", "", settings_params(s, (2048, 2048), "m", None,
                                                                      extra={"first_pass": (1024, 1024)})))
    assert (back["CFG scale"], back["Denoising strength"], back["Hires upscale"]) == ("6", "0.7", "2")
    assert "CFG scale: 7.5," in _line(dataclasses.replace(s, cfg=7.5))
    assert "CFG scale: 0.30000000000000004," in _line(dataclasses.replace(s, cfg=0.1 + 0.2))  # no rounding


def test_clip_skip_vae_and_rescale_fields():
    s = SampleSettings(prompt="p", cfg=6, clip_skip=1)
    assert "Clip skip" not in _line(s)  # A1111: "Clip skip": None if clip_skip <= 1 else clip_skip
    assert a1111_parse(format_infotext("p", "", settings_params(s, (64, 64), "m", None)))["Clip skip"] == "1"
    assert "Clip skip: 2," in _line(dataclasses.replace(s, clip_skip=2))
    # A1111 v1.10 sd_vae.py: VAE = os.path.basename(file), VAE hash = sha256(file)[0:10]; both
    # follow Model in create_infotext
    line = _line(s, vae="sdxl_vae.safetensors", vae_hash="235745af8d")
    assert "Model: step-100, VAE hash: 235745af8d, VAE: sdxl_vae.safetensors," in line
    # CFG Rescale (Seshelle/CFG_Rescale_webui scripts/CFGRescale.py: written when > 0, restored
    # from "CFG Rescale", 0 when missing): the phi the render applied, set or defaulted
    assert "CFG Rescale: 0.7," in _line(s, rescale=0.7)
    assert "CFG Rescale" not in _line(s, rescale=0.0) and "CFG Rescale" not in _line(s)
    assert "CFG Rescale: 0.5," in _line(dataclasses.replace(s, guidance_rescale=0.5))


def test_pag_and_seg_fields_are_the_extensions():
    # pamparamm/sd-perturbed-attention scripts/pag.py and scripts/seg.py (Forge):
    # p.extra_generation_params.update(pag_enabled=..., pag_scale=..., pag_rescale=...,
    # pag_rescale_mode=..., pag_adaptive_scale=..., pag_block=..., pag_block_id=..., pag_block_list=...)
    # and the same for seg_, with seg_blur_sigma in place of the adaptive scale; its infotext_fields restore
    # them under these names (enabled: "pag_enabled" in the text). Sliders at 1, 3, 11 arrive as ints.
    s = SampleSettings(prompt="p", cfg=6, pag_scale=1, seg_scale=3, seg_sigma=11)
    line = _line(s)
    assert ("pag_enabled: True, pag_scale: 1, pag_rescale: 0, pag_rescale_mode: full, pag_adaptive_scale: 0, "
            "pag_block: middle, pag_block_id: 0, pag_block_list: , seg_enabled: True, seg_scale: 3, seg_rescale: 0, "
            "seg_rescale_mode: full, seg_blur_sigma: 11, seg_block: middle, seg_block_id: 0, seg_block_list: , ") in line
    for sigma in (float("inf"), 9999999.0, -1.0):  # infinite blur is the extension's -1
        assert "seg_blur_sigma: -1," in _line(dataclasses.replace(s, seg_sigma=sigma))
    hires = _line(dataclasses.replace(s, hires_scale=1.5), extra={"first_pass": (64, 64)})
    assert "pag_hr_override: False" in hires and "seg_hr_override: False" in hires  # written when hires is on
    assert "PAG scale" not in line and "SEG blur sigma" not in line


def _parse_unet_blocks(sgm_blocks: list[str], block_list: str) -> set[str]:
    """pamparamm/sd-perturbed-attention guidance_utils.py `parse_unet_blocks`, re-derived: the
    BasicTransformerBlock names of each part grouped by block number (middle numbers minus 1),
    then each item "d|m|u" + group index [+ "." + transformer index] picks names."""
    parts: dict[str, list[tuple[int, str]]] = {"input": [], "middle": [], "output": []}
    for name in sgm_blocks:
        head, number = name.split(".")[:2]
        part = head.split("_")[0]
        parts[part].append((int(number) - (part == "middle"), name))
    grouped = {p: [[n for _, n in g] for _, g in groupby(v, key=lambda b: b[0])] for p, v in parts.items()}
    chosen: set[str] = set()
    for item in (b.strip() for b in block_list.split(",")):
        group = grouped[{"d": "input", "m": "middle", "u": "output"}[item[0]]]
        index, *transformer = item[1:].split(".")
        names = group[int(index)]
        chosen |= {names[int(transformer[0])]} if transformer else set(names)
    return chosen


def test_layer_specs_in_the_extensions_block_list(sample_components):
    from tunelab.models import keys as K
    from tunelab.sample.guidance import select_layers

    names = list(sample_components.unet.attn_processors)
    # the toy UNet has SDXL's layout; its SGM names are those the extension walks
    to_sgm = {r.names[0].removesuffix(".to_q.weight") + ".processor": r.sgm.removeprefix("model.diffusion_model.")
              .removesuffix(".attn1.to_q.weight") for r in K.rules_for_arch("toy")
              if r.names and r.names[0].endswith(".attn1.to_q.weight")}
    sgm_blocks = sorted(to_sgm.values(), key=lambda n: (["input_blocks", "middle_block", "output_blocks"].index(
        n.split(".")[0]), int(n.split(".")[1]), n))
    expected = {"down.1": "d0,d1", "down.2": "d2,d3", "up.0.1": "u1", "up.1": "u3,u4,u5", "mid": "m0",
                "mid,down.1": "d0,d1,m0", "up_blocks.0.attentions.0.transformer_blocks.1": "u0.1"}
    for spec, block_list in expected.items():
        assert extension_block_list(names, spec) == block_list
        # the extension's parser picks exactly the layers tunelab perturbs
        assert _parse_unet_blocks(sgm_blocks, block_list) == {to_sgm[n] for n in select_layers(names, spec)}
    line = _line(SampleSettings(prompt="p", pag_scale=2, pag_layers="down.1"), attn_layers=names)
    assert 'pag_block_list: "d0,d1"' in line  # A1111 quotes values holding commas
    with pytest.raises(ValueError, match="attention processor names"):
        _line(SampleSettings(prompt="p", pag_scale=2, pag_layers="down.1"))


def test_round_trip_through_tunelab_and_a1111_parsers():
    s = SampleSettings(prompt="a, b: (c:1.2)", negative="worst, low", seed=7, steps=30, cfg=6.5, clip_skip=2,
                       pag_scale=1, seg_scale=3, seg_sigma=float("inf"), hires_scale=1.5, hires_denoise=0.35)
    text = format_infotext(s.prompt, s.negative, settings_params(
        s, (96, 96), "step-100", "1a2b3c4d5e", "vae.safetensors", {"first_pass": (64, 64)}, vae_hash="0123456789",
        rescale=0.7))
    ours, theirs = parse_infotext(text), a1111_parse(text)
    assert ours["Prompt"] == s.prompt and ours["Negative prompt"] == s.negative
    for key in ("Steps", "Sampler", "CFG scale", "Seed", "Model hash", "Model", "VAE hash", "VAE", "Clip skip",
                "Denoising strength", "Hires upscale", "CFG Rescale", "pag_enabled", "pag_scale", "pag_block",
                "pag_block_list", "seg_enabled", "seg_scale", "seg_blur_sigma", "seg_block_list"):
        assert ours[key] == theirs[key], key
    assert (theirs["Size-1"], theirs["Size-2"]) == ("64", "64") and ours["Size"] == "64x64"
    assert (ours["CFG scale"], ours["seg_blur_sigma"], ours["CFG Rescale"]) == ("6.5", "-1", "0.7")


# --- wired into the grid -----------------------------------------------------------------------------------


def test_grid_cells_record_vae_hash_and_default_rescale(tmp_path, toy_checkpoint, sample_components, toy_tokenizers):
    import torch

    from tunelab.sample.grid import GridSpec, render_grid
    from tunelab.sample.pipeline import build_pipeline

    ztsnr = build_pipeline(dataclasses.replace(sample_components, extras={"v_pred": torch.tensor([]),
                                                                          "ztsnr": torch.tensor([])}),
                           toy_tokenizers, name="zt", vae_name=toy_checkpoint.name)  # a full checkpoint is a --vae
    spec = GridSpec(base=SampleSettings(prompt="red", steps=1, cfg=3, seg_scale=1, seg_layers="up.0"),
                    checkpoints=["zt"], vae=str(toy_checkpoint), min_cell=64)
    res = render_grid(spec, tmp_path / "g", loader=lambda path, spec: ztsnr, progress=False)
    info = parse_infotext(read_infotext(res.out_dir / res.cells[0].file))
    assert info["CFG Rescale"] == "0.7"  # applied by default to zero-terminal-SNR models, so recorded
    assert info["VAE"] == toy_checkpoint.name
    assert info["VAE hash"] == hashlib.sha256(toy_checkpoint.read_bytes()).hexdigest()[:10]
    assert info["seg_block_list"] == "u0,u1,u2" and "Clip skip" in info


def test_text_condition_fields():
    # A1111 v1.10 writes "Pad conds: True" when it padded prompt/negative (sd_samplers_common.py
    # add_infotext) and restores pad_cond_uncond from it (shared_options.py, infotext='Pad conds'); it
    # has no field for an empty negative (always zeros on SDXL), the comma back-off or TE2's clip skip,
    # so tunelab names those only where they differ from A1111's behaviour.
    s = SampleSettings(prompt="p", cfg=6)
    assert not re.search(r"Uncond|Pad conds|Comma backtrack|Clip skip TE2", _line(s))
    assert "Uncond: empty," in _line(dataclasses.replace(s, uncond="empty"))
    assert "Uncond" not in _line(dataclasses.replace(s, uncond="empty", negative="worst"))  # encoded either way
    assert "Pad conds: True," in _line(dataclasses.replace(s, pad_conds=True))
    assert "Comma backtrack: 0," in _line(dataclasses.replace(s, comma_backtrack=0))
    assert "Clip skip TE2" not in _line(dataclasses.replace(s, clip_skip_te2=True))  # clip skip 2: no difference
    assert "Clip skip TE2: True," in _line(dataclasses.replace(s, clip_skip_te2=True, clip_skip=1))
