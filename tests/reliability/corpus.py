"""A folder dataset of good images beside every kind of bad input the field meets.

`build(folder)` writes the corpus and returns {key: Expect}: whether the item must be trained
(`good`) or rejected, and for rejects a word the rejects-log reason must contain. Good items are
toy-world-sized pictures whose oddity is the *format* (CMYK, 16-bit, palette with transparency,
animated, EXIF-rotated, wrong extension) or the *text* (no caption file, non-UTF-8, 1 MB, HTML and
script); they must come out as ordinary RGB training samples.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Expect:
    good: bool
    reason: str = ""  # for rejects: a word of the reason


def _picture(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = rng.integers(0, 255, 3)
    a[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = rng.integers(0, 255, 3)
    return Image.fromarray(a)


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height grey pixels, with a tiny IDAT (a decompression
    bomb: a few hundred bytes that would decode to gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def build(folder: Path) -> dict[str, Expect]:
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Expect] = {}

    def write(name: str, data: bytes, expect: Expect, tags: str | bytes | None = "red, circle") -> None:
        (folder / name).write_bytes(data)
        if tags is not None:
            (folder / name).with_suffix(".txt").write_bytes(tags.encode() if isinstance(tags, str) else tags)
        out[Path(name).stem] = expect

    good = Expect(True)
    for i in range(6):  # plain good images
        write(f"good{i}.png", _bytes(_picture(i), "PNG"), good)
    jpeg, png, webp = _bytes(_picture(10), "JPEG"), _bytes(_picture(11), "PNG"), _bytes(_picture(12), "WEBP")
    write("truncated-jpeg.jpg", jpeg[: len(jpeg) // 2], Expect(False, "truncated"))
    write("truncated-png.png", png[: len(png) // 2], Expect(False, "trunc"))
    write("truncated-webp.webp", webp[: len(webp) // 2], Expect(False, ""))
    write("zero-bytes.jpg", b"", Expect(False, "empty"))
    write("html-as-jpg.jpg", b"<!DOCTYPE html><html><head><title>404</title></head><body>Not Found</body></html>",
          Expect(False, "not an image"))
    write("one-pixel.png", _bytes(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), Expect(False, "too small"))
    write("bomb.png", _png_bomb(60000, 60000), Expect(False, "too large"))
    write("wrong-extension.jpg", _bytes(_picture(13), "PNG"), good)  # a PNG named .jpg: decoded by content
    write("cmyk.jpg", _bytes(_picture(14).convert("CMYK"), "JPEG", quality=95), good)
    grey16 = Image.fromarray((np.linspace(0, 65535, 96 * 64).reshape(64, 96)).astype(np.uint16))
    write("sixteen-bit.png", _bytes(grey16, "PNG"), good)
    pal = _picture(15).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    write("palette-transparent.png", _bytes(pal, "PNG", transparency=0), good)
    frames = [_picture(16 + k) for k in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    write("animated.gif", buf.getvalue(), good)
    rotated = _picture(19, size=(64, 96))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees
    write("exif-rotated.jpg", _bytes(rotated, "JPEG", exif=exif.tobytes()), good)
    write("missing-caption.png", _bytes(_picture(20), "PNG"), good, tags=None)
    write("non-utf8-caption.png", _bytes(_picture(21), "PNG"), good, tags="caf\xe9, cr\xe8me".encode("latin-1"))
    write("huge-caption.png", _bytes(_picture(22), "PNG"), good, tags=("red, circle, " * 80000)[: 1 << 20])
    write("html-caption.png", _bytes(_picture(23), "PNG"), good,
          tags='<script>alert(1)</script>, <img src=x onerror="alert(2)">, "quoted", &amp;')
    return out


KINDS_BAD = 7  # truncated jpeg/png/webp, zero bytes, html, 1x1, bomb
KINDS_GOOD_ODD = 10  # wrong extension, CMYK, 16-bit, palette+transparency, animated, EXIF, 4 caption kinds
