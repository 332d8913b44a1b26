"""X/Y/Z grids: axes with A1111 value syntax, cost-ordered rendering, sheets, infotext, sidecar.

A grid is a `GridSpec`: base `SampleSettings`, the checkpoints, and up to three axes (X, Y, Z),
each a setting name with a list of values. Values use A1111's syntax (hand-written parser):
`1, 4, 9` lists; `1-5` = 1,2,3,4,5; `1-5 (+2)` = 1,3,5; `10-1 (-3)` = 10,7,4,1; `1-10 [5]` = five
evenly spaced values 1,3,5,7,10 (rounded down on whole-number axes); text values are
comma-separated with "double quotes" around values that hold commas.

Rendering plans first, executes second: cells are ordered so each checkpoint is loaded once per
grid (the only expensive switch; samplers, CFG, seeds, ... cost nothing to change), rendered one
at a time with a progress bar, each saved alone with its A1111 infotext; then one sheet per Z
value, a combined sheet, and `grid.json`, from which `tunelab grid --from grid.json` renders the
same grid again.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import gc
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tunelab.errors import TunelabError
from tunelab.run import step_name
from tunelab.sample.infotext import format_infotext, model_hash, save_with_infotext, settings_params
from tunelab.sample.pipeline import (SampleSettings, SamplingModel, applied_rescale, canonical_sampler,
                                     canonical_schedule, generate, resolve_sampler)
from tunelab.sample.sheet import draw_sheet, stack_sheets

log = logging.getLogger(__name__)

SPEC_VERSION = 1

# axis name -> (value type, label shown on the sheet). "checkpoint" is not a SampleSettings field.
AXES: dict[str, tuple[type, str]] = {
    "checkpoint": (str, ""), "prompt": (str, ""), "negative": (str, "negative"), "seed": (int, "seed"),
    "cfg": (float, "CFG"), "steps": (int, "steps"), "sampler": (str, ""), "schedule_type": (str, "schedule"),
    "clip_skip": (int, "clip skip"),
    "pag_scale": (float, "PAG"), "seg_scale": (float, "SEG"), "seg_sigma": (float, "SEG sigma"),
    "freeu": (bool, "FreeU"), "hires_scale": (float, "hires x"), "hires_denoise": (float, "hires denoise"),
    "hires_steps": (int, "hires steps"), "width": (int, "width"), "height": (int, "height"),
    "guidance_rescale": (float, "CFG rescale"), "uncond": (str, "uncond"),
    "comma_backtrack": (int, "comma backtrack"), "pad_conds": (bool, "pad conds"), "clip_skip_te2": (bool, "clip skip TE2"),
}
_ALIASES = {"model": "checkpoint", "ckpt": "checkpoint", "cfg_scale": "cfg", "cfg scale": "cfg", "pag": "pag_scale",
            "seg": "seg_scale", "denoise": "hires_denoise", "hires": "hires_scale", "negative_prompt": "negative",
            "schedule": "schedule_type", "scheduler": "schedule_type", "schedule type": "schedule_type"}
_UNUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUM = r"[+-]?" + _UNUM
# "a-b", "a-b (+s)", "a-b (-s)", "a-b [n]"
_RANGE = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})\s*(?:\(\s*([+-]\s*{_UNUM})\s*\)|\[\s*(\d+)\s*\])?\s*$")


# --- axis values ----------------------------------------------------------------------------------------


def axis_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, _ALIASES.get(name.strip().lower(), key))
    if key not in AXES:
        import difflib

        near = difflib.get_close_matches(key, AXES, n=1)
        raise TunelabError(f"unknown axis {name!r}{f' (did you mean {near[0]!r}?)' if near else ''}; "
                           f"axes: {', '.join(AXES)}")
    return key


def _expand_range(item: str, kind: type) -> list[Any] | None:
    m = _RANGE.match(item)
    if m is None:
        return None
    start, end = float(m.group(1)), float(m.group(2))
    if m.group(4) is not None:  # [count]
        n = int(m.group(4))
        if n < 1:
            raise TunelabError(f"{item!r}: the count in [N] must be at least 1")
        vals = [start + (end - start) * i / max(1, n - 1) for i in range(n)] if n > 1 else [start]
    else:
        step = float(m.group(3).replace(" ", "")) if m.group(3) else (1.0 if end >= start else -1.0)
        if step == 0 or (end - start) * step < 0:
            raise TunelabError(f"{item!r}: the step {step:g} never gets from {start:g} to {end:g}")
        n = math.floor((end - start) / step + 1e-9) + 1
        vals = [start + i * step for i in range(n)]
    return [int(v) if kind is int else round(v, 10) for v in vals]


def _convert(item: str, kind: type, axis: str) -> Any:
    try:
        if kind is bool:
            low = item.lower()
            if low not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("on", "true", "1", "yes")
        return kind(float(item)) if kind is int and re.fullmatch(r"[+-]?\d+\.0*", item) else kind(item)
    except ValueError:
        raise TunelabError(f"axis {axis}: {item!r} is not a valid {kind.__name__} value") from None


def parse_values(axis: str, text: str) -> list[Any]:
    """Values of one axis from A1111 syntax (see the module docstring)."""
    axis = axis_name(axis)
    kind = AXES[axis][0]
    items = next(csv.reader([text], skipinitialspace=True)) if text.strip() else []
    values: list[Any] = []
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        expanded = _expand_range(raw, kind) if kind in (int, float) else None
        values += expanded if expanded is not None else [_convert(raw, kind, axis)]
    if axis == "sampler":
        values = [canonical_sampler(v) for v in values]
    if axis == "schedule_type":
        values = [canonical_schedule(v) for v in values]
    if not values:
        raise TunelabError(f"axis {axis} has no values")
    return values


@dataclass
class Axis:
    name: str
    values: list[Any]

    @classmethod
    def parse(cls, text: str) -> "Axis":
        """"seed: 1-3" or "cfg=3,4.5,6"; a bare name ("checkpoint", "prompt") takes its values
        from the grid's checkpoints / prompts."""
        name, sep, values = re.split(r"([:=])", text, maxsplit=1) if re.search(r"[:=]", text) else (text, "", "")
        name = axis_name(name)
        return cls(name, parse_values(name, values) if sep else [])

    def label(self, value: Any) -> str:
        if self.name == "checkpoint":
            return Path(str(value)).stem if str(value) not in ("", "live") else str(value)
        if self.name == "prompt":
            return str(value) if str(value) else "(empty prompt)"
        kind, text = AXES[self.name]
        shown = ("on" if value else "off") if kind is bool else (f"{value:g}" if isinstance(value, float) else value)
        return f"{text}: {shown}" if text else str(shown)


