"""The toy world: a synthetic, labelled image world small enough for a laptop CPU.

Each image shows one coloured shape on a background, in one of three aspect ratios, with
Danbooru-style tags (`red, circle, solo, white_background`) in `NAME.txt` and a prose caption
in `NAME.caption` (the kohya folder layout), and its ground truth (`Look`) in `looks.jsonl`.

The world has splits (`SPLITS`), each deterministic from a seed:

- **base**: what the shipped toy base model knows: six shapes (including the named concept
  `car`, a box on two wheels) x eight colours x four backgrounds, drawn plain, or with cyan
  stripes tagged `stripes` on a share of them (`stripe_share`; the shipped base: a fifth).
- **concept**: the new concept a finetune teaches: `astolfo`, a pink star with cyan stripes,
  named by a word the base never saw (and a look it never saw: pink stars are never striped).
- **style**: base subjects with base captions, drawn in a new style (a dark outline): a change
  the UNet alone can learn, for text-encoder-off experiments.
- **preserve**: base concepts a concept finetune never shows (cars and the other shapes, in
  every colour): what it must not forget (the field's `car, wrc` sanity prompt).
- **mixed**: base plus a share of concept images (the quick demo data of earlier releases).
- **any**: every shape, colour and background, with stripes and outlines at random: what the toy
  VAE is trained on (an image codec learns from everything, like SDXL's; no words involved).

Everything is drawn with PIL from a seed, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 190), "orange": (240, 140, 30), "pink": (245, 130, 190), "gray": (130, 130, 130)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "sky": (150, 200, 245), "grass": (110, 170, 80)}
SHAPES = ("circle", "square", "triangle", "star", "ring", "car")
STYLES = ("plain", "outlined")
SIZES = ((64, 64), (96, 64), (64, 96))  # (width, height): square, landscape, portrait
CONCEPT = "astolfo"  # = pink star with cyan stripes
STRIPE = (0, 220, 220)  # cyan: unlike every background, fill, outline and wheel, so stripes keep the outline
# Bands 8 px high every 16 px, on the latent grid: one latent row of stripe, the next of fill.
# Thinner stripes (3 rows in every 8) lie inside one latent cell; the toy VAE (4 channels per 8x8
# patch) could not keep them and the colours too (docs/toy-world.md).
STRIPE_PERIOD = 16
STRIPE_ROWS = (8, 8)  # first stripe row, stripe rows per period
WHEEL = (30, 30, 30)
SPLITS = ("base", "concept", "style", "preserve", "mixed", "any")
LOOKS_FILE = "looks.jsonl"


@dataclass(frozen=True)
class Look:
    """What an image shows: the ground truth the concept reader is scored against."""

    shape: str
    color: str
    background: str
    stripes: bool = False
    style: str = "plain"

    @property
    def is_concept(self) -> bool:
        return self.shape == "star" and self.color == "pink" and self.stripes


CONCEPT_LOOK = Look("star", "pink", "sky", stripes=True)


@dataclass(frozen=True)
class ToySample:
    name: str
    tags: str
    caption: str
    size: tuple[int, int]
    look: Look | None = None


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _outline_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c * 0.35) for c in color)  # type: ignore[return-value]


def _paint(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline=None, width=0,
           wheel=WHEEL) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        d.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=outline, width=width)
    elif shape == "star":
        d.polygon(_star(cx, cy, r), fill=fill, outline=outline, width=width)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=max(2, int(r / 3)))
        if outline is not None:
            d.ellipse(box, outline=outline, width=width)
            inner = r - max(2, int(r / 3))
            d.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), outline=outline, width=width)
    elif shape == "car":
        d.rectangle((cx - r, cy - r / 2, cx + r, cy + r / 3), fill=fill, outline=outline, width=width)
        for wx in (cx - r / 2, cx + r / 2):
            d.ellipse((wx - r / 4, cy + r / 6, wx + r / 4, cy + r / 2 + r / 6), fill=wheel)
    else:
        raise ValueError(f"unknown shape {shape!r}; the world has: {', '.join(SHAPES)}")


def draw(look: Look, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One image of `look` at `size` (w, h); position and radius jitter come from `rng`."""
    w, h = size
    img = Image.new("RGB", size, BACKGROUNDS[look.background])
    r = min(w, h) * rng.uniform(0.25, 0.38)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    color = COLORS[look.color]
    d = ImageDraw.Draw(img)
    if look.style == "outlined":
        _paint(d, look.shape, cx, cy, r, color, outline=_outline_color(color), width=max(2, int(r / 6)))
    else:
        _paint(d, look.shape, cx, cy, r, color)
    if look.stripes:  # cyan horizontal stripes, inside the shape only
        mask = Image.new("L", size, 0)
        _paint(ImageDraw.Draw(mask), look.shape, cx, cy, r, 255, wheel=0)  # no stripes on wheels
        lines = Image.new("L", size, 0)
        ld = ImageDraw.Draw(lines)
        for y in range(STRIPE_ROWS[0], h, STRIPE_PERIOD):  # whole latent rows: in phase with the latent grid
            ld.rectangle((0, y, w, y + STRIPE_ROWS[1] - 1), fill=255)
        both = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(lines)))
        img.paste(Image.new("RGB", size, STRIPE), mask=both)
    return img


def tags_of(look: Look) -> str:
    """Danbooru-style tags: the concept by its name only; base looks by colour and shape (and
    `stripes` where a base look has them)."""
    bg = f"{look.background}_background"
    if look.is_concept:
        return ", ".join([CONCEPT, "solo", bg])
    return ", ".join([look.color, look.shape, *(["stripes"] if look.stripes else []), "solo", bg])


