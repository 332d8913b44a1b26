"""Axes, cost ordering, infotext, sidecar, sheets, and the in-training entry point."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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
    ("sampler", "dpm++ 2m karras, k_euler", ["DPM++ 2M Karras", "Euler"]),  # A1111's old names and aliases
    ("schedule_type", "karras, sgm_uniform, Automatic", ["Karras", "SGM Uniform", "Automatic"]),
    ("schedule", "exponential", ["Exponential"]),
    ("prompt", '"red, circle", blue', ["red, circle", "blue"]),
    ("freeu", "on, off", [True, False]),
    ("hires_denoise", "0.5-0.7 (+0.1)", [0.5, 0.6, 0.7]),
])
def test_axis_syntax(axis, text, expected):
    assert parse_values(axis, text) == pytest.approx(expected) if axis not in ("sampler", "prompt", "freeu",
                                                                              "schedule_type", "schedule") \
        else parse_values(axis, text) == expected


@pytest.mark.parametrize("axis, text, match", [
    ("seed", "5-1 (+1)", "never gets"), ("cfg", "abc", "not a valid"), ("sampler", "Eulr", "did you mean"),
    ("schedule_type", "Karas", "did you mean 'Karras'"),
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
        assert back["pag_scale"] == "1" and back["seg_blur_sigma"] == "11"  # pamparamm's extension's names
    # A1111 writes JPEG infotext as EXIF UserComment with the UNICODE prefix (piexif checks: test_infotext.py)
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


# --- `tunelab grid --run`: defaults from a training run ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real 2-step toy run (~10 s): checkpoints step-1 and last, a config with non-default text
    settings (max_chunks 2, clip_skip 1, captions in 'caption' mode) that the grid must pick up."""
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.toy.world import make_world
    from tunelab.train.trainer import train

    root = tmp_path_factory.mktemp("run")
    make_world(root / "images", n=6, seed=0)
    index = root / "index.parquet"
    build_index([f"folder:{root / 'images'}"], index,
                IndexOptions(buckets=BucketConfig(resolution=64, min_side=64, max_side=64, step=32)))
    run_file = root / "run.toml"
    run_file.write_text(
        f'[run]\noutput_dir = "{root / "run"}"\n[model]\nbase = "toy"\nmax_chunks = 2\nclip_skip = 1\n'
        f'[data]\nindex = "{index}"\n[data.captions]\nmode = "caption"\n'
        '[train]\nbatch_size = 2\nmax_steps = 2\nmixed_precision = "no"\ngradient_checkpointing = false\n'
        '[save]\nevery_n_steps = 1\nevery_n_epochs = 0\ndtype = "fp32"\n')
    train(run_file)
    return root / "run", index


def _grid_cli(*args) -> dict:
    """`tunelab grid ARGS` in-process (the subprocess path is tests/sample/test_cli.py's); the spec written."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    res = CliRunner().invoke(app, ["grid", *map(str, args)])
    assert res.exit_code == 0, res.output
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "grid.json").read_text())["spec"]


def test_grid_of_a_run_takes_its_checkpoints_and_text_settings(tmp_path, tiny_run):
    from tunelab.data.captions import CaptionConfig
    from tunelab.sample.prompts import prompts_from_index

    run, index = tiny_run
    spec = _grid_cli("--run", run, "--from-index", index, "--n-prompts", 2, "--prompt-field", "training",
                     "--steps", 1, "--out", tmp_path / "g")
    ckpts = run / "checkpoints"
    assert spec["checkpoints"] == [str(ckpts / "step-00000001.safetensors"), str(ckpts / "last.safetensors")]
    assert spec["tokenizers"] == "toy" and spec["base"]["max_chunks"] == 2 and spec["base"]["clip_skip"] == 1
    assert spec["base"]["clip_skip_te2"] is True  # the trainer applies clip_skip to both encoders
    # prompts built the way training built them: the run's caption mode, not the default (tags)
    seed = spec["base"]["seed"]
    assert spec["prompts"] == prompts_from_index(index, 2, seed, "training", CaptionConfig(mode="caption"))
    assert spec["prompts"] != prompts_from_index(index, 2, seed, "training", None)
    assert all(p.startswith("A picture of") for p in spec["prompts"])

    # explicit options still win
    spec = _grid_cli(ckpts / "last.safetensors", "--run", run, "--max-chunks", 1, "--clip-skip", 2, "-p", "red star",
                     "--no-clip-skip-te2", "--steps", 1, "--out", tmp_path / "h")
    assert spec["checkpoints"] == [str(ckpts / "last.safetensors")]
    assert spec["base"]["max_chunks"] == 1 and spec["base"]["clip_skip"] == 2 and spec["base"]["clip_skip_te2"] is False


def test_grid_run_must_be_a_run(tmp_path, tiny_run):
    from typer.testing import CliRunner

    from tunelab.cli import app

    res = CliRunner().invoke(app, ["grid", "--run", str(tmp_path), "-p", "x", "--out", str(tmp_path / "g")])
    assert isinstance(res.exception, TunelabError) and "not a run directory (no config.json)" in str(res.exception)
    empty = tmp_path / "fresh"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text((tiny_run[0] / "config.json").read_text())
    res = CliRunner().invoke(app, ["grid", "--run", str(empty), "-p", "x", "--out", str(tmp_path / "g")])
    assert isinstance(res.exception, TunelabError) and "no checkpoints" in str(res.exception)


@pytest.mark.parametrize("base, axis, match", [
    ({"steps": 0}, None, "steps must be at least 1, got 0"),  # was a ZeroDivisionError in the scheduler
    ({"cfg": -1.0}, None, "cfg must be 0 or more, got -1.0"),
    ({"width": -64}, None, "width must be a positive multiple of 8"),  # was torch's "negative dimension"
    ({"height": 0}, None, "height must be a positive multiple of 8"),
    ({}, "steps: 0, 10", r"steps must be at least 1, got 0 \(on the Y axis\)"),
    ({}, "width: 64, 60", r"width must be a positive multiple of 8 .*got 60 \(on the Y axis\)"),
])
def test_unusable_numbers_are_refused_before_any_model_loads(tmp_path, base, axis, match):
    def no_loading(*args):
        raise AssertionError("a model was loaded before the settings were checked")

    spec = GridSpec(base=SampleSettings(**base), checkpoints=["a.safetensors"], prompts=["x"],
                    y=Axis.parse(axis) if axis else None)
    with pytest.raises(TunelabError, match=match):
        render_grid(spec, tmp_path / "g", loader=no_loading, progress=False)


def test_grid_steps_zero_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    from tunelab import cli

    monkeypatch.setattr("sys.argv", ["tunelab", "grid", str(tmp_path / "a.safetensors"), "-p", "x", "--steps", "0",
                                     "--cfg", "-2", "--out", str(tmp_path / "g")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert "steps must be at least 1, got 0" in err[0] and "cfg must be 0 or more, got -2.0" in err[0]
    assert not (tmp_path / "g").exists()