# --- the spec -------------------------------------------------------------------------------------------


@dataclass
class GridSpec:
    """Everything needed to render (and re-render) a grid."""

    base: SampleSettings = field(default_factory=SampleSettings)
    checkpoints: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # values of a bare "prompt" axis
    x: Axis | None = None
    y: Axis | None = None
    z: Axis | None = None
    vae: str | None = None
    dtype: str = "auto"  # fp16 on a GPU, fp32 on the CPU; or fp32 / fp16 / bf16
    device: str = "auto"  # cuda if available, else cpu
    tokenizers: str | None = None  # None / "auto" (each checkpoint's own), "toy", or a folder with tokenizer/ and tokenizer_2/
    image_format: str = "png"  # png or jpg
    min_cell: int = 256

    def axes(self) -> list[Axis]:
        return [a for a in (self.x, self.y, self.z) if a is not None]

    def resolve(self) -> "GridSpec":
        """Fill bare axes from checkpoints/prompts, put extra checkpoints/prompts on free axes,
        and check everything before any model loads."""
        spec = copy.deepcopy(self)
        if not spec.checkpoints:
            raise TunelabError("a grid needs at least one checkpoint")
        for a in spec.axes():
            if not a.values:
                pool = {"checkpoint": spec.checkpoints, "prompt": spec.prompts}.get(a.name)
                if not pool:
                    raise TunelabError(f"axis {a.name} needs values, e.g. '{a.name}: 1, 2, 3'")
                a.values = list(pool)
        used = {a.name for a in spec.axes()}
        for name, pool in (("checkpoint", spec.checkpoints), ("prompt", spec.prompts)):
            if len(pool) > 1 and name not in used:
                slot = next((s for s in ("x", "y", "z") if getattr(spec, s) is None), None)
                if slot is None:
                    raise TunelabError(f"{len(pool)} {name}s but X, Y and Z are taken; put {name} on an axis")
                setattr(spec, slot, Axis(name, list(pool)))
        names = [a.name for a in spec.axes()]
        if len(set(names)) != len(names):
            raise TunelabError(f"the same setting is on two axes: {', '.join(names)}")
        if spec.prompts and "prompt" not in names:
            spec.base = dataclasses.replace(spec.base, prompt=spec.prompts[0])
        if spec.image_format not in ("png", "jpg"):
            raise TunelabError(f"image format must be png or jpg, got {spec.image_format!r}")
        resolve_sampler(spec.base.sampler, spec.base.schedule_type)
        _check_numbers(spec)
        return spec

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["version"] = SPEC_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GridSpec":
        d = dict(d)
        if d.pop("version", SPEC_VERSION) > SPEC_VERSION:
            raise TunelabError("this grid.json was written by a newer tunelab; upgrade to render it")
        base = SampleSettings(**d.pop("base", {}))
        axes = {k: Axis(**d[k]) if d.get(k) else None for k in ("x", "y", "z")}
        rest = {k: v for k, v in d.items() if k not in ("x", "y", "z")}
        return cls(base=base, **axes, **rest)

    @classmethod
    def from_json(cls, path: str | Path) -> "GridSpec":
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data.get("spec", data))


