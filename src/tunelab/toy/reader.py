"""The toy world's concept reader: reads a `Look` back from an image by pixel statistics.

No model and no training: the world is simple enough to read with a few robust measurements,
so a generated image can be scored against the prompt that asked for it (`score`, `concept_rate`).

- **background**: the median of the border pixels, nearest `BACKGROUNDS` colour;
- **mask**: pixels far from that colour (on a 3x3-smoothed copy, so faint noise does not count),
  short vertical gaps of stripe-coloured pixels closed (blurred stripes), largest blob;
- **colour**: the median of the mask's core without background-like, stripe-coloured and wheel-black
  pixels, then of its brightest part (not the outline); the `COLORS` entry that explains it best,
  allowing a little dimming and background blur (a thin ring's band never shows its pure fill);
- **shape**: from the mask's geometry: a wide box (car), a hole in the middle (ring), a full box
  (square), the widest row at the bottom (triangle), the box's inscribed ellipse covered (circle),
  else a star;
- **stripes**: the rows' stripe colour inside the shape swings with a period of about 16 rows;
- **style**: the edge's colour profile (mean colour by distance from the mask's edge) is fitted
  by a blurred step background -> fill (plain) and by two steps background -> outline (the fill
  at 0.35) -> fill (outlined), over a range of blurs; the better fit wins, plain on near ties.

Every decision sits between well separated cases, so blur, resampling, faint noise and small
colour shifts (what a small diffusion model adds) rarely flip it; `Reading.margins` says by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from tunelab.toy.world import BACKGROUNDS, COLORS, SIZES, STRIPE, Look, read_looks

_BG = {k: np.array(v, float) for k, v in BACKGROUNDS.items()}
_FG = {k: np.array(v, float) for k, v in COLORS.items()}
_STRIPE = np.array(STRIPE, float)
_OUTLINE = 0.35  # the outline is the fill colour at this brightness (world._outline_color)
_MIN_CONTRAST = 22.0  # least RGB distance from the background that counts as shape
_DIM = (0.7, 1.1)  # how much brighter or darker than drawn a fill may read (blur into the outline)
_MIX = np.linspace(0.0, 0.25, 6)  # how much background a fill may have blurred in
_STRIPE_AMPLITUDE = 0.08  # least periodic swing of the rows' stripe colour that counts as stripes
_STRIPE_PERIODS = np.arange(12.0, 20.01, 1.0)  # the world's 16 rows, give or take resampling
_NEAR_STRIPE = 60.0  # RGB distance from the stripe colour that can be a (blurred) stripe
_GAP = 3  # vertical gaps up to 2 * _GAP rows inside the shape are closed (blurred stripes)
_SHIFTS = np.arange(-3.0, 4.01, 0.25)  # where the drawn edge is, from the mask's (px; blur moves the mask out)
_BLURS = (0.3, 0.6, 0.9, 1.2, 1.5, 1.9, 2.4)  # edge blurs the style fit tries (px)
_WIDTHS = (1.5, 2.0, 3.0, 4.0)  # outline widths it tries (px): max(2, r / 6) in the world
_STYLE_BIAS = 0.15  # how much better (log residual ratio) the outlined fit must be: plain is simpler


@dataclass(frozen=True)
class Reading:
    """What the reader saw. `margins`: per attribute, how far the measurement was from the decision
    threshold (>= 0, in the measurement's own units; near 0 means a close call)."""

    shape: str
    color: str
    background: str
    stripes: bool
    style: str
    margins: Mapping[str, float] = field(default_factory=dict, compare=False)

    def look(self) -> Look:
        return Look(self.shape, self.color, self.background, stripes=self.stripes, style=self.style)

    @property
    def is_concept(self) -> bool:
        return self.look().is_concept


# ---- image in -------------------------------------------------------------------------------

def _as_array(image) -> np.ndarray:
    """HxWx3 float array at one of the world's sizes (other sizes, such as 2x, resized to the world
    size of the nearest aspect ratio)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    img = image.convert("RGB")
    if img.size not in SIZES:
        aspect = img.width / img.height
        target = min(SIZES, key=lambda s: abs(np.log(s[0] / s[1] / aspect)))
        img = img.resize(target, Image.Resampling.BOX if img.width >= target[0] else Image.Resampling.BILINEAR)
    return np.asarray(img, float)


def _nearest(color: np.ndarray, palette: dict[str, np.ndarray]) -> tuple[str, float]:
    """The palette entry nearest `color` and the margin (second distance - first distance)."""
    ranked = sorted((float(np.linalg.norm(color - v)), k) for k, v in palette.items())
    return ranked[0][1], ranked[1][0] - ranked[0][0]


def _nearest_fill(color: np.ndarray, bg: np.ndarray) -> tuple[str, float]:
    """The `COLORS` entry that best explains `color` as `a * entry + b * bg`, a in `_DIM`, b in
    `_MIX`: a thin fill (a ring's band) between an outline, blur and the background reads darker
    than drawn and a little mixed with the background. Returns the entry and the margin."""
    def dist(ref: np.ndarray) -> float:
        best = np.inf
        for b in _MIX:
            rest = color - b * bg
            a = float(np.clip(rest @ ref / (ref @ ref), *_DIM))
            best = min(best, float(np.linalg.norm(rest - a * ref)))
        return best
    ranked = sorted((dist(v), k) for k, v in _FG.items())
    return ranked[0][1], ranked[1][0] - ranked[0][0]


# ---- binary morphology and blobs on small masks -------------------------------------------

def _shift(mask: np.ndarray, dy: int, dx: int, fill: bool = False) -> np.ndarray:
    """`mask` moved by (dy, dx), the uncovered edge set to `fill`."""
    out = np.full_like(mask, fill)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _erode(mask: np.ndarray, diagonal: bool = False, outside: bool = False) -> np.ndarray:
    """Erosion by the 4 neighbours (or all 8 with `diagonal`); beyond the image counts as `outside`."""
    steps = [(1, 0), (-1, 0), (0, 1), (0, -1)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if diagonal else [])
    out = mask.copy()
    for dy, dx in steps:
        out &= _shift(mask, dy, dx, outside)
    return out


def _close_rows(mask: np.ndarray, fillable: np.ndarray, k: int = _GAP) -> np.ndarray:
    """Vertical closing: fill gaps of up to 2k rows between shape pixels in a column, with pixels
    that are `fillable` only."""
    grown = mask.copy()
    for d in range(1, k + 1):
        grown |= _shift(mask, d, 0) | _shift(mask, -d, 0)
    closed = grown.copy()
    for d in range(1, k + 1):
        closed &= _shift(grown, d, 0) & _shift(grown, -d, 0)
    return mask | (closed & fillable)


def _depth(mask: np.ndarray, limit: int = 10_000, diagonal: bool = False) -> np.ndarray:
    """Per pixel, how many erosions it survives + 1 (1 = on the edge, 0 = outside), up to `limit`;
    4-neighbour erosions give the city-block distance, 8-neighbour ones the chessboard distance."""
    depth = np.zeros(mask.shape, int)
    layer = mask
    while layer.any() and limit > 0:
        limit -= 1
        depth += layer
        layer = _erode(layer, diagonal)
    return depth


def _labels(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = outside, 1.. = blobs), by union-find over row runs."""
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    (rows, starts), (_, ends) = np.nonzero(edges == 1), np.nonzero(edges == -1)  # runs [start, end)
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev: list[int] = []  # the previous row's runs
    cur: list[int] = []
    for i, y in enumerate(rows.tolist()):
        if i and y != rows[i - 1]:
            prev, cur = (cur if y == rows[i - 1] + 1 else []), []
        for j in prev:
            if starts[j] < ends[i] and starts[i] < ends[j]:  # overlapping columns: the same blob
                parent[find(j)] = find(i)
        cur.append(i)
    labels = np.zeros(mask.shape, int)
    roots: dict[int, int] = {}
    for i in range(len(rows)):
        labels[rows[i], starts[i]:ends[i]] = roots.setdefault(find(i), len(roots) + 1)
    return labels


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob of `mask` (specks and noise elsewhere dropped)."""
    labels = _labels(mask)
    if labels.max() == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _holes(mask: np.ndarray) -> np.ndarray:
    """Background pixels enclosed by the mask (not connected to the image border)."""
    labels = _labels(~mask)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return (labels > 0) & ~np.isin(labels, border)


def _smooth(rgb: np.ndarray) -> np.ndarray:
    """3x3 box mean (edges replicated): takes the faint noise out before thresholding."""
    pad = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = rgb.shape[:2]
    return sum(pad[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


# ---- the attributes ---------------------------------------------------------------------

def _background(rgb: np.ndarray) -> np.ndarray:
    """The border pixels' median colour (the shape touches the border at most in a few places)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.median(border, axis=0)


def _mask(rgb: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """The shape: far from the background (threshold above the border's own spread), with its
    stripes even where blur brings them near the background, one blob."""
    smooth = _smooth(rgb)
    dist = np.linalg.norm(smooth - bg, axis=2)
    border = np.concatenate([dist[0], dist[-1], dist[:, 0], dist[:, -1]])
    mask = dist > max(_MIN_CONTRAST, 4.0 * float(np.median(border)))
    stripe = np.linalg.norm(smooth - _STRIPE, axis=2) < _NEAR_STRIPE
    return _largest_blob(_close_rows(mask, stripe))


def _stripeness(px: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """How far each pixel is along the way from `fill` to the stripe colour (0 = fill, 1 = stripe);
    0 for pixels off that way (a wheel, an outline: darker, not a blend of fill and stripe)."""
    axis = _STRIPE - fill
    t = np.clip((px - fill) @ axis / max(float(axis @ axis), 1.0), 0.0, 1.0)
    off = np.linalg.norm(px - fill - t[..., None] * axis, axis=-1)
    return np.where(off < _NEAR_STRIPE, t, 0.0)


def _brightness(px: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Each pixel as a multiple of `fill` (1 = fill, 0.35 = outline, 0 = black)."""
    return px @ fill / max(float(fill @ fill), 1.0)


def _fill_color(rgb: np.ndarray, depth: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """The fill colour: the median of the mask's core without background-like (the smoothed mask's
    rim), stripe-coloured and dark (wheels) pixels, then of its brightest part only (an outline is
    the fill at a third of its brightness, and in a thin outlined ring it can be most of the core)."""
    far = np.linalg.norm(rgb - bg, axis=2) > 2 * _MIN_CONTRAST
    core = rgb[(depth >= max(2, int(0.5 * depth.max()))) & far]
    if len(core) < 5:
        core = rgb[depth > 0]
    if len(core) < 5:
        return np.median(rgb.reshape(-1, 3), axis=0)
    keep = (np.linalg.norm(core - _STRIPE, axis=1) > _NEAR_STRIPE) & (core.max(axis=1) > 60)  # not stripe, not wheel
    core = core[keep] if keep.sum() >= 5 else core
    fill = np.median(core, axis=0)
    for blend in (1.0, 0.3):  # the brightest part first, then without stripe blends as well
        bright = _brightness(core, fill)
        keep = (bright > 0.6 * np.percentile(bright, 90)) & (_stripeness(core, fill) < blend)
        if keep.sum() >= 5:
            fill = np.median(core[keep], axis=0)
    return fill


def _shape(mask: np.ndarray, holes: np.ndarray) -> tuple[str, float]:
    """The shape from the mask's geometry, with the margin of the deciding test."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return "circle", 0.0
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bw, bh = x1 - x0, y1 - y0
    aspect = bw / bh
    if aspect > 1.35:  # the car (box on wheels) is 1.7-2.4 wide; every other shape about 1
        return "car", aspect - 1.35
    box = mask[y0:y1, x0:x1]
    hole = holes[y0:y1, x0:x1].sum() / max(1, box.sum() + holes[y0:y1, x0:x1].sum())
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    centre = mask[cy - 2:cy + 3, cx - 2:cx + 3].mean()
    if hole > 0.15 or centre < 0.3:  # a ring: its middle is background (a hole about 0.44 of it)
        return "ring", max(hole - 0.15, 0.3 - centre)
    fill = box.mean()
    if fill > 0.89:  # square 1.0, circle 0.785
        return "square", fill - 0.89
    widths = box.sum(axis=1)
    widest = np.flatnonzero(widths >= 0.95 * widths.max()).mean() / max(1, bh - 1)
    if widest > 0.7:  # a triangle is widest at its base; a circle in the middle, a star at its arms (0.38)
        return "triangle", widest - 0.7
    cover = _ellipse_cover(box)
    if cover > 0.87:  # a circle fills the ellipse in its box (0.94-1); a star's notches do not (0.5-0.8)
        return "circle", min(cover - 0.87, 0.89 - fill, 0.7 - widest)
    return "star", min(0.87 - cover, 0.7 - widest)


def _ellipse_cover(box: np.ndarray) -> float:
    """The share of the ellipse inscribed in the mask's bounding box that the mask covers."""
    h, w = box.shape
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1
    return float(box[inside].mean())


def _stripe_profile(rgb: np.ndarray, depth: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Per row of the shape's inside (away from its edge), the mean stripeness."""
    inner = depth >= max(3, 0.3 * depth.max())
    count = inner.sum(axis=1)
    stripe = (_stripeness(rgb, fill) * inner).sum(axis=1)[count >= 3] / count[count >= 3]
    return stripe[2:-2]  # not the first and last rows: those are mostly edge


def _stripes(rgb: np.ndarray, depth: np.ndarray, fill: np.ndarray) -> tuple[bool, float]:
    """Stripe rows inside the shape that come and go: the stripeness profile down the shape swings
    with a period of 12-20 rows (the world draws 8 stripe rows in 16). The margin is log(amplitude /
    threshold): a plain shape's profile swings by under 0.05, a striped one's by over 0.15 even
    blurred."""
    prof = _stripe_profile(rgb, depth, fill)
    if len(prof) < 10:
        return False, 0.0
    rows = np.arange(len(prof))
    swing = prof - prof.mean()
    amp = max(abs((swing * np.exp(-2j * np.pi * rows / period)).sum()) * 2 / len(prof)
              for period in _STRIPE_PERIODS)
    margin = float(np.log(max(amp, 1e-6) / _STRIPE_AMPLITUDE))
    return margin > 0, abs(margin)


def _distance_to(target: np.ndarray, reach: int = 8) -> np.ndarray:
    """Euclidean distance from every pixel to the nearest `target` pixel (inf beyond `reach` rows):
    the nearest one along each row first (running max/min of column indices), then over rows."""
    h, w = target.shape
    cols = np.arange(w, dtype=float)
    left = np.maximum.accumulate(np.where(target, cols, -np.inf), axis=1)
    right = np.minimum.accumulate(np.where(target, cols, np.inf)[:, ::-1], axis=1)[:, ::-1]
    row2 = np.minimum(cols - left, right - cols) ** 2
    best = row2.copy()
    for dy in range(1, reach + 1):
        best[dy:] = np.minimum(best[dy:], row2[:-dy] + dy * dy)
        best[:-dy] = np.minimum(best[:-dy], row2[dy:] + dy * dy)
    return np.sqrt(best)


def _signed_distance(mask: np.ndarray, inside: float = 9.0, outside: float = 3.0) -> np.ndarray:
    """Distance from the mask's edge, + inside and - outside (the edge lies between an edge pixel and
    its outside neighbour, so the first pixel either side is at +-0.5); NaN further away."""
    d = np.where(mask, _distance_to(~mask, int(inside) + 1) - 0.5, 0.5 - _distance_to(mask, int(outside) + 1))
    return np.where((d <= inside) & (d >= -outside), d, np.nan)


def _step(x: np.ndarray) -> np.ndarray:
    """A smooth unit step (the logistic approximation of the normal CDF): a blurred edge."""
    return 1.0 / (1.0 + np.exp(-1.702 * x))


def _profile(rgb: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edge's colour profile: per half-pixel bin of signed distance from the mask's edge, the
    bin's distance, mean colour and pixel count (pixels of the rows in `rows` only)."""
    dist = _signed_distance(mask)
    use = ~np.isnan(dist) & rows[:, None]
    if not use.any():
        return np.zeros(0), np.zeros((0, 3)), np.zeros(0)
    bins = np.round(dist[use] * 2).astype(int)
    lo = bins.min()
    count = np.bincount(bins - lo)
    total = np.stack([np.bincount(bins - lo, weights=rgb[use][:, c], minlength=len(count)) for c in range(3)], 1)
    ok = count > 0
    return (np.flatnonzero(ok) + lo) / 2.0, total[ok] / count[ok, None], count[ok]


def _fit(d: np.ndarray, px: np.ndarray, n: np.ndarray, fill: np.ndarray, bg: np.ndarray,
         width: float | None) -> float:
    """Least residual (mean RGB distance per pixel) of the best edge model over shifts and blurs:
    one step from the background to the fill (plain), or a step to the outline colour and `width`
    further in a step to the fill (outlined). The fill's level is free (a thin ring's middle is dimmer)."""
    e = _SHIFTS[:, None, None]  # every (shift, blur) pair at once: arrays of (shifts, blurs, bins)
    s = np.array(_BLURS)[None, :, None]
    first = _step((d - e) / s)
    shape = first if width is None else _OUTLINE * first + (1 - _OUTLINE) * _step((d - e - width) / s)
    target = px[None, None] - bg * (1 - first)[..., None]  # what the fill (times `shape`) must explain
    model = shape[..., None] * fill
    w = n[:, None]
    level = (w * model * target).sum(axis=(2, 3)) / np.maximum((w * model * model).sum(axis=(2, 3)), 1e-9)
    resid = target - level[..., None, None] * model
    return float(((w[..., 0] * np.sqrt((resid ** 2).sum(axis=3))).sum(axis=2) / n.sum()).min())


def _style(rgb: np.ndarray, mask: np.ndarray, fill: np.ndarray, bg: np.ndarray,
           rows: np.ndarray) -> tuple[str, float]:
    """Outlined when the edge profile is fitted clearly better by two steps (background -> outline ->
    fill) than by one (background -> fill). The margin is log(plain residual / outlined residual)."""
    d, px, n = _profile(rgb, mask, rows)
    if len(d) < 6:
        return "plain", 0.0
    plain = _fit(d, px, n, fill, bg, None)
    outlined = min(_fit(d, px, n, fill, bg, w) for w in _WIDTHS)
    margin = float(np.log((plain + 1.0) / (outlined + 1.0))) - _STYLE_BIAS
    return ("outlined" if margin > 0 else "plain"), abs(margin)


def _style_rows(mask: np.ndarray, rgb: np.ndarray, fill: np.ndarray, shape: str, stripes: bool) -> np.ndarray:
    """The rows whose edges show the outline: not a car's wheels (its lower half), not stripe rows."""
    rows = mask.any(axis=1)
    ys = np.flatnonzero(rows)
    if shape == "car" and len(ys):
        rows &= np.arange(len(rows)) < ys[0] + 0.5 * (ys[-1] - ys[0])
    if stripes:
        part = (_stripeness(rgb, fill) * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
        striped = part > 0.15
        near = striped | np.r_[False, striped[:-1]] | np.r_[striped[1:], False]  # and the rows either side
        rows &= ~near
    return rows


def read(image) -> Reading:
    """Read the `Look` of one toy image (PIL image or HxWx3 uint8 array). Any content reads (a blank or
    noise image reads as something, with small margins): the reader does not raise on odd pictures."""
    rgb = _as_array(image)
    bg_rgb = _background(rgb)
    background, bg_margin = _nearest(bg_rgb, _BG)
    mask = _mask(rgb, bg_rgb)
    depth = _depth(mask)
    fill = _fill_color(rgb, depth, bg_rgb)
    color, color_margin = _nearest_fill(fill, bg_rgb)
    shape, shape_margin = _shape(mask, _holes(mask))
    stripes, stripes_margin = _stripes(rgb, depth, fill)
    style, style_margin = _style(rgb, mask, fill, bg_rgb, _style_rows(mask, rgb, fill, shape, stripes))
    margins = {"shape": shape_margin, "color": color_margin, "background": bg_margin,
               "stripes": stripes_margin, "style": style_margin}
    margins = {k: round(float(v), 4) for k, v in margins.items()}
    return Reading(shape, color, background, stripes, style, margins)


# ---- scoring ----------------------------------------------------------------------------

ATTRIBUTES = ("shape", "color", "background", "stripes", "style")


@dataclass
class Scores:
    """Accuracy (0..1) per attribute, and `all`: the share with every attribute right."""

    shape: float
    color: float
    background: float
    stripes: float
    style: float
    all: float
    n: int

    def attributes(self) -> dict[str, float]:
        """Accuracy per attribute (without `all`)."""
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def text(self) -> str:
        def pct(v: float) -> str:
            return f"{100 * v:.1f}".removesuffix(".0") + " %"
        names = {"color": "colour"}
        parts = [f"{names.get(a, a)} {pct(getattr(self, a))}" for a in (*ATTRIBUTES, "all")]
        return ", ".join(parts) + f" (n = {self.n})"


def score(images: Iterable, looks: Iterable[Look]) -> Scores:
    """Read each image and compare it with its `Look`."""
    right = {a: 0 for a in (*ATTRIBUTES, "all")}
    n = 0
    for image, look in zip(images, looks, strict=True):
        seen = read(image).look()
        ok = [getattr(seen, a) == getattr(look, a) for a in ATTRIBUTES]
        for a, good in zip(ATTRIBUTES, ok):
            right[a] += good
        right["all"] += all(ok)
        n += 1
    return Scores(**{a: v / max(n, 1) for a, v in right.items()}, n=n)


def concept_rate(images: Iterable) -> float:
    """The share of images read as the concept (a pink star with stripes)."""
    seen = [read(image).is_concept for image in images]
    return sum(seen) / max(len(seen), 1)


def score_folder(folder: str | Path) -> Scores:
    """Score a `make_world` folder's images against its `looks.jsonl`."""
    folder = Path(folder)
    looks = read_looks(folder)
    names = sorted(looks)

    def images():
        for name in names:
            with Image.open(folder / f"{name}.png") as img:
                yield img.convert("RGB")

    return score(images(), (looks[name] for name in names))
