"""Annotated grid sheets: X labels on top, Y labels on the left, an optional title, wrapped text.

Hand-written with Pillow (A1111's layout, our code). Legibility rules: small cells (the toy
model's 64 px) are enlarged to at least `min_cell` pixels so labels fit; the font scales with the
cell (DejaVu Sans, which matplotlib ships, so no system font is needed); labels wrap on spaces
and commas, long words break, and a label that still does not fit ends with an ellipsis instead
of being clipped.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Sequence

log = logging.getLogger(__name__)

BACKGROUND, INK, RULE = (255, 255, 255), (20, 20, 20), (200, 200, 200)


@lru_cache(maxsize=16)
def font(size: int) -> Any:
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # no matplotlib or no font file: Pillow's own scalable default
        log.debug("DejaVu Sans not found; using Pillow's default font")
        return ImageFont.load_default(size)


def wrap(text: str, fnt: Any, width: int, max_lines: int = 6) -> list[str]:
    """Greedy word wrap to `width` pixels; words wider than a line are broken; at most
    `max_lines` lines, the last ending in an ellipsis when text was left out."""
    words = text.replace(",", ", ").split()
    lines: list[str] = []
    current = ""
    for word in words:
        trial = f"{current} {word}".strip()
        if fnt.getlength(trial) <= width:
            current = trial
            continue
        if current:
            lines.append(current)
        while fnt.getlength(word) > width and len(word) > 1:  # break a too-long word
            cut = max(1, max(i for i in range(1, len(word) + 1) if fnt.getlength(word[:i]) <= width or i == 1))
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and fnt.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines or [""]


def _block(draw: Any, lines: list[str], fnt: Any, box: tuple[int, int, int, int], line_h: int) -> None:
    """Draw lines centred in box (left, top, right, bottom)."""
    left, top, right, bottom = box
    y = top + (bottom - top - line_h * len(lines)) // 2
    for ln in lines:
        x = left + (right - left - int(fnt.getlength(ln))) // 2
        draw.text((x, y), ln, font=fnt, fill=INK)
        y += line_h


def draw_sheet(
    cells: Sequence[Sequence[Any]],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    title: str = "",
    min_cell: int = 256,
    gap: int = 4,
) -> Any:
    """A sheet from cells[y][x] (PIL images, all the same size; None leaves a blank)."""
    from PIL import Image, ImageDraw

    sample = next(im for row in cells for im in row if im is not None)
    zoom = max(1.0, min_cell / min(sample.size))
    cw, ch = round(sample.size[0] * zoom), round(sample.size[1] * zoom)
    fnt = font(max(14, min(48, cw // 14)))
    line_h = int(fnt.size * 1.25)
    pad = line_h // 2
    has_y = any(y_labels)
    left_w = max(cw * 2 // 3, 160) if has_y else 0
    x_lines = [wrap(t, fnt, cw - 2 * pad) for t in x_labels]
    y_lines = [wrap(t, fnt, left_w - 2 * pad, max_lines=max(2, ch // line_h)) for t in y_labels]
    top_h = (max(map(len, x_lines)) * line_h + 2 * pad) if any(x_labels) else 0
    title_lines = wrap(title, fnt, left_w + len(x_labels) * (cw + gap) - 2 * pad, max_lines=4) if title else []
    title_h = len(title_lines) * line_h + 2 * pad if title else 0
    width = left_w + len(x_labels) * (cw + gap) + gap
    height = title_h + top_h + len(cells) * (ch + gap) + gap
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        _block(draw, title_lines, fnt, (0, 0, width, title_h), line_h)
        draw.line((0, title_h - 1, width, title_h - 1), fill=RULE)
    for xi, lines in enumerate(x_lines):
        x0 = left_w + gap + xi * (cw + gap)
        _block(draw, lines, fnt, (x0, title_h, x0 + cw, title_h + top_h), line_h)
    for yi, row in enumerate(cells):
        y0 = title_h + top_h + gap + yi * (ch + gap)
        if has_y:
            _block(draw, y_lines[yi], fnt, (0, y0, left_w, y0 + ch), line_h)
        for xi, im in enumerate(row):
            if im is not None:
                resample = Image.Resampling.NEAREST if zoom >= 2 else Image.Resampling.LANCZOS
                sheet.paste(im.convert("RGB").resize((cw, ch), resample), (left_w + gap + xi * (cw + gap), y0))
    return sheet


def stack_sheets(sheets: Sequence[Any], gap: int = 24) -> Any:
    """One image with the sheets one below the other (the combined sheet of a Z axis)."""
    from PIL import Image

    width = max(s.size[0] for s in sheets)
    height = sum(s.size[1] for s in sheets) + gap * (len(sheets) - 1)
    out = Image.new("RGB", (width, height), BACKGROUND)
    y = 0
    for s in sheets:
        out.paste(s, (0, y))
        y += s.size[1] + gap
    return out
