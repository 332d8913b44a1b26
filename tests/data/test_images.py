"""Safe image opening over a corpus built here: every mode, EXIF, bombs, broken files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tunelab.data.images import (
    ImageRef,
    ImageRejected,
    RejectsLog,
    _decode,
    load_into_bucket,
    load_rgb,
    probe_size,
    read_rejects,
)


def _save(im: Image.Image, path: Path, **kw: object) -> ImageRef:
    im.save(path, **kw)
    return ImageRef(str(path))


def test_modes_convert_to_expected_rgb(tmp_path: Path) -> None:
    grey = _save(Image.new("L", (8, 6), 100), tmp_path / "l.png")
    assert load_rgb(grey).getpixel((0, 0)) == (100, 100, 100)
    la = _save(Image.new("LA", (8, 6), (0, 0)), tmp_path / "la.png")
    assert load_rgb(la).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 128))
    px = load_rgb(_save(rgba, tmp_path / "rgba.png")).getpixel((0, 0))
    assert px[0] == 255 and 120 <= px[1] <= 135  # half red over white
    pal = Image.new("P", (8, 6), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal_ref = _save(pal, tmp_path / "p.png", transparency=1)
    assert load_rgb(pal_ref).getpixel((0, 0)) == (255, 255, 255)
    opaque = _save(pal, tmp_path / "p_opaque.png")
    assert load_rgb(opaque).getpixel((0, 0)) == (0, 255, 0)
    cmyk = _save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    r, g, b = load_rgb(cmyk).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    deep = Image.fromarray(np.full((6, 8), 40000, dtype=np.uint16))
    out = load_rgb(_save(deep, tmp_path / "i16.png"))
    assert out.mode == "RGB" and abs(out.getpixel((0, 0))[0] - 40000 / 257) <= 1  # scaled, not clipped


def test_exif_orientation_applies_to_size_and_pixels(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    ref = _save(im, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    assert probe_size(ref) == (20, 40)
    shown = load_rgb(ref)
    assert shown.size == (20, 40)
    assert shown.getpixel((10, 2))[0] > 200  # the left edge is now on top


def _corpus(tmp_path: Path) -> dict[str, tuple[ImageRef, str]]:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, "JPEG")
    good = buf.getvalue()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    big = _save(Image.new("L", (300, 300)), tmp_path / "big.png")
    return {
        "trunc": (ImageRef(str(tmp_path / "trunc.jpg")), "truncated"),
        "garbage": (ImageRef(str(tmp_path / "garbage.png")), ""),
        "zero": (ImageRef(str(tmp_path / "zero.jpg")), "empty file"),
        "text": (ImageRef(str(tmp_path / "text.jpg")), "not an image"),
        "missing": (ImageRef(str(tmp_path / "nope.jpg")), "missing file"),
        "big": (big, "too large"),
    }


def test_broken_files_become_rejects_and_the_job_goes_on(tmp_path: Path) -> None:
    good = _save(Image.new("RGB", (96, 64), (1, 2, 3)), tmp_path / "ok.jpg")
    corpus = _corpus(tmp_path)
    items = [("ok", good)] + [(k, ref) for k, (ref, _) in corpus.items()] + [("ok2", good)]
    done = []
    with RejectsLog(tmp_path / "rejects.jsonl") as rejects:
        for key, ref in items:
            try:
                pixels, size, crop = load_into_bucket(ref, (64, 64), max_pixels=200 * 200)
                done.append(key)
                assert pixels.shape == (64, 64, 3) and size == (96, 64) and crop == (16, 0, 80, 64)
            except ImageRejected as rej:
                rejects.add(key, ref.path, rej.reason)
    assert done == ["ok", "ok2"]
    logged = {r["key"]: r for r in read_rejects(tmp_path / "rejects.jsonl")}
    assert set(logged) == set(corpus)
    for key, (ref, reason) in corpus.items():
        assert logged[key]["path"] == ref.path and reason in logged[key]["reason"]


def test_tar_member_read_in_place(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(buf, "PNG")
    data = buf.getvalue()
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tf:
        info = tarfile.TarInfo("a/img.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with tarfile.open(tar_path) as tf:
        member = tf.getmember("a/img.png")
    ref = ImageRef(str(tar_path), member.offset_data, member.size)
    assert probe_size(ref) == (30, 20)
    assert load_rgb(ref).getpixel((1, 1)) == (200, 10, 10)
    with pytest.raises(ImageRejected, match="truncated"):
        ImageRef(str(tar_path), tar_path.stat().st_size - 10, 100).open()


def test_jpeg_draft_decodes_small_when_target_is_small(tmp_path: Path) -> None:
    ref = _save(Image.new("RGB", (2000, 1000), (5, 5, 5)), tmp_path / "big.jpg")
    drafted, full = _decode(ref, 10**9, (500, 250))
    assert full == (2000, 1000) and drafted.size == (500, 250)  # 1/4 scale, never below the target
    pixels, size, _ = load_into_bucket(ref, (1024, 512))
    assert pixels.shape == (512, 1024, 3) and size == (2000, 1000)
