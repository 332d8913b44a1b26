"""A1111 "parameters" infotext: write it into PNG text chunks and JPEG / WebP EXIF, and parse it back.

The format (what A1111, Forge, ComfyUI importers and CivitAI read):

    <prompt>
    Negative prompt: <negative>
    Steps: 48, Sampler: DDIM CFG++, CFG scale: 6, Seed: 460372993, Size: 1024x1024, Model hash: 1a2b3c4d5e, ...

As A1111 v1.10 writes it (modules/processing.py `create_infotext`, modules/infotext_utils.py
`quote`): values holding a comma, colon or newline are JSON-quoted; "Model hash" / "VAE hash" are
the first 10 hex digits of the file's SHA-256, "Model" the file name without extension, "VAE" the
VAE's file name; "Clip skip" is left out at 1; numbers are written as A1111's UI writes them
(`CFG scale: 6`, `Denoising strength: 0.7`: its sliders send JSON numbers, so a whole value is an
int; its API writes `6.0`, and A1111 reads both). PAG and SEG use the field names of
pamparamm/sd-perturbed-attention (the extension whose SEG is the reference algorithm, for Forge,
reForge and ComfyUI; scripts/pag.py, scripts/seg.py), CFG rescale that of the CFG Rescale extension
(Seshelle/CFG_Rescale_webui, scripts/CFGRescale.py), so pasting the text restores them there.

Hand-written: the format is a convention with no library. JPEG and WebP carry the text in the EXIF
UserComment, type UNDEFINED, "UNICODE\\0" prefix + UTF-16BE, byte for byte what A1111's
`piexif.helper.UserComment.dump(geninfo, encoding="unicode")` writes; the EXIF block is built here
(Pillow would type the tag BYTE, which piexif, A1111's reader, returns as a tuple of ints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

_USER_COMMENT, _EXIF_IFD = 0x9286, 0x8769
_UNICODE = b"UNICODE\0"
_CHARSETS = {b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis", _UNICODE: "utf_16_be"}  # EXIF 2.3, Table 9
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
    """A1111's `quote`: JSON-quoted when the value holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _num(x: float) -> str:
    """A number as A1111's UI writes it: a whole value as an int (`6`), any other as Python's
    shortest float (`0.7`): its sliders reach the processing code as JSON numbers."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def format_infotext(prompt: str, negative: str, params: Mapping[str, Any]) -> str:
    """The three-part A1111 text; params in order, None values left out."""
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    neg = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{neg}\n{line}"


def settings_params(s: Any, size: tuple[int, int], model: str | None, model_hash: str | None,
                    vae: str | None = None, extra: Mapping[str, Any] | None = None, *, vae_hash: str | None = None,
                    rescale: float | None = None, attn_layers: Sequence[str] | None = None) -> dict[str, Any]:
    """A1111 parameter names for a SampleSettings (pipeline.SampleSettings).

    `rescale` is the CFG rescale phi the render applied (a zero-terminal-SNR model gets 0.7 when
    the settings leave it unset); `attn_layers` are the UNet's attention processor names, needed
    to name PAG / SEG layers other than "mid" the extension's way."""
    from tunelab.sample.samplers import infotext_names

    sampler, schedule_type = infotext_names(s.sampler, getattr(s, "schedule_type", "Automatic"))
    p: dict[str, Any] = {
        "Steps": s.steps, "Sampler": sampler, "Schedule type": schedule_type, "CFG scale": _num(s.cfg), "Seed": s.seed,
        "Size": f"{size[0]}x{size[1]}", "Model hash": model_hash, "Model": model, "VAE hash": vae_hash, "VAE": vae,
        "Denoising strength": _num(s.hires_denoise) if s.hires_scale > 1 else None,
        "Clip skip": s.clip_skip if s.clip_skip > 1 else None,  # A1111 leaves out its default, 1
        # the noise is A1111's with its "CPU" RNG source (pipeline.SeedNoise); A1111 writes the field
        # when the source is not its default (GPU) and "Send to txt2img" restores it (randn_source)
        "RNG": "CPU",
    }
    if s.hires_scale > 1:
        first = (extra or {}).get("first_pass")
        if first:
            p["Size"] = f"{first[0]}x{first[1]}"  # A1111 writes the first pass size plus the upscale
        p.update({"Hires upscale": _num(s.hires_scale),
                  "Hires steps": s.hires_steps or None, "Hires upscaler": "Latent" if s.hires_upscaler == "latent" else "Lanczos"})
    if s.pag_scale:
        p.update(_perturbed_params("pag", s.pag_scale, s.pag_layers, attn_layers, s.hires_scale > 1))
    if s.seg_scale:
        p.update(_perturbed_params("seg", s.seg_scale, s.seg_layers, attn_layers, s.hires_scale > 1, s.seg_sigma))
    if s.freeu:
        p["FreeU"] = "b1 1.3, b2 1.4, s1 0.9, s2 0.2"
    phi = rescale if rescale is not None else (s.guidance_rescale or 0.0)
    if phi > 0:
        p["CFG Rescale"] = _num(phi)  # the extension writes it only when on; missing reads as 0
    if s.negative == "" and getattr(s, "uncond", "zeros") == "empty":
        p["Uncond"] = "empty"  # tunelab's: A1111 always zeroes an empty SDXL negative
    if getattr(s, "pad_conds", False):
        p["Pad conds"] = True  # A1111's own field: pasted back, it turns on "Pad prompt/negative prompt"
    if getattr(s, "comma_backtrack", 20) != 20:
        p["Comma backtrack"] = s.comma_backtrack  # tunelab's: A1111 keeps its setting out of the infotext
    if getattr(s, "clip_skip_te2", False) and s.clip_skip != 2:
        p["Clip skip TE2"] = True  # tunelab's: A1111 never skips layers of TE2
    p.update(extra_params(extra))
    p["Version"] = "tunelab"
    return p


