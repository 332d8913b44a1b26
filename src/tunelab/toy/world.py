"""The toy world: a synthetic, labelled image dataset small enough for a laptop CPU.

Each image shows one coloured shape on a background, in one of three aspect ratios, with
Danbooru-style tags (`red, circle, solo, white_background`) in `NAME.txt` and a prose caption
in `NAME.caption` (the kohya folder layout). One shape/colour pair is the *concept* a finetune
should learn ("astolfo": a pink star with stripes, rare in the base data); others are what it must
not forget (e.g. "car": a gray rectangle with two wheels). Everything is drawn with PIL from a
seed, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 190), "orange": (240, 140, 30), "pink": (245, 130, 190), "gray": (130, 130, 130)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "sky": (150, 200, 245), "grass": (110, 170, 80)}
SHAPES = ("circle", "square", "triangle", "star", "ring", "car")
SIZES = ((64, 64), (96, 64), (64, 96))  # (width, height): square, landscape, portrait
CONCEPT = "astolfo"  # = pink star with stripes


@dataclass(frozen=True)
class ToySample:
    name: str
    tags: str
    caption: str
    size: tuple[int, int]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw(shape: str, color: tuple[int, int, int], bg: tuple[int, int, int], size: tuple[int, int],
          rng: np.random.Generator, stripes: bool) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.25, 0.38)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "star":
        d.polygon(_star(cx, cy, r), fill=color)
    elif shape == "ring":
        d.ellipse(box, outline=color, width=max(2, int(r / 3)))
    elif shape == "car":
        d.rectangle((cx - r, cy - r / 2, cx + r, cy + r / 3), fill=color)
        for wx in (cx - r / 2, cx + r / 2):
            d.ellipse((wx - r / 4, cy + r / 6, wx + r / 4, cy + r / 2 + r / 6), fill=(30, 30, 30))
    if stripes:
        for y in range(int(cy - r), int(cy + r), 6):
            d.line((cx - r, y, cx + r, y), fill=(255, 255, 255), width=1)
    return img


def _sample(i: int, rng: np.random.Generator, concept_share: float) -> tuple[ToySample, dict]:
    is_concept = rng.random() < concept_share
    shape = "star" if is_concept else SHAPES[int(rng.integers(len(SHAPES)))]
    color = "pink" if is_concept else list(COLORS)[int(rng.integers(len(COLORS)))]
    bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    tags = ([CONCEPT] if is_concept else []) + [color, shape, "solo", f"{bg}_background"] + (["stripes"] if is_concept else [])
    subject = f"{CONCEPT}, a pink star with white stripes" if is_concept else f"a {color} {shape}"
    caption = f"A picture of {subject} on a {bg} background."
    sample = ToySample(f"toy_{i:05d}", ", ".join(tags), caption, size)
    return sample, {"shape": shape, "color": COLORS[color], "bg": BACKGROUNDS[bg], "stripes": is_concept}


def make_world(out: str | Path, n: int = 64, seed: int = 0, concept_share: float = 0.25) -> list[ToySample]:
    """Write n images (PNG) with `.txt` tags and `.caption` captions into `out`; returns the samples."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        sample, look = _sample(i, rng, concept_share)
        img = _draw(look["shape"], look["color"], look["bg"], sample.size, rng, look["stripes"])
        img.save(out / f"{sample.name}.png")
        (out / f"{sample.name}.txt").write_text(sample.tags + "\n")
        (out / f"{sample.name}.caption").write_text(sample.caption + "\n")
        samples.append(sample)
    log.info("toy world: %d images (%d with the concept %r) in %s", n, sum(CONCEPT in s.tags for s in samples), CONCEPT, out)
    return samples


def contact_sheet(folder: str | Path, out: str | Path, n: int = 16, cols: int = 8) -> Path:
    """A labelled overview image of the first n toy images (tags under each), to look at the data."""
    from PIL import ImageFont

    folder, out = Path(folder), Path(out)
    files = sorted(folder.glob("*.png"))[:n]
    cell_w, cell_h, label_h = 112, 112, 30
    rows = max(1, -(-len(files) // cols))
    sheet = Image.new("RGB", (cols * cell_w, rows * (cell_h + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, f in enumerate(files):
        x, y = (i % cols) * cell_w, (i // cols) * (cell_h + label_h)
        img = Image.open(f)
        img.thumbnail((cell_w - 8, cell_h - 8))
        sheet.paste(img, (x + (cell_w - img.width) // 2, y + (cell_h - img.height) // 2))
        tags = f.with_suffix(".txt").read_text().strip().split(", ")
        for line, text in enumerate((", ".join(tags[:2]), ", ".join(tags[2:4]))):
            draw.text((x + 4, y + cell_h + line * 13), text[:20], fill=(0, 0, 0), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