def _check_numbers(spec: GridSpec) -> None:
    """Every setting a cell can get (the base, and each axis value on it) must be usable."""
    problems = spec.base.problems()
    for slot in ("x", "y", "z"):
        axis = getattr(spec, slot)
        if axis is None or axis.name in ("checkpoint", "prompt"):
            continue
        for value in axis.values:
            changed = dataclasses.replace(spec.base, **{axis.name: value})
            problems += [f"{p} (on the {slot.upper()} axis)" for p in changed.problems() if p.startswith(axis.name + " ")]
    if problems:
        raise TunelabError("; ".join(dict.fromkeys(problems)))


# --- the plan -------------------------------------------------------------------------------------------


@dataclass
class Cell:
    xi: int
    yi: int
    zi: int
    checkpoint: str
    settings: SampleSettings
    file: str = ""
    infotext: str = ""


def plan_cells(spec: GridSpec) -> list[Cell]:
    """Every cell of a resolved spec, in execution order: grouped by checkpoint (each loaded once),
    then Z, Y, X. Checkpoints run in the order given."""
    ax = [spec.x, spec.y, spec.z]
    ranges = [range(len(a.values)) if a else range(1) for a in ax]
    cells = []
    for zi in ranges[2]:
        for yi in ranges[1]:
            for xi in ranges[0]:
                changes: dict[str, Any] = {}
                for a, i in zip(ax, (xi, yi, zi)):
                    if a is not None:
                        changes[a.name] = a.values[i]
                ckpt = str(changes.pop("checkpoint", spec.checkpoints[0]))
                cells.append(Cell(xi, yi, zi, ckpt, dataclasses.replace(spec.base, **changes)))
    order = {c: i for i, c in enumerate(dict.fromkeys(str(c) for c in spec.checkpoints + [x.checkpoint for x in cells]))}
    return sorted(cells, key=lambda c: (order[c.checkpoint], c.zi, c.yi, c.xi))


def cell_name(index: int, cell: Cell, size: tuple[int, int], ext: str) -> str:
    """File name with seed, size, CFG and steps (the field's convention), plus the checkpoint."""
    stem = re.sub(r"[^\w.+-]+", "_", Path(cell.checkpoint).stem)[:40] or "model"
    s = cell.settings
    return f"{index:04d}-{stem}-s{s.seed}-{size[0]}x{size[1]}-cfg{s.cfg:g}-st{s.steps}.{ext}"


# --- rendering ------------------------------------------------------------------------------------------


@dataclass
class GridResult:
    out_dir: Path
    cells: list[Cell]
    sheets: list[Path]  # one per Z value, then the combined sheet (or the only sheet)
    loads: int  # checkpoints loaded (== distinct checkpoints)
    sidecar: Path | None = None

    @property
    def grid(self) -> Path:
        return self.sheets[-1]


Loader = Callable[[str, GridSpec], SamplingModel]


