"""Axes, cost ordering, infotext, sidecar, sheets, and the in-training entry point."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tunelab.errors import TunelabError
from tunelab.sample.grid import Axis, GridSpec, parse_values, plan_cells, render_grid, render_grid_from_components
from tunelab.sample.infotext import format_infotext, parse_infotext, read_infotext, save_with_infotext
from tunelab.sample.pipeline import SampleSettings


@pytest.mark.parametrize("axis, text, expected", [
    ("seed", "1-5", [1, 2, 3, 4, 5]),
    ("seed", "1-5 (+2)", [1, 3, 5]),
    ("steps", "10-1 (-3)", [10, 7, 4, 1]),
    ("steps", "1-10 [5]", [1, 3, 5, 7, 10]),
    ("cfg", "1-2 (+0.25)", [1.0, 1.25, 1.5, 1.75, 2.0]),
    ("cfg", "3-6 [3]", [3.0, 4.5, 6.0]),
    ("cfg", "3, 4.5,6", [3.0, 4.5, 6.0]),
    ("seed", "460372993, 744089893, 1-2", [460372993, 744089893, 1, 2]),
    ("sampler", "euler a, DDIM CFG++", ["Euler a", "DDIM CFG++"]),
    ("prompt", '"red, circle", blue', ["red, circle", "blue"]),
    ("freeu", "on, off", [True, False]),
    ("hires_denoise", "0.5-0.7 (+0.1)", [0.5, 0.6, 0.7]),
])
def test_axis_syntax(axis, text, expected):
    assert parse_values(axis, text) == pytest.approx(expected) if axis not in ("sampler", "prompt", "freeu") \
        else parse_values(axis, text) == expected


@pytest.mark.parametrize("axis, text, match", [
    ("seed", "5-1 (+1)", "never gets"), ("cfg", "abc", "not a valid"), ("sampler", "Eulr", "did you mean"),
    ("colour", "1", "unknown axis"), ("seed", "", "no values"),
])
def test_axis_errors(axis, text, match):
    with pytest.raises(TunelabError, match=match):
        parse_values(axis, text)


def test_axis_parse_and_labels():
    a = Axis.parse("CFG scale: 3-5")
    assert a.name == "cfg" and a.values == [3.0, 4.0, 5.0] and a.label(3.0) == "CFG: 3"
    assert Axis.parse("checkpoint").values == [] and Axis("checkpoint", []).label("/x/step-100.safetensors") == "step-100"


def test_resolve_places_checkpoints_and_prompts():
    spec = GridSpec(checkpoints=["a", "b"], prompts=["p1", "p2"], z=Axis.parse("seed: 1, 2")).resolve()
    assert (spec.x.name, spec.y.name, spec.z.name) == ("checkpoint", "prompt", "seed")
    with pytest.raises(TunelabError, match="same setting"):
        GridSpec(checkpoints=["a"], x=Axis.parse("seed: 1"), y=Axis.parse("seed: 2")).resolve()
    with pytest.raises(TunelabError, match="at least one checkpoint"):
        GridSpec().resolve()


def test_cost_order_groups_checkpoints():
    spec = GridSpec(checkpoints=["a", "b", "c"], y=Axis("checkpoint", ["c", "a", "b"]), x=Axis.parse("seed: 1-2"),
                    z=Axis.parse("cfg: 3, 6")).resolve()
    order = [c.checkpoint for c in plan_cells(spec)]
    assert order == ["a"] * 4 + ["b"] * 4 + ["c"] * 4  # each checkpoint's cells together


def test_infotext_round_trip_png_and_jpeg(tmp_path):
    from PIL import Image

    s = SampleSettings(prompt="(1boy:0), [astolfo]", negative="worst quality, low", seed=460372993, steps=48,
                       cfg=6, sampler="DDIM CFG++", pag_scale=1, seg_scale=3, hires_scale=1.5)
    from tunelab.sample.infotext import settings_params

    text = format_infotext(s.prompt, s.negative, settings_params(s, (1536, 1536), "step-100", "1a2b3c4d5e",
                                                                 extra={"first_pass": (1024, 1024)}))
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    for ext in ("png", "jpg"):
        path = save_with_infotext(img, tmp_path / f"x.{ext}", text)
        back = parse_infotext(read_infotext(path))
        assert back["Prompt"] == s.prompt and back["Negative prompt"] == s.negative
        assert back["Steps"] == "48" and back["Sampler"] == "DDIM CFG++" and back["CFG scale"] == "6"
        assert back["Seed"] == "460372993" and back["Size"] == "1024x1024" and back["Hires upscale"] == "1.5"
        assert back["Model hash"] == "1a2b3c4d5e" and back["Model"] == "step-100" and back["Clip skip"] == "2"
        assert back["PAG scale"] == "1" and back["SEG blur sigma"] == "11"
    # A1111 writes JPEG infotext as EXIF UserComment with the UNICODE prefix
    raw = Image.open(tmp_path / "x.jpg").getexif().get_ifd(0x8769)[0x9286]
    assert raw.startswith(b"UNICODE\0")


def _counting_loader(model):
    calls = []

    def load(path, spec):
        calls.append(path)
        return dataclasses.replace(model, name=path)

    return load, calls


def test_render_grid_loads_each_checkpoint_once(tmp_path, toy_model):
    load, calls = _counting_loader(toy_model)
    base = SampleSettings(steps=1, cfg=3)
    spec = GridSpec(base=base, checkpoints=["m1", "m2"], prompts=["red circle", ""],
                    z=Axis.parse("seed: 1, 2"), min_cell=64)
    res = render_grid(spec, tmp_path / "g", loader=load, progress=False)
    assert calls == ["m1", "m2"] and res.loads == 2 and len(res.cells) == 8
    assert len(res.sheets) == 3 and all(p.exists() for p in res.sheets)  # z0, z1, combined
    for c in res.cells:
        assert (res.out_dir / c.file).exists() and f"-s{c.settings.seed}-64x64-cfg3-st1." in c.file
    assert parse_infotext(read_infotext(res.out_dir / res.cells[0].file))["Model"] == "m1"
    side = json.loads(res.sidecar.read_text())
    assert side["loads"] == 2 and len(side["cells"]) == 8
    # the sidecar regenerates the same grid, cell for cell
    again = render_grid(GridSpec.from_json(res.sidecar), tmp_path / "g2", loader=_counting_loader(toy_model)[0],
                        progress=False)
    for a, b in zip(res.cells, again.cells):
        assert a.file == b.file and a.infotext == b.infotext
        assert np.array_equal(np.asarray(_open(res.out_dir / a.file)), np.asarray(_open(again.out_dir / b.file)))


def _open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


def test_render_from_live_components(tmp_path, sample_components, toy_tokenizers):
    sample_components.unet.train()
    spec = GridSpec(base=SampleSettings(prompt="red circle", steps=1), x=Axis.parse("seed: 1, 2"), min_cell=64)
    res = render_grid_from_components(sample_components, toy_tokenizers, spec, tmp_path, step=100)
    assert res.out_dir.name == "step-00000100" and res.grid.exists() and res.loads == 0
    assert sample_components.unet.training and not sample_components.vae.training  # modes restored
    sample_components.unet.eval()
    with pytest.raises(TunelabError, match="checkpoint axis"):
        render_grid_from_components(sample_components, toy_tokenizers,
                                    dataclasses.replace(spec, y=Axis("checkpoint", ["a"])), tmp_path, step=1)


def test_sheet_labels_wrap_and_never_clip():
    from tunelab.sample.sheet import draw_sheet, font, wrap
    from PIL import Image

    f = font(18)
    lines = wrap("a long prompt, " * 30, f, 200, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("…") and all(f.getlength(ln) <= 200 for ln in lines)
    assert all(f.getlength(ln) <= 100 for ln in wrap("supercalifragilistic" * 3, f, 100))
    cell = Image.new("RGB", (64, 64))
    sheet = draw_sheet([[cell, cell]], ["x one", "x two"], ["y label"], title="title", min_cell=256)
    assert sheet.size[0] > 2 * 256 and sheet.size[1] > 256  # cells enlarged, room for labels
