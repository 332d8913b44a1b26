"""Small real datasets on disk, built per test: images, sidecar text, tars, kohya JSON, tables."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image


def image_bytes(size: tuple[int, int], fmt: str = "PNG", color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def write_image(path: Path, size: tuple[int, int], fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix]
    path.write_bytes(image_bytes(size, fmt))
    return path


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path
