"""Safe image opening: any mode to correct RGB, EXIF orientation, size limits, rejects log.

Decoding itself is Pillow's. Hand-written here is only what Pillow leaves to the caller and what
a 12 M-image job cannot get wrong:
- colour: alpha is composited on white (not dropped, which turns transparent pixels black);
  16-bit greyscale is scaled, not clipped (Pillow's `convert("RGB")` clips `I;16` to white);
  palette images with a transparent index count as transparent;
- EXIF orientation is applied to pixels and to the *header* size, so buckets are chosen for the
  image as it is displayed — unless the index was built with `exif_transpose = False`, kohya's way
  (sd-scripts' `load_image` and `imagesize` read the pixels and size as stored), needed for the
  index to match kohya's latent caches of such photos;
- a decompression-bomb limit is checked from the header before any decode;
- every failure becomes `ImageRejected(reason)`, which jobs write to a rejects log
  (key, path, reason) and move on; nothing here kills a long job.
Images inside tar shards are read in place: (path, offset, size) of the member, no extraction.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tunelab.data.buckets import BucketConfig, random_crop_box, resize_plan
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

# Pillow's own hard error starts at 2 x MAX_IMAGE_PIXELS (~179 MP); we refuse above this from the
# header, before allocating anything. Real datasets have a few 100+ MP scans; raise if you need them.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".jxl")
_TRANSPOSING = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageRejected(Exception):
    """An image that cannot be used; `reason` is what goes into the rejects log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes live: a file, or a member of a tar shard (offset/size of its data)."""

    path: str
    offset: int | None = None
    size: int | None = None

    def open(self) -> str | IO[bytes]:
        """What `Image.open` takes: the path itself (Pillow then closes the file after decoding)
        or the member's bytes."""
        if self.offset is None:
            if os.path.getsize(self.path) == 0:
                raise ImageRejected("empty file")
            return self.path
        if not self.size:
            raise ImageRejected("empty file")
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) < self.size:
            raise ImageRejected("truncated (tar member shorter than its header says)")
        return io.BytesIO(data)


def _reason(exc: BaseException) -> str:
    """Map Pillow's and the OS's exceptions to short, stable rejects-log reasons."""
    if isinstance(exc, ImageRejected):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return "missing file"
    if isinstance(exc, Image.DecompressionBombError):
        return "too large (decompression-bomb limit)"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (unrecognised or corrupt header)"
    if "truncated" in str(exc).lower():
        return "truncated"
    return f"corrupt ({type(exc).__name__}: {exc})"


def _open_checked(ref: ImageRef, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(ref.open())
    if im.width * im.height > max_pixels:
        im.close()
        raise ImageRejected(f"too large ({im.width}x{im.height} > {max_pixels:,} pixels limit)")
    return im


def _orientation(im: Image.Image) -> int:
    """EXIF orientation without decoding: formats whose EXIF sits in the header only."""
    if im.format in ("JPEG", "MPO", "TIFF", "WEBP"):
        return int(im.getexif().get(0x0112, 1) or 1)
    raw = im.info.get("exif")  # e.g. PNG eXIf before IDAT; getexif() here would decode the image
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return int(exif.get(0x0112, 1) or 1)


def probe_size(ref: ImageRef, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as displayed, read from the header only; raises `ImageRejected`."""
    w, h, _ = probe_header(ref, max_pixels)
    return w, h


def probe_header(ref: ImageRef, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, bool]:
    """(width, height as displayed, whether EXIF orientation swapped the stored sides), from the
    header only; raises `ImageRejected`."""
    try:
        im = _open_checked(ref, max_pixels)
        w, h = im.size
        turned = _orientation(im) in _TRANSPOSING
        if turned:
            w, h = h, w
        im.close()
        return w, h, turned
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reject, never a crash
        raise ImageRejected(_reason(exc)) from exc


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way a person would expect to see it."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit samples (0..65535): scale to 8 bits; Pillow's convert would clip at 255.
        arr = np.asarray(im).astype(np.float32) / 257.0  # (H, W)
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _decode(
    ref: ImageRef, max_pixels: int, draft_for: tuple[int, int] | None, buckets: BucketConfig | None = None,
    exif_transpose: bool = True,
) -> tuple[Image.Image, tuple[int, int]]:
    """Open once, check, optionally draft-decode, apply EXIF (unless `exif_transpose` is off),
    convert to RGB.

    Returns (RGB image, full size (w, h) as displayed, or as stored without EXIF). `draft_for` is a
    bucket (w, h) of the bucket set `buckets`: JPEG then decodes at 1/2, 1/4 or 1/8 scale, never
    below the size the image will be resized to — the main speed-up for large photos.
    """
    try:
        im = _open_checked(ref, max_pixels)
        orientation = _orientation(im) if exif_transpose else 1
        size = (im.height, im.width) if orientation in _TRANSPOSING else im.size
        if draft_for is not None and im.format == "JPEG":
            (rw, rh), _ = resize_plan(size[0], size[1], draft_for, buckets)
            im.draft("RGB", (rh, rw) if orientation in _TRANSPOSING else (rw, rh))
        im.load()
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        return to_rgb(im), size
    except (ImageRejected, TunelabError):  # TunelabError: the bucket does not fit the image (an index error)
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reject, never a crash
        raise ImageRejected(_reason(exc)) from exc


def load_rgb(ref: ImageRef, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode fully to an upright RGB image; raises `ImageRejected`."""
    return _decode(ref, max_pixels, None)[0]


def load_into_bucket(
    ref: ImageRef, bucket: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS, buckets: BucketConfig | None = None,
    exif_transpose: bool = True, crop_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int, int, int]]:
    """Decode, resize and centre-trim into `bucket` by kohya's rule (`resize_plan`; `buckets` is the
    index's bucket config, which says whether it is a no-upscale bucket). With `crop_rng` the bucket
    is cut from a random place instead of the centre (kohya's random_crop: `random_crop_box`).

    Returns (pixels (H, W, 3) uint8, original_size (w, h) as displayed — as stored when
    `exif_transpose` is off —, the real crop_ltrb in resized pixels).
    """
    im, original = _decode(ref, max_pixels, bucket, buckets, exif_transpose)  # may be a 1/2..1/8 JPEG draft
    (rw, rh), crop = resize_plan(original[0], original[1], bucket, buckets)
    if crop_rng is not None:
        crop = random_crop_box((rw, rh), bucket, crop_rng)
    try:
        # reducing_gap: a cheap box reduce first, then Lanczos — near-identical to full Lanczos.
        im = im.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
        pixels = np.array(im.crop(crop))  # (bucket_h, bucket_w, 3), writable
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected(_reason(exc)) from exc
    return pixels, original, crop


class RejectsLog:
    """Append-only JSON-lines log of unusable images: {"key", "path", "reason"} per line.

    Thread-safe; flushed per line so a killed job keeps what it found.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self._lock = threading.Lock()
        self._file: IO[str] | None = None

    def add(self, key: str, path: str, reason: str) -> None:
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(json.dumps({"key": key, "path": path, "reason": reason}) + "\n")
            self._file.flush()
            self.count += 1
        log.debug("rejected %s (%s): %s", key, path, reason)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "RejectsLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_rejects(path: str | Path) -> list[dict[str, str]]:
    """All entries of a rejects log (empty if none was written)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