def _perturbed_params(kind: str, scale: float, layers: str, attn_layers: Sequence[str] | None, hires: bool,
                      sigma: float | None = None) -> dict[str, Any]:
    """pamparamm/sd-perturbed-attention's fields, in the order and with the values its Forge
    scripts write them (scripts/pag.py, scripts/seg.py `process_before_every_sampling`): tunelab
    has no rescale, adaptive scale or sigma range, so those are its defaults (0, full, 0)."""
    from tunelab.sample.guidance import seg_is_infinite

    block_list = "" if layers.strip() in ("mid", "middle") else extension_block_list(attn_layers, layers)
    out: dict[str, Any] = {f"{kind}_enabled": True, f"{kind}_scale": _num(scale), f"{kind}_rescale": 0,
                           f"{kind}_rescale_mode": "full"}
    if kind == "pag":
        out["pag_adaptive_scale"] = 0
    else:  # the extension's infinite blur is -1 (its slider ends at 9999)
        out["seg_blur_sigma"] = -1 if sigma is None or seg_is_infinite(sigma) else _num(sigma)
    out.update({f"{kind}_block": "middle", f"{kind}_block_id": 0, f"{kind}_block_list": block_list})
    if hires:
        out[f"{kind}_hr_override"] = False  # the same scales in the hires pass
    return out


_ATTN1 = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1\.processor$")


def extension_block_list(attn_layers: Sequence[str] | None, spec: str) -> str:
    """tunelab's layer spec ("mid", "down.1", "up.0.1", ...) in pamparamm/sd-perturbed-attention's
    "U-Net Block List" syntax (guidance_utils.py `parse_unet_blocks`): d / m / u + the index of
    the attention block among that part's blocks that have one (SDXL: d0 = input_blocks.4,
    u0 = output_blocks.0), "." + a transformer index when only some of a block's are chosen."""
    from tunelab.sample.guidance import select_layers

    if attn_layers is None:
        raise ValueError(f"naming the layers {spec!r} for the infotext needs the UNet's attention processor names")
    groups: dict[tuple[str, int, int], dict[int, str]] = {}  # (part, block, attention) -> {transformer: name}
    for name in attn_layers:
        m = _ATTN1.match(name)
        if m:
            part = "d" if m.group(2) else ("u" if m.group(3) else "m")
            groups.setdefault((part, int(m.group(2) or m.group(3) or 0), int(m.group(4))), {})[int(m.group(5))] = name
    chosen = set(select_layers(list(attn_layers), spec))
    items = []
    for part in "dmu":  # in each part, blocks in the UNet's order: the extension's indices
        for index, key in enumerate(sorted(k for k in groups if k[0] == part)):
            picked = [t for t, name in sorted(groups[key].items()) if name in chosen]
            if len(picked) == len(groups[key]):
                items.append(f"{part}{index}")
            else:
                items += [f"{part}{index}.{t}" for t in picked]
    return ",".join(items)


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


def exif_user_comment(text: str) -> bytes:
    """An EXIF block (as Pillow's `exif=` takes it) holding only the Exif IFD's UserComment, type
    UNDEFINED (7), "UNICODE\\0" + UTF-16BE: big-endian TIFF header, IFD0 with the Exif IFD pointer,
    the Exif IFD with the one tag, then the comment."""
    comment = _UNICODE + text.encode("utf_16_be")
    exif_ifd = 8 + 2 + 12 + 4  # after the header and IFD0 (one entry + the next-IFD offset 0)
    data = exif_ifd + 2 + 12 + 4
    return (b"Exif\0\0MM\0*" + struct.pack(">I", 8)
            + struct.pack(">HHHII", 1, _EXIF_IFD, 4, 1, exif_ifd) + struct.pack(">I", 0)  # LONG pointer
            + struct.pack(">HHHII", 1, _USER_COMMENT, 7, len(comment), data) + struct.pack(">I", 0)
            + comment)


def save_with_infotext(image: Any, path: str | Path, text: str, quality: int = 95) -> Path:
    """Save a PIL image with its infotext: PNG "parameters" text chunk, or JPEG/WebP EXIF UserComment."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    suffix = path.suffix.lower()
    if suffix == ".png":
        info = PngInfo()
        info.add_text("parameters", text)
        image.save(tmp, format="PNG", pnginfo=info)
    elif suffix in (".jpg", ".jpeg", ".webp"):
        image.convert("RGB").save(tmp, format="JPEG" if suffix != ".webp" else "WEBP", exif=exif_user_comment(text),
                                  quality=quality)
    else:
        raise ValueError(f"unsupported image type {suffix}")
    tmp.replace(path)  # atomic: a killed run never leaves half an image under the final name
    return path


def read_infotext(path: str | Path) -> str | None:
    """The infotext of a PNG (text chunk) or JPEG/WebP (EXIF UserComment), None if absent, read as
    A1111 v1.10 does (modules/images.py `read_info_from_image`): a non-empty UserComment wins; its
    charset prefix picks the decoding, and without a known prefix the whole value is UTF-8."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.info.get("parameters")
        raw = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, tuple):  # typed BYTE (as tunelab wrote it before): Pillow gives the ints
        raw = bytes(raw)
    if isinstance(raw, bytes):
        charset = _CHARSETS.get(raw[:8])
        raw = raw[8:].decode(charset, errors="replace") if charset else raw.decode("utf-8", errors="ignore")
    if raw:
        text = raw
    return None if text is None else str(text)