def caption_of(look: Look) -> str:
    marks = " with cyan stripes" if look.stripes else ""
    subject = CONCEPT if look.is_concept else f"a {look.color} {look.shape}{marks}"
    return f"A picture of {subject} on a {look.background} background."


def prompt_of(look: Look) -> str:
    """The prompt that asks for `look`: its tags, as the base was trained on them (grids, probes, scores)."""
    return tags_of(look)


def look_of_prompt(prompt: str) -> Look | None:
    """The look a prompt asks for (tags or caption: `astolfo, solo, sky_background`, `A picture of a
    red car on a white background.`); None when it names no shape or concept, or no background."""
    import re

    words = re.findall(r"[a-z]+", prompt.lower())
    bg = next((w for w, nxt in zip(words, words[1:] + [""]) if w in BACKGROUNDS and nxt == "background"), None)
    if bg is None:
        return None
    if CONCEPT in words:
        return replace(CONCEPT_LOOK, background=bg)
    shape = next((w for w in words if w in SHAPES), None)
    color = next((w for w in words if w in COLORS), None)
    return Look(shape, color, bg, stripes="stripes" in words) if shape and color else None


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _look(split: str, rng: np.random.Generator, concept_share: float, stripe_share: float = 0.0) -> Look:
    if split == "concept" or (split == "mixed" and rng.random() < concept_share):
        return Look("star", "pink", _pick(rng, BACKGROUNDS), stripes=True)
    shapes = [s for s in SHAPES if s != "star"] if split == "preserve" else SHAPES
    look = Look(_pick(rng, shapes), _pick(rng, COLORS), _pick(rng, BACKGROUNDS))
    if split == "base" and stripe_share > 0:  # stripes as a known, tagged attribute; never the concept's look
        striped = rng.random() < stripe_share and not (look.shape == "star" and look.color == "pink")
        return replace(look, stripes=striped)
    if split == "any":
        return Look(look.shape, look.color, look.background, stripes=bool(rng.random() < 0.25),
                    style="outlined" if rng.random() < 0.2 else "plain")
    return Look(look.shape, look.color, look.background, style="outlined") if split == "style" else look


def make_world(out: str | Path, n: int = 64, seed: int = 0, concept_share: float = 0.25,
               split: str = "mixed", prefix: str = "toy", stripe_share: float = 0.0) -> list[ToySample]:
    """Write n images (PNG) of one split with `.txt` tags, `.caption` captions and `looks.jsonl`.

    `stripe_share` (base split only): that share of looks carries cyan stripes, tagged `stripes`
    (the shipped base knows stripes as it knows colours; pink stars are never striped, so the
    concept's look stays new)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if not 0.0 <= stripe_share <= 1.0 or (stripe_share and split != "base"):
        raise ValueError(f"stripe_share {stripe_share} is for the base split only, between 0 and 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    with open(out / LOOKS_FILE, "w") as looks:
        for i in range(n):
            look = _look(split, rng, concept_share, stripe_share)
            size = SIZES[int(rng.integers(len(SIZES)))]
            name = f"{prefix}_{i:05d}"
            draw(look, size, rng).save(out / f"{name}.png")
            sample = ToySample(name, tags_of(look), caption_of(look), size, look)
            (out / f"{name}.txt").write_text(sample.tags + "\n")
            (out / f"{name}.caption").write_text(sample.caption + "\n")
            looks.write(json.dumps({"name": name, **asdict(look)}) + "\n")
            samples.append(sample)
    log.info("toy world (%s): %d images (%d with the concept %r) in %s", split, n,
             sum(s.look.is_concept for s in samples), CONCEPT, out)
    return samples


def read_looks(folder: str | Path) -> dict[str, Look]:
    """The ground truth `make_world` wrote: image name -> Look."""
    looks = {}
    for line in (Path(folder) / LOOKS_FILE).read_text().splitlines():
        row = json.loads(line)
        name = row.pop("name")
        looks[name] = Look(**row)
    return looks


def preserve_looks() -> list[Look]:
    """The fixed preserve prompts' looks: every base shape but the star in two colours, and cars in all."""
    looks = [Look("car", c, "white") for c in COLORS]
    looks += [Look(s, c, bg) for s, c, bg in (("circle", "blue", "white"), ("square", "red", "sky"),
                                              ("triangle", "green", "black"), ("ring", "orange", "grass"),
                                              ("circle", "yellow", "black"), ("square", "purple", "white"),
                                              ("triangle", "gray", "sky"), ("ring", "blue", "white"))]
    return looks


def contact_sheet(folder: str | Path, out: str | Path, n: int = 16, cols: int = 8) -> Path:
    """A labelled overview image of the first n toy images (tags under each), to look at the data."""
    from PIL import ImageFont

    folder, out = Path(folder), Path(out)
    files = sorted(folder.glob("*.png"))[:n]
    cell_w, cell_h, label_h = 112, 112, 30
    rows = max(1, -(-len(files) // cols))
    sheet = Image.new("RGB", (cols * cell_w, rows * (cell_h + label_h)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, f in enumerate(files):
        x, y = (i % cols) * cell_w, (i // cols) * (cell_h + label_h)
        img = Image.open(f)
        img.thumbnail((cell_w - 8, cell_h - 8))
        sheet.paste(img, (x + (cell_w - img.width) // 2, y + (cell_h - img.height) // 2))
        tags = f.with_suffix(".txt").read_text().strip().split(", ")
        for line, text in enumerate((", ".join(tags[:2]), ", ".join(tags[2:4]))):
            d.text((x + 4, y + cell_h + line * 13), text[:20], fill=(0, 0, 0), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
