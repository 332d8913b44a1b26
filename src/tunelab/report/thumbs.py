"""Thumbnails embedded in the report as data URIs: small images stay as they are (PNG), large
ones are scaled down (JPEG), so a report of a 1024 px run stays a few MB at most."""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from pathlib import Path


def thumbnail(path: Path, size: int = 128) -> str | None:
    """A data URI of the image at most `size` px on its longer side; None when it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _thumbnail(str(path), stat.st_mtime_ns, stat.st_size, size)


@lru_cache(maxsize=4096)
def _thumbnail(path: str, mtime_ns: int, nbytes: int, size: int) -> str | None:  # the file's identity keys the cache
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buf = io.BytesIO()
    if max(image.size) <= size:
        image.save(buf, "PNG", optimize=True)
        kind = "png"
    else:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        image.convert("RGB").save(buf, "JPEG", quality=82)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