def render_grid(spec: GridSpec, out_dir: str | Path, loader: Loader | None = None, progress: bool = True) -> GridResult:
    """Render a grid from checkpoint files (see the module docstring). `loader` builds a
    SamplingModel from a checkpoint path (default: `load_for_sampling`; tests count its calls)."""
    spec = spec.resolve()
    cells = plan_cells(spec)
    if loader is None:  # every checkpoint's tokenizers, from the headers, before the first load
        for ckpt in dict.fromkeys(c.checkpoint for c in cells):
            sampling_tokenizers(ckpt, spec)
    load = loader or load_for_sampling
    out = Path(out_dir)
    images: dict[tuple[int, int, int], Any] = {}
    loads = 0
    with _bar(len(cells), progress) as bar:
        for ckpt, group in _groups(cells):
            model = load(ckpt, spec)
            loads += 1
            _render_cells(model, group, spec, out, images, bar, first_index=cells.index(group[0]))
            del model
            _free_memory()
    return _finish(spec, cells, images, out, loads)


def render_grid_from_components(components: Any, tokenizers: tuple[Any, Any], spec: GridSpec, out_dir: str | Path,
                                step: int, progress: bool = False) -> GridResult:
    """Render a grid from live modules (the trainer's hook): no checkpoint is read and no copy
    of the model is made; the pipelines share `components`' modules.

    `components` must hold the plain modules (for DDP / FSDP: `accelerator.unwrap_model(unet)`),
    and the call belongs on rank 0 only. The spec must not have a checkpoint axis (there is one model: the live one, named
    "step N"). Modules are switched to eval mode for the render and restored after; everything
    runs under no_grad, in one dtype (`_one_dtype`: a trainer keeps frozen modules in the autocast
    dtype, e.g. a bf16 VAE beside a float32 UNet). Output goes to out_dir/step-0000N/; the trainer
    lists `result.grid` in its metrics.
    """
    import torch

    from tunelab.sample.pipeline import build_pipeline

    if any(a.name == "checkpoint" for a in spec.axes()):
        raise TunelabError("a grid during training renders the live model: remove the checkpoint axis from [grid]")
    name = f"step {step}"
    spec = dataclasses.replace(spec, checkpoints=[name]).resolve()
    modules = components.modules()
    was_training = {n: m.training for n, m in modules.items()}
    for m in modules.values():
        m.eval()
    try:
        with _one_dtype(modules):
            model = build_pipeline(components, tokenizers, name=name)
            cells = plan_cells(spec)
            out = Path(out_dir) / step_name(step)
            images: dict[tuple[int, int, int], Any] = {}
            with torch.no_grad(), _bar(len(cells), progress) as bar:
                _render_cells(model, cells, spec, out, images, bar, first_index=0)
        return _finish(spec, cells, images, out, loads=0)
    finally:
        for n, m in modules.items():
            m.train(was_training[n])


@contextlib.contextmanager
def _one_dtype(modules: dict[str, Any]) -> Iterator[Any]:
    """Run the modules in one dtype for a while: theirs when they agree, else float32 (the
    pipeline feeds each module another's output: latents from the UNet into the VAE, text states
    into the UNet). Only narrower modules are cast, up, and back afterwards; bf16 / fp16 -> float32
    -> bf16 / fp16 is exact, so the training weights come back bit for bit."""
    import torch

    dtypes = {name: next(m.parameters()).dtype for name, m in modules.items()}
    target = next(iter(dtypes.values())) if len(set(dtypes.values())) == 1 else torch.float32
    cast = [name for name, dtype in dtypes.items() if dtype != target]
    if cast:
        log.info("grid: sampling in %s (%s cast for the render)", target, ", ".join(cast))
    try:
        for name in cast:
            modules[name].to(dtype=target)
        yield target
    finally:
        for name in cast:
            modules[name].to(dtype=dtypes[name])


def _groups(cells: list[Cell]) -> Iterable[tuple[str, list[Cell]]]:
    group: list[Cell] = []
    for c in cells:
        if group and c.checkpoint != group[0].checkpoint:
            yield group[0].checkpoint, group
            group = []
        group.append(c)
    if group:
        yield group[0].checkpoint, group


