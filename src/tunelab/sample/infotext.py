"""A1111 "parameters" infotext: write it into PNG text chunks and JPEG EXIF, and parse it back.

The format (what A1111, Forge, ComfyUI importers and CivitAI read):

    <prompt>
    Negative prompt: <negative>
    Steps: 48, Sampler: DDIM CFG++, CFG scale: 6, Seed: 460372993, Size: 1024x1024, Model hash: 1a2b3c4d5e, ...

Values holding a comma, colon or quote are JSON-quoted, as A1111 does. "Model hash" is A1111's
short hash: the first 10 hex digits of the file's SHA-256. Hand-written: the format is a
convention with no library; the EXIF UserComment uses the "UNICODE" charset prefix + UTF-16BE, the
encoding A1111 writes through piexif, written here through Pillow's own EXIF support.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

_USER_COMMENT, _EXIF_IFD = 0x9286, 0x8769
_UNICODE = b"UNICODE\0"
_PAIR = re.compile(r'\s*([\w][\w \-/+.()]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_hash_cache: dict[tuple[str, int, float], str] = {}


def model_hash(path: str | Path) -> str | None:
    """A1111's "Model hash" of a checkpoint file (sha256[:10]); None for folders. Cached per run."""
    path = Path(path)
    if not path.is_file():
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):  # 4 MiB at a time: files are GBs
                h.update(block)
        _hash_cache[key] = h.hexdigest()[:10]
    return _hash_cache[key]


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def _num(x: float) -> str:
    return f"{x:g}"


def format_infotext(prompt: str, negative: str, params: Mapping[str, Any]) -> str:
    """The three-part A1111 text; params in order, None values left out."""
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    neg = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{neg}\n{line}"


def settings_params(s: Any, size: tuple[int, int], model: str | None, model_hash: str | None,
                    vae: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A1111 parameter names for a SampleSettings (pipeline.SampleSettings)."""
    p: dict[str, Any] = {
        "Steps": s.steps, "Sampler": s.sampler, "CFG scale": _num(s.cfg), "Seed": s.seed,
        "Size": f"{size[0]}x{size[1]}", "Model hash": model_hash, "Model": model, "VAE": vae,
        "Clip skip": s.clip_skip,
    }
    if s.hires_scale > 1:
        first = (extra or {}).get("first_pass")
        if first:
            p["Size"] = f"{first[0]}x{first[1]}"  # A1111 writes the first pass size plus the upscale
        p.update({"Denoising strength": _num(s.hires_denoise), "Hires upscale": _num(s.hires_scale),
                  "Hires steps": s.hires_steps or None, "Hires upscaler": "Latent" if s.hires_upscaler == "latent" else "Lanczos"})
    if s.pag_scale:
        p.update({"PAG scale": _num(s.pag_scale), "PAG layers": s.pag_layers})
    if s.seg_scale:
        p.update({"SEG scale": _num(s.seg_scale), "SEG blur sigma": _num(s.seg_sigma), "SEG layers": s.seg_layers})
    if s.freeu:
        p["FreeU"] = "b1 1.3, b2 1.4, s1 0.9, s2 0.2"
    if s.guidance_rescale:
        p["CFG rescale"] = _num(s.guidance_rescale)
    if s.uncond == "zeros":
        p["Uncond"] = "zeros"
    p.update(extra_params(extra))
    p["Version"] = "tunelab"
    return p


def extra_params(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (extra or {}).items() if k != "first_pass"}


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111 infotext -> {"Prompt", "Negative prompt", and every "Key": "value" of the last line}."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(_PAIR.findall(lines[-1])) >= 3 else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for ln in body:
        if ln.startswith("Negative prompt:"):
            in_negative, ln = True, ln[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(ln)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        out[key.strip()] = value
    return out


# --- files ----------------------------------------------------------------------------------------------


def save_with_infotext(image: Any, path: str | Path, text: str, quality: int = 95) -> Path:
    """Save a PIL image with its infotext: PNG "parameters" text chunk, or JPEG/WebP EXIF UserComment."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    suffix = path.suffix.lower()
    if suffix == ".png":
        info = PngInfo()
        info.add_text("parameters", text)
        image.save(tmp, format="PNG", pnginfo=info)
    elif suffix in (".jpg", ".jpeg", ".webp"):
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE + text.encode("utf-16-be")
        image.convert("RGB").save(tmp, format="JPEG" if suffix != ".webp" else "WEBP", exif=exif, quality=quality)
    else:
        raise ValueError(f"unsupported image type {suffix}")
    tmp.replace(path)  # atomic: a killed run never leaves half an image under the final name
    return path


def read_infotext(path: str | Path) -> str | None:
    """The infotext of a PNG (text chunk) or JPEG/WebP (EXIF UserComment), None if absent."""
    from PIL import Image

    with Image.open(path) as im:
        if "parameters" in im.info:
            return str(im.info["parameters"])
        raw = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    if raw.startswith(_UNICODE):
        return raw[len(_UNICODE):].decode("utf-16-be")
    return raw[8:].decode("utf-8", errors="replace") if raw[:8] in (b"ASCII\0\0\0", b"\0" * 8) else raw.decode("utf-8", errors="replace")
