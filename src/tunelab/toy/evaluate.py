"""What a toy model draws, read back and counted: concept, preserve and base accuracy.

A model renders fixed prompts with fixed seeds (`prompt_of(look)`: `red, car, white_background`);
the concept reader (`toy.reader`) reads each image back; the accuracy is the share of images
whose every attribute the prompt asks for came out right:

- **concept**: `astolfo, BG_background` read as a pink star with stripes on BG;
- **preserve**: the preserve looks (cars and the other base shapes; `world.preserve_looks`),
  which a concept finetune never shows: what it must not forget;
- **base**: a fixed sample of the base split's looks: what the base model knows;
- **striped**: base looks asked for with `stripes` (never a pink star): whether a base pretrained
  with `stripe_share` draws the concept's marks when asked, so that a finetune has them to give
  its new word (the shipped base: a fifth of its training images were striped).
"""

from __future__ import annotations

from pathlib import Path

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from tunelab.toy.world import BACKGROUNDS, COLORS, SHAPES, Look, preserve_looks, prompt_of

EVAL_SEEDS = (11, 12)
EVAL_STEPS = 30
EVAL_CFG = 2.0  # measured best for the shipped base (docs/toy-world.md: CFG 2-6, 16 or 30 steps)


def concept_looks() -> list[Look]:
    return [Look("star", "pink", bg, stripes=True) for bg in BACKGROUNDS]


def base_looks(n: int = 24, seed: int = 7) -> list[Look]:
    """n base looks spread over the shapes (each shape equally often), colours and backgrounds at random."""
    rng = np.random.default_rng(seed)
    colors, bgs = list(COLORS), list(BACKGROUNDS)
    return [Look(SHAPES[i % len(SHAPES)], colors[int(rng.integers(len(colors)))], bgs[int(rng.integers(len(bgs)))])
            for i in range(n)]


def striped_looks(n: int = 12, seed: int = 9) -> list[Look]:
    """n striped base looks, every shape (pink stars excluded: that look is the concept's)."""
    looks = [Look(look.shape, look.color, look.background, stripes=True) for look in base_looks(2 * n, seed)
             if not (look.shape == "star" and look.color == "pink")]
    return looks[:n]


SETS = {"concept": concept_looks, "preserve": preserve_looks, "base": base_looks, "striped": striped_looks}


@dataclass
class SetScore:
    """One set's images and how the reader scored them."""

    name: str
    accuracy: float  # every attribute right
    per_attribute: dict[str, float]
    n: int
    subject: float = 0.0  # shape and colour right (the concept without its marks: a pink star)
    images: list[Any] = field(default_factory=list, repr=False)
    looks: list[Look] = field(default_factory=list, repr=False)


def render(model: Any, looks: Sequence[Look], seeds: Sequence[int] = EVAL_SEEDS, steps: int = EVAL_STEPS,
           cfg: float = EVAL_CFG, size: tuple[int, int] = (64, 64)) -> tuple[list[Any], list[Look]]:
    """Images of every look with every seed (the look's prompt; Euler; the given CFG)."""
    from tunelab.sample.pipeline import SampleSettings, generate_batch

    # uncond "empty": toy models learn their unconditional branch from captions dropped to "" (the
    # encoded empty string), not from A1111's zeros (0.79 vs 0.67 base accuracy, seed 11)
    settings = SampleSettings(seed=0, steps=steps, cfg=cfg, width=size[0], height=size[1], max_chunks=1,
                              uncond="empty")
    wanted = [look for _ in seeds for look in looks]
    with torch.no_grad():
        images = generate_batch(model, [prompt_of(look) for look in wanted],
                                [seed for seed in seeds for _ in looks], settings)
    return images, wanted


def score_set(model: Any, name: str, seeds: Sequence[int] = EVAL_SEEDS, steps: int = EVAL_STEPS,
              cfg: float = EVAL_CFG) -> SetScore:
    from tunelab.toy.reader import score

    from tunelab.toy.reader import read

    images, looks = render(model, SETS[name](), seeds, steps, cfg)
    s = score(images, looks)
    readings = [read(image) for image in images]
    subject = sum(r.shape == w.shape and r.color == w.color for r, w in zip(readings, looks)) / max(1, len(looks))
    return SetScore(name, s.all, s.attributes(), s.n, subject, images, looks)


def reader_scorer(image: Any, prompt: str) -> dict[str, float]:
    """A probe scorer (`probe.scorer = "tunelab.toy.evaluate:reader_scorer"`): 1 / 0 per attribute the
    prompt asks for, `all` and `subject` (shape and colour), from the concept reader; {} for a
    prompt that asks for no toy look."""
    from tunelab.toy.reader import read
    from tunelab.toy.world import look_of_prompt

    want = look_of_prompt(prompt)
    if want is None:
        return {}
    got = read(image)
    out = {name: float(getattr(got, name) == getattr(want, name))
           for name in ("shape", "color", "background", "stripes", "style")}
    return out | {"all": float(got.look() == want), "subject": float(got.shape == want.shape and got.color == want.color)}


def evaluate(comps: Any, tokenizers: tuple[Any, Any], sets: Sequence[str] = ("concept", "preserve"),
             seeds: Sequence[int] = EVAL_SEEDS, steps: int = EVAL_STEPS, cfg: float = EVAL_CFG) -> dict[str, SetScore]:
    """Render and read every set with one model (loaded components)."""
    from tunelab.sample.pipeline import build_pipeline

    model = build_pipeline(comps, tokenizers)
    return {name: score_set(model, name, seeds, steps, cfg) for name in sets}


def evaluate_file(path: str, sets: Sequence[str] = ("concept", "preserve"), **kw: Any) -> dict[str, SetScore]:
    from tunelab.models.checkpoint import load_checkpoint
    from tunelab.models.text import load_tokenizers

    # fp32 for the CPU's kernels (fp16 convolutions there are several times slower) and for a
    # score that does not depend on the file's dtype.
    return evaluate(load_checkpoint(path, dtype=torch.float32), load_tokenizers("toy"), sets, **kw)


def sheet(scores: dict[str, SetScore], out: str, cols: int = 16) -> str:
    """All rendered images of the sets, one block per set, a red frame on each the reader got wrong."""
    from PIL import Image, ImageDraw

    from tunelab.toy.reader import read

    cells = [(img, look) for s in scores.values() for img, look in zip(s.images, s.looks)]
    if not cells:
        raise ValueError("no images to put on a sheet")
    w, h = 68, 68
    rows = -(-len(cells) // cols)
    page = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    d = ImageDraw.Draw(page)
    for i, (img, look) in enumerate(cells):
        x, y = (i % cols) * w, (i // cols) * h
        page.paste(img.resize((64, 64)), (x + 2, y + 2))
        if read(img).look() != look:
            d.rectangle((x, y, x + w - 1, y + h - 1), outline=(230, 0, 0), width=2)
    out = str(out) if Path(out).suffix else f"{out}.png"  # `--out sheet` means sheet.png
    page.save(out)
    return out