def _render_cells(model: SamplingModel, cells: list[Cell], spec: GridSpec, out: Path,
                  images: dict[tuple[int, int, int], Any], bar: Any, first_index: int) -> None:
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for i, cell in enumerate(cells, start=first_index):
        sample = generate(model, cell.settings)
        s = cell.settings
        params = settings_params(s, sample.size, model.name, model.hash, model.vae_name, sample.extras,
                                 vae_hash=model_hash(spec.vae) if spec.vae and model.vae_name else None,
                                 rescale=applied_rescale(s, model),
                                 attn_layers=list(model.unet.attn_processors) if s.pag_scale or s.seg_scale else None)
        cell.infotext = format_infotext(cell.settings.prompt, cell.settings.negative, params)
        cell.file = str(Path("cells") / cell_name(i, cell, sample.size, spec.image_format))
        save_with_infotext(sample.image, out / cell.file, cell.infotext)
        images[(cell.xi, cell.yi, cell.zi)] = sample.image
        bar.update(1)


def _finish(spec: GridSpec, cells: list[Cell], images: dict, out: Path, loads: int) -> GridResult:
    sheets = _write_sheets(spec, images, out)
    sidecar = out / "grid.json"
    data = {"spec": spec.to_dict(), "cells": [dataclasses.asdict(c) for c in cells],
            "sheets": [str(p.relative_to(out)) for p in sheets], "loads": loads}
    tmp = sidecar.with_suffix(".json.part")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(sidecar)
    log.info("grid: %d cells, %d sheet(s) in %s", len(cells), len(sheets), out)
    return GridResult(out, cells, sheets, loads, sidecar)


def _title(spec: GridSpec) -> str:
    """The settings every cell shares, so a sheet explains itself."""
    on_axes = {a.name for a in spec.axes()}
    b = spec.base
    parts = [] if "prompt" in on_axes else [f"prompt: {b.prompt or '(empty)'}"]
    if b.negative and "negative" not in on_axes:
        parts.append(f"negative: {b.negative}")
    sampler = b.sampler if b.schedule_type == "Automatic" or "schedule_type" in on_axes else f"{b.sampler} {b.schedule_type}"
    fixed = {"sampler": sampler, "steps": f"{b.steps} steps", "cfg": f"CFG {b.cfg:g}", "seed": f"seed {b.seed}",
             "clip_skip": f"clip skip {b.clip_skip}"}
    parts += [v for k, v in fixed.items() if k not in on_axes]
    if b.pag_scale and "pag_scale" not in on_axes:
        parts.append(f"PAG {b.pag_scale:g}")
    if b.seg_scale and "seg_scale" not in on_axes:
        parts.append(f"SEG {b.seg_scale:g} (sigma {b.seg_sigma:g})")
    if b.hires_scale > 1 and "hires_scale" not in on_axes:
        parts.append(f"hires x{b.hires_scale:g} @ {b.hires_denoise:g}")
    if len(spec.checkpoints) == 1 and "checkpoint" not in on_axes:
        parts.insert(0, Path(spec.checkpoints[0]).stem)
    return " | ".join(parts)


def _sheet_name(spec: GridSpec, size: tuple[int, int]) -> str:
    on_axes = {a.name for a in spec.axes()}
    b = spec.base
    bits = [f"s{b.seed}" if "seed" not in on_axes else "s-var"]
    bits.append(f"{size[0]}x{size[1]}" if not on_axes & {"width", "height", "hires_scale"} else "size-var")
    bits.append(f"cfg{b.cfg:g}" if "cfg" not in on_axes else "cfg-var")
    bits.append(f"st{b.steps}" if "steps" not in on_axes else "st-var")
    return "grid-" + "-".join(bits)


def _write_sheets(spec: GridSpec, images: dict, out: Path) -> list[Path]:
    xs = spec.x.values if spec.x else [None]
    ys = spec.y.values if spec.y else [None]
    zs = spec.z.values if spec.z else [None]
    x_labels = [spec.x.label(v) for v in xs] if spec.x else [""]
    y_labels = [spec.y.label(v) for v in ys] if spec.y else [""]
    title = _title(spec)
    sheets, paths = [], []
    name = _sheet_name(spec, next(iter(images.values())).size)
    for zi, zv in enumerate(zs):
        cells = [[images.get((xi, yi, zi)) for xi in range(len(xs))] for yi in range(len(ys))]
        z_label = spec.z.label(zv) if spec.z else ""
        z_label = z_label if ":" in z_label else f"{spec.z.name if spec.z else ''}: {z_label}"
        z_title = f"{z_label}  |  {title}" if spec.z else title
        sheet = draw_sheet(cells, x_labels, y_labels, z_title, min_cell=spec.min_cell)
        sheets.append(sheet)
        if spec.z:
            paths.append(_save_sheet(sheet, out / f"{name}-z{zi}.{spec.image_format}"))
    combined = stack_sheets(sheets) if len(sheets) > 1 else sheets[0]
    paths.append(_save_sheet(combined, out / f"{name}.{spec.image_format}"))
    return paths


def _save_sheet(image: Any, path: Path) -> Path:
    return save_with_infotext(image, path, "tunelab grid; see grid.json for every cell's parameters")


# --- loading checkpoints --------------------------------------------------------------------------------


def load_for_sampling(path: str, spec: GridSpec) -> SamplingModel:
    """Load a checkpoint file (or diffusers folder) for sampling, in the spec's dtype and device."""
    import torch

    from tunelab.models.checkpoint import load_checkpoint, parse_dtype
    from tunelab.models.text import load_tokenizers, resolve_tokenizers
    from tunelab.sample.pipeline import build_pipeline, load_vae

    device = spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    # fp16 on GPUs (what the field samples in), fp32 on CPUs (which are slow or wrong in fp16)
    dtype = parse_dtype(spec.dtype if spec.dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32"))
    tok_source = sampling_tokenizers(path, spec)  # from the header: a mismatch is refused before the weights load
    log.info("loading %s", path)
    comps = load_checkpoint(path)
    for m in comps.modules().values():
        if next(m.parameters()).dtype != dtype:  # cast only when needed (diffusers warns on every cast)
            m.to(dtype=dtype)
    tok_source = resolve_tokenizers(tok_source, comps.arch, path, option="--tokenizers")  # no header: known now
    vae = load_vae(spec.vae, comps.arch, dtype) if spec.vae else None
    for m in [*comps.modules().values(), *([vae] if vae is not None else [])]:
        m.to(device).eval()
    return build_pipeline(comps, load_tokenizers(tok_source), vae=vae, name=Path(path).stem,
                          model_hash=model_hash(path), vae_name=Path(spec.vae).name if spec.vae else None)


def sampling_tokenizers(path: str, spec: GridSpec) -> str:
    """The tokenizers `path` samples with: --tokenizers, or (unset / 'auto') the checkpoint's own
    (toy: built in; a diffusers folder: its tokenizer/ and tokenizer_2/), checked against the
    checkpoint's header (no weights are read). Refuses an sdxl file without a tokenizer folder
    and tokenizers that do not fit the text encoders; 'auto' comes back when no header can tell."""
    from tunelab.models.checkpoint import base_arch
    from tunelab.models.text import resolve_tokenizers

    arch = base_arch(path) if Path(path).exists() else None
    return resolve_tokenizers(spec.tokenizers or "auto", arch, path, option="--tokenizers")


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bar(total: int, enabled: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="grid", unit="image", disable=not enabled, file=sys.stderr)


__all__ = ["GridSpec", "Axis", "parse_values", "plan_cells", "render_grid", "render_grid_from_components",
           "load_for_sampling", "sampling_tokenizers", "GridResult"]


def render_training_grid(components: Any, tokenizers: tuple[Any, Any], cfg: Any, out_dir: str | Path,
                         step: int) -> GridResult:
    """The run file's [grid] from live modules: prompts across, seeds down (the trainer's grid
    callback; also callable on any loaded components with a RunConfig)."""
    g = cfg.grid
    base = SampleSettings(negative=g.negative, steps=g.steps, cfg=g.cfg, sampler=g.sampler,
                          schedule_type=g.schedule_type, clip_skip=cfg.model.clip_skip, pag_scale=g.pag_scale, seg_scale=g.seg_scale,
                          max_chunks=cfg.model.max_chunks, seed=g.seeds[0],
                          clip_skip_te2=True)  # the trainer applies clip_skip to both encoders
    spec = GridSpec(base=base, prompts=list(g.prompts), x=Axis("prompt", list(g.prompts)),
                    y=Axis("seed", list(g.seeds)) if len(g.seeds) > 1 else None)
    return render_grid_from_components(components, tokenizers, spec, out_dir, step)
