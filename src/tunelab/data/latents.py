"""Latent shards: VAE-encode an index into checksummed fp16 shards; verify, repair, resume; read
kohya `.npz` caches as they are.

A shard is one `.safetensors` file (the field's tensor format, read lazily with `safe_open`) holding
up to `shard_size` entries: tensor name = image key, latents (4, H/8, W/8) fp16, unscaled (the
VAE's scaling factor is applied at training time, as kohya does). Its header metadata
`tunelab.latents` maps each key to original_size [w, h], crop_ltrb [l, t, r, b] and a blake2b-64
checksum of the fp16 bytes; `tunelab.crop_ltrb` names the crop box's convention (buckets.py): "kohya"
(sd-scripts' `get_crop_ltrb`, what kohya's `.npz` caches hold too), written by this version; shards
without it are older ones, holding the real crop in resized pixels ("crop"). Each entry says which
convention it is in (`LatentEntry.crop_convention`), and the data loader converts it to the run's
`data.crop_conditioning`, so shards of either age and kohya's caches give one convention. Images
are decoded by the index's resize rule and EXIF choice (its footer). Shards are written to a
temporary name and renamed when complete, so a killed run leaves only whole shards; a rerun skips
every key already in one (resume). Under `accelerate launch` process r of n takes rows r, r + n, ...; shard names carry the
rank so processes never collide.

`latents.json` in the folder records the index (and its bucket set) the shards were cached from;
caching into a folder made from other buckets is refused (a resume would keep the old sizes).

`open_latents(folder, index)` is what training opens: it tells the two layouts apart (tunelab
shards, or kohya's `.npz` files named like the images) and checks the folder against the index
before the first step: the manifest's buckets, and the latent shapes of a sample of rows (spread
over the index, one per bucket) against their buckets. Otherwise a cache from other buckets
would fail mid-epoch in collate (`stack expects each tensor to be equal size`).

Hand-written because neither diffusers nor accelerate caches latents; the file format is
safetensors, the encoder is diffusers' AutoencoderKL. By default the latent is the posterior's
mean (deterministic, so a repaired entry equals the original); `posterior = "sample"` draws from
the posterior as kohya's sd-scripts caches (`latent_dist.sample()`), with noise seeded by the image's
key, so a repair still reproduces it. The manifest records which, and a folder is never mixed.

`flip = True` (`tunelab data cache --flip`, for runs with `data.flip_aug`) also stores the latents of
each image mirrored left-right, as kohya's `--flip_aug` caches `latents_flipped`: the mirrored pixels
are encoded (sd-scripts `LatentsCachingStrategy._default_cache_batch_latents`, library/strategy_base.py,
`torch.flip(img_tensor, dims=[3])` before the VAE), because a VAE's latent of a mirrored image is not
the mirrored latent. In a shard they are the tensor `KEY#flipped` with their own checksum
(`flipped_checksum` in the entry); the manifest records `flip`, and a folder is never mixed either.
Kohya `.npz` files give their `latents_flipped` (or `latents_flipped_{h}x{w}`) when asked.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from tunelab import faults
from tunelab.data.buckets import BucketConfig, kohya_crop_ltrb
from tunelab.data.images import ImageRef, ImageRejected, RejectsLog, load_into_bucket, read_rejects
from tunelab.data.index import read_footer
from tunelab.errors import TunelabError

if TYPE_CHECKING:  # torch is imported where it is used: the index side of tunelab runs without it
    import torch

    from tunelab.data.loader import IndexTable

log = logging.getLogger(__name__)

META_KEY = "tunelab.latents"
CROP_META_KEY = "tunelab.crop_ltrb"  # the shard's crop convention; absent: "crop" (shards before it was recorded)
SHARD_GLOB = "shard-*.safetensors"
_COLUMNS = ["key", "path", "offset", "size", "bucket_width", "bucket_height"]
KOHYA_SDXL_SUFFIX = "_sdxl.npz"  # sd-scripts' SdSdxlLatentsCachingStrategy.SDXL_LATENTS_NPZ_SUFFIX
KOHYA_SD_SUFFIX = "_sd.npz"  # ... SD_LATENTS_NPZ_SUFFIX: SD 1.x/2.x latents (another VAE), not for SDXL
_SAMPLE_ROWS = 32  # index rows checked against a latent folder when it is opened (plus one per bucket)
MANIFEST = "latents.json"  # which index, and which bucket set, a shard folder was cached from
FLIPPED_SUFFIX = "#flipped"  # a shard's tensor of an image's mirrored latents: KEY#flipped


@dataclass
class LatentEntry:
    latents: np.ndarray  # (4, H/8, W/8) float16 (tunelab shards) or float32 (kohya .npz)
    original_size: tuple[int, int]  # (w, h) of the image (as the index saw it; kohya: as stored)
    crop_ltrb: tuple[float, float, float, float]  # the crop box, in `crop_convention`
    crop_convention: str = "kohya"  # "kohya" (fitted inside the bucket) or "crop" (real crop): buckets.py
    flipped: bool = False  # `latents` are the mirrored image's (kohya's latents_flipped); crop_ltrb is not mirrored


class LatentSource(Protocol):
    """What `TrainDataset` reads latents from. `record` is the image's index row (key, path,
    width, height, bucket_width, bucket_height, ...), for caches that are found from the image.
    `flipped`: the latents of the image mirrored left-right (a TunelabError naming the rebuild when
    the cache has none)."""

    def get(self, key: str, record: dict | None = None, flipped: bool = False) -> LatentEntry | None: ...

    def missing(self, key: str, record: dict | None = None) -> str:
        """The error message for an image `get` has nothing for."""
        ...


def checksum(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=8).hexdigest()


def shard_entries(path: Path) -> dict[str, dict]:
    """The entry table of a shard's header (raises if the file is unreadable)."""
    return shard_header(path)[0]


def shard_header(path: Path) -> tuple[dict[str, dict], str]:
    """(entry table, crop convention) of a shard's header; shards from before the convention was
    recorded hold the real crop ("crop"). Raises if the file is unreadable."""
    table, convention, _ = _read_header(path)
    return table, convention


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def _read_header(path: Path) -> tuple[dict[str, dict], str, tuple[int, dict]]:
    """`shard_header` and where each tensor's bytes lie, from one read of the safetensors header
    (8 bytes little-endian length, then JSON: name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 2 <= size <= 2**30:
            raise TunelabError(f"{path} is not a safetensors file (header length {size})")
        header = json.loads(fh.read(size))
    meta = header.pop("__metadata__", None) or {}
    if META_KEY not in meta:
        raise TunelabError(f"{path} is not a tunelab latent shard")
    tensors = {}
    for name, t in header.items():
        if t["dtype"] not in _NUMPY_DTYPES:
            raise TunelabError(f"{path}: tensor {name!r} is {t['dtype']}; latent shards hold F16 or F32")
        tensors[name] = (_NUMPY_DTYPES[t["dtype"]], tuple(t["shape"]), *t["data_offsets"])
    end = max((t[3] for t in tensors.values()), default=0)
    if os.path.getsize(path) < 8 + size + end:  # as safe_open refuses it: a cut shard is skipped, then repaired
        raise TunelabError(f"{path} is shorter than its header says (truncated)")
    return json.loads(meta[META_KEY]), meta.get(CROP_META_KEY, "crop"), (8 + size, tensors)


def _write_shard(out_dir: Path, rank: int, entries: dict[str, tuple[np.ndarray, dict]],
                 crop_convention: str = "kohya", flipped: dict[str, np.ndarray] | None = None) -> Path:
    """Write entries {key: (latents, info)} as one shard, atomically; `crop_convention` is the one
    of every entry's crop_ltrb; `flipped` {key: latents of the mirrored image} become `KEY#flipped`."""
    name = f"shard-r{rank:03d}-{uuid.uuid4().hex[:12]}.safetensors"
    tmp = out_dir / f".{name}.tmp"
    table = {k: {**info, "checksum": checksum(arr)} for k, (arr, info) in entries.items()}
    tensors = {k: arr for k, (arr, _) in entries.items()}
    for k, arr in (flipped or {}).items():
        if k + FLIPPED_SUFFIX in tensors:
            raise TunelabError(f"the index has both {k!r} and {k + FLIPPED_SUFFIX!r}: rename one (tunelab keeps "
                               f"mirrored latents under KEY{FLIPPED_SUFFIX})")
        tensors[k + FLIPPED_SUFFIX] = arr
        table[k]["flipped_checksum"] = checksum(arr)
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(table), CROP_META_KEY: crop_convention})
    faults.point("cache.shard")
    os.replace(tmp, out_dir / name)
    return out_dir / name


class LatentStore:
    """Read access to a shard directory: key -> entry, checksum checked on every read."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)
        self._where: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        self._convention: dict[Path, str] = {}  # shard -> the crop convention of its entries
        self._layout: dict[Path, tuple[int, dict]] = {}  # shard -> (data start, {tensor: (dtype, shape, begin, end)})
        for shard in sorted(self.dir.glob(SHARD_GLOB)):
            try:
                table, self._convention[shard], self._layout[shard] = _read_header(shard)
            except Exception as exc:  # noqa: BLE001 - a broken shard is reported by verify
                log.warning("skipping unreadable shard %s (%s); run `tunelab data verify --repair`", shard.name, exc)
                continue
            for key, info in table.items():
                self._where[key], self._info[key] = shard, info

    def __len__(self) -> int:
        return len(self._where)

    def _read(self, shard: Path, name: str) -> np.ndarray:
        """One tensor, read by the offsets its shard's header gave when the store opened: the header
        names every entry of the shard, so parsing it for each read (as `safe_open` does) cost
        more than the read, 14 % of a toy pretrain's step (benchmarks/latent_reads.py). Plain
        reads, no memory map: a shard truncated under a running job raises instead of faulting."""
        start, tensors = self._layout[shard]
        dtype, shape, begin, end = tensors[name]
        with open(shard, "rb") as fh:
            fh.seek(start + begin)
            raw = fh.read(end - begin)
        if len(raw) != end - begin:
            raise TunelabError(f"{shard.name} is shorter than its header says; run `tunelab data verify --repair`")
        return np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)  # writable, as safe_open gives

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def missing(self, key: str, record: dict | None = None) -> str:
        return f"no cached latents for {key!r} in {self.dir}; run `tunelab data cache` (or verify --repair)"

    def has_flipped(self, key: str) -> bool:
        """Whether `key`'s entry holds the mirrored image's latents too (cached with --flip)."""
        return "flipped_checksum" in self._info.get(key, {})

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of `key`'s latents, (4, H/8, W/8), from its shard's header (no tensor is read)."""
        shard = self._where.get(key)
        if shard is None:
            return None
        return tuple(self._layout[shard][1][key][1])

    def get(self, key: str, record: dict | None = None, flipped: bool = False) -> LatentEntry | None:
        shard = self._where.get(key)
        if shard is None:
            return None
        info = self._info[key]
        if flipped and not self.has_flipped(key):
            raise TunelabError(f"{self.dir} holds no mirrored latents for {key!r} (cached without --flip), which "
                               "data.flip_aug needs: " + flip_fix())
        name, want = (key + FLIPPED_SUFFIX, info.get("flipped_checksum")) if flipped else (key, info["checksum"])
        arr = self._read(shard, name)
        if checksum(arr) != want:
            raise TunelabError(f"latents of {key!r} in {shard.name} are corrupt; run `tunelab data verify --repair`")
        return LatentEntry(arr, tuple(info["original_size"]), tuple(info["crop_ltrb"]), self._convention[shard],
                           flipped)


def flip_fix(index: Path | str = "INDEX") -> str:
    """How to get a latent cache that data.flip_aug can train from (the end of a refusal)."""
    return (f"cache the mirrored images too, into a new folder: `tunelab data cache {index} --out NEW_DIR --flip "
            "--model BASE`, and set data.latents = NEW_DIR; or leave data.latents empty to encode (and mirror) the "
            "images while training")


class KohyaNpzLatents:
    """kohya's one-`.npz`-per-image cache, read as it is (sd-scripts `library/strategy_sd.py`,
    `SdSdxlLatentsCachingStrategy.get_latents_npz_path`, and `library/strategy_base.py`,
    `save_latents_to_disk` / `_default_load_latents_from_disk`).

    File, in kohya's order of preference: `STEM.npz` (older versions; kept first "for backward
    compatibility"), then `STEM_WWWWxHHHH_sdxl.npz` with the original image size zero-padded to 4
    digits. STEM is `ROOT/KEY` (kohya's fine-tuning layout, `image_dir/image_key.npz`) or the image
    path without its extension (cached beside the images). Names match exactly: `img` never takes
    `img_0`'s file.

    Keys, in either of kohya's layouts: `latents` (4, H/8, W/8), `original_size` [w, h],
    `crop_ltrb` [l, t, r, b] (very old caches have `latents` only), or the per-resolution keys
    of its newer strategy code, `latents_{h}x{w}`, `original_size_{h}x{w}`, `crop_ltrb_{h}x{w}`
    with h x w the latent size of the bucket (several buckets may share one file); fp16 or fp32.
    `latents_flipped` (`latents_flipped_{h}x{w}`: kohya's `--flip_aug` caches) is read when a flipped
    sample asks for it; `alpha_mask` is not used. The latents must fit the index's bucket.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def candidates(self, key: str, record: dict | None = None) -> list[Path]:
        """The files kohya would have written for this image, in the order they are tried."""
        stems = [self.root / key]
        if record is not None and record.get("path") and record.get("offset") is None:  # not a tar member
            beside = Path(os.path.splitext(record["path"])[0])
            if beside != stems[0]:
                stems.append(beside)
        files = [stem.with_name(stem.name + ".npz") for stem in stems]
        if record is not None and record.get("width") and record.get("height"):
            w, h = int(record["width"]), int(record["height"])
            # kohya names the file by the image header's size; the index stores it as displayed
            # (EXIF rotation applied), so a rotated photo has the two swapped.
            sizes = [(w, h)] if w == h else [(w, h), (h, w)]
            files += [stem.with_name(f"{stem.name}_{a:04d}x{b:04d}{KOHYA_SDXL_SUFFIX}") for stem in stems for a, b in sizes]
        return files

    def find(self, key: str, record: dict | None = None) -> Path | None:
        """The first candidate that exists (by key alone: any size in the name), or None."""
        for path in self.candidates(key, record):
            if path.is_file():
                return path
        if record is None:  # no image size known: exactly KEY_WWWWxHHHH_sdxl.npz, any size
            stem = self.root / key
            pattern = re.compile(re.escape(stem.name) + r"_\d{4,}x\d{4,}" + re.escape(KOHYA_SDXL_SUFFIX) + "$")
            sized = sorted(p for p in stem.parent.glob(f"{glob.escape(stem.name)}_*{KOHYA_SDXL_SUFFIX}")
                           if pattern.match(p.name))
            return sized[0] if sized else None
        return None

    def missing(self, key: str, record: dict | None = None) -> str:
        tried = ", ".join(str(p) for p in self.candidates(key, record)[:4])
        return (f"no kohya latents for {key!r} (looked for {tried}); cache every image with sd-scripts "
                "(--cache_latents_to_disk), or point data.latents at a `tunelab data cache` folder")

    def get(self, key: str, record: dict | None = None, flipped: bool = False) -> LatentEntry | None:
        path = self.find(key, record)
        if path is None:
            return None
        return read_kohya_npz(path, key, record, flipped)


_RESO_KEY = re.compile(r"^latents_(\d+)x(\d+)$")


def read_kohya_npz(path: Path, key: str, record: dict | None = None, flipped: bool = False) -> LatentEntry:
    """One kohya `.npz`, either key layout, checked against the record's bucket (see `KohyaNpzLatents`);
    `flipped`: its `latents_flipped` instead of its `latents` (refused, with the fix, when it has none)."""
    want = (int(record["bucket_height"]) // 8, int(record["bucket_width"]) // 8) \
        if record is not None and record.get("bucket_width") else None
    try:
        with np.load(path) as npz:
            names = set(npz.files)
            if "latents" in names:
                suffix = ""
            else:
                sizes = sorted((int(m[1]), int(m[2])) for n in names if (m := _RESO_KEY.match(n)))
                if not sizes:
                    raise TunelabError(f"{path}: no `latents` and no per-resolution `latents_HxW` array (it holds "
                                       f"{', '.join(sorted(names)) or 'nothing'}): not a kohya latent cache; re-cache it")
                if want is not None and want not in sizes:
                    stored = f"original_size_{sizes[0][0]}x{sizes[0][1]}"
                    raise TunelabError(
                        f"{path} holds latents for the bucket(s) {', '.join(f'{w * 8}x{h * 8}' for h, w in sizes)}, but "
                        f"the index puts {key!r} in {want[1] * 8}x{want[0] * 8}: "
                        + _kohya_fix(tuple(int(v) for v in npz[stored]) if stored in names else None, record))
                h, w = want if want is not None else sizes[0]
                suffix = f"_{h}x{w}"
            if flipped and "latents_flipped" + suffix not in names:
                raise TunelabError(f"{path} has no `latents_flipped{suffix}`, which data.flip_aug needs (sd-scripts "
                                   "caches them only with --flip_aug): re-cache with --flip_aug, or " + flip_fix())
            latents = npz[("latents_flipped" if flipped else "latents") + suffix]
            size = tuple(int(v) for v in npz["original_size" + suffix]) if "original_size" + suffix in names else None
            crop = tuple(float(v) for v in npz["crop_ltrb" + suffix]) if "crop_ltrb" + suffix in names else None
    except TunelabError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/pickle/shape errors all mean "corrupt"
        raise TunelabError(f"{path} is not a readable kohya latent cache ({exc}); delete it and re-cache") from exc
    if latents.ndim != 3 or latents.shape[0] != 4:
        raise TunelabError(f"{path}: `latents{'_flipped' if flipped else ''}{suffix}` has shape {latents.shape}, not "
                           "SDXL's (4, H/8, W/8); re-cache it")
    if want is not None and latents.shape[1:] != want:
        raise TunelabError(
            f"{path} holds latents of a {latents.shape[2] * 8}x{latents.shape[1] * 8} bucket, but the index "
            f"puts {key!r} in {record['bucket_width']}x{record['bucket_height']}: " + _kohya_fix(size, record))
    if size is None:  # old kohya caches: no size stored; the latents' own size is all we know
        size = (latents.shape[-1] * 8, latents.shape[-2] * 8)
    if crop is None:  # very old caches: no crop stored; what kohya's `get_crop_ltrb` gives for them
        crop = kohya_crop_ltrb((latents.shape[-1] * 8, latents.shape[-2] * 8), size)
    return LatentEntry(latents, size, crop, "kohya", flipped)


def _kohya_fix(size: tuple[int, ...] | None, record: dict) -> str:
    """How to make the index fit a kohya file of another bucket: EXIF (the sizes are swapped) or buckets."""
    w, h = record.get("width"), record.get("height")
    if size is not None and w != h and tuple(size) == (h, w):
        return (f"kohya cached the image as stored ({size[0]}x{size[1]}) and the index turned it upright by its EXIF "
                "orientation; rebuild the index kohya's way with `tunelab data index --no-exif-transpose ...`")
    return ("build the index with the bucket settings kohya cached with (resolution, min/max side, step, "
            "--bucket-no-upscale), or re-cache the latents")


@dataclass
class KohyaVerifyReport:
    """`tunelab data verify` on a folder of kohya `.npz` caches."""

    entries_ok: int = 0
    missing: list[str] = field(default_factory=list)  # index keys without a file
    problems: dict[str, str] = field(default_factory=dict)  # file -> what is wrong with it

    @property
    def ok(self) -> bool:
        return not (self.missing or self.problems)

    def text(self) -> str:
        lines = [f"kohya .npz caches: {self.entries_ok:,} good, {len(self.missing):,} missing, "
                 f"{len(self.problems):,} unusable"]
        if self.missing:
            lines.append(f"  missing e.g.: {', '.join(self.missing[:5])}")
        lines += [f"  {path}: {why}" for path, why in list(self.problems.items())[:20]]
        if not self.ok:
            lines.append("  re-cache those images with sd-scripts (--cache_latents_to_disk), or cache the index with "
                         "`tunelab data cache` instead")
        return "\n".join(lines)


def verify_kohya(index_path: str | Path, folder: str | Path, progress: bool = True) -> KohyaVerifyReport:
    """Every index row's kohya file: present, readable, with the keys and the bucket the index expects."""
    from tunelab.data.loader import open_index

    index = open_index(index_path)
    kohya = KohyaNpzLatents(folder)
    report = KohyaVerifyReport()
    rows = np.arange(len(index))
    for start in tqdm(range(0, len(rows), 4096), desc="verifying", unit=" batch", disable=not progress):
        for rec in index.records(rows[start:start + 4096]):
            path = kohya.find(rec["key"], rec)
            if path is None:
                report.missing.append(rec["key"])
                continue
            try:
                read_kohya_npz(path, rec["key"], rec)
                report.entries_ok += 1
            except TunelabError as err:
                report.problems[str(path)] = str(err).removeprefix(f"{path}").lstrip(": ")
    return report


def is_kohya_folder(folder: str | Path) -> bool:
    """A folder with kohya `.npz` caches and no tunelab shards."""
    root = Path(folder)
    return root.is_dir() and next(root.glob(SHARD_GLOB), None) is None and next(root.rglob("*.npz"), None) is not None


def open_latents(path: str | Path, index: "IndexTable", flip: bool = False) -> LatentSource:
    """The latent cache in folder `path` for the images of `index`, whichever tool wrote it;
    `flip` (data.flip_aug): it must hold the mirrored images' latents too (`check_flipped`).

    * `shard-*.safetensors` at the top: tunelab's shards (`tunelab data cache`) -> `LatentStore`;
    * otherwise kohya's `.npz` files, found from a sample of the index's training rows (see
      `KohyaNpzLatents` for the names) -> `KohyaNpzLatents`. Every sampled row must have its
      file, and the first one is read, so a wrong folder or another bucket setup fails here,
      before the first step, rather than mid-epoch.

    Anything else (a missing or empty folder, SD 1.x `_sd.npz` caches, `.npz` files named unlike
    the images) raises a TunelabError naming what was expected.
    """
    root = Path(path)
    if not root.is_dir():
        raise TunelabError(f"data.latents = {str(path)!r} is not a folder; {_EXPECTED}, or leave it empty to encode images on the fly")
    if next(root.glob(SHARD_GLOB), None) is not None:
        store = LatentStore(root)
        if len(store) == 0:
            raise TunelabError(f"{root}: no readable latent shard; run `tunelab data verify --repair`")
        check_agreement(store, index)
        if flip:
            check_flipped(store, index)
        return store
    kohya = KohyaNpzLatents(root)
    records = _sample_records(index)
    found = [kohya.find(r["key"], r) for r in records]
    if not any(found):
        raise TunelabError(_unknown_layout(root, kohya, records[0] if records else None))
    lacking = [r for r, f in zip(records, found) if f is None]
    if lacking:
        raise TunelabError(f"{root} is a kohya latent folder, but {len(lacking)} of {len(records)} sampled images have "
                           f"no .npz: {kohya.missing(lacking[0]['key'], lacking[0])}")
    turned = int(index.footer.get("exif_turned") or 0)
    if turned and index.footer.get("exif_transpose", True):
        raise TunelabError(
            f"{root} holds kohya latent caches, but data.index {index.path} turned {turned:,} images upright by their "
            "EXIF orientation, which kohya ignores (it caches them as stored, at another size and bucket): rebuild the "
            "index kohya's way, `tunelab data index --no-exif-transpose ...`, or cache it with `tunelab data cache`")
    for rec in _one_per_bucket(records):
        kohya.get(rec["key"], rec)  # readable, SDXL-shaped, the index's bucket
        if flip:
            kohya.get(rec["key"], rec, flipped=True)  # and cached with --flip_aug
    log.info("data.latents: kohya .npz caches in %s", root)
    return kohya


_EXPECTED = ("expected tunelab latent shards (shard-*.safetensors, from `tunelab data cache`) or kohya .npz "
             "latent caches (IMAGE.npz or IMAGE_WWWWxHHHH_sdxl.npz beside each image, or KEY.npz under the folder)")


def _sample_records(index: "IndexTable") -> list[dict]:
    """Up to `_SAMPLE_ROWS` training rows spread evenly over the index, and the first row of
    every bucket the training split uses (a bucket setting that differs may touch only some)."""
    rows = index.rows_in_split("train")
    if not len(rows):
        return []
    picks = np.unique(np.linspace(0, len(rows) - 1, num=min(len(rows), _SAMPLE_ROWS)).astype(np.int64))
    _, first_of_bucket = np.unique(index.bucket_ids()[rows], return_index=True)
    return index.records(rows[np.union1d(picks, first_of_bucket)])


def _one_per_bucket(records: list[dict]) -> list[dict]:
    first: dict[tuple[int, int], dict] = {}
    for r in records:
        first.setdefault((r["bucket_width"], r["bucket_height"]), r)
    return list(first.values())


# --- which index a shard folder belongs to -------------------------------------------------------------


def read_manifest(cache_dir: str | Path) -> dict | None:
    """The folder's `latents.json` (None for folders cached before tunelab wrote one)."""
    path = Path(cache_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # an unreadable manifest is rewritten by the next `data cache`; shapes are still checked


def _buckets_of(doc: dict) -> str:
    c = doc.get("bucket_config") or {}
    return (f"resolution {c.get('resolution')}, sides {c.get('min_side')}-{c.get('max_side')}, step {c.get('step')}"
            if c else f"{len(doc.get('buckets') or [])} buckets")


def _same_buckets(manifest: dict, footer: dict) -> bool:
    return [list(b) for b in manifest.get("buckets") or []] == [list(b) for b in footer.get("buckets") or []]


def _claim(cache_dir: Path, index_path: Path, footer: dict, rank: int, posterior: str | None = None,
           flip: bool | None = None) -> tuple[str, bool]:
    """Record in `latents.json` which index the folder caches, and how (the posterior's mean or a
    sample; with or without the mirrored images); refuse a folder cached from an index with other
    buckets (its shards would be kept and new ones added at other sizes), with the other posterior,
    or with the other flip choice. Returns the posterior and the flip choice to use."""
    old = read_manifest(cache_dir)
    flip = _flip_choice(cache_dir, old, flip)
    had = None  # what the folder holds: its manifest's posterior (older manifests with shards: the mean)
    if old is not None:
        had = old.get("posterior") or ("mean" if next(cache_dir.glob(SHARD_GLOB), None) else None)
    posterior = posterior or had or "mean"
    if posterior not in POSTERIORS:
        raise TunelabError(f"--posterior {posterior!r}: choose one of {', '.join(POSTERIORS)}")
    if had is not None and had != posterior:
        raise TunelabError(f"{cache_dir} holds latents of the posterior's {had}; caching more as its {posterior} would "
                           f"mix the two: use --posterior {had}, or cache into a new folder")
    if old is not None and not _same_buckets(old, footer):
        raise TunelabError(
            f"{cache_dir} holds latents cached from an index with other buckets ({_buckets_of(old)}; {index_path} has "
            f"{_buckets_of(footer)}); cache into a new folder: `tunelab data cache {index_path} --out NEW_DIR` "
            f"(or delete {cache_dir} first)")
    doc = {"version": 1, "index": str(index_path), "rows": footer.get("rows"),
           "bucket_config": footer.get("bucket_config"), "buckets": footer.get("buckets"), "posterior": posterior,
           "flip": flip}
    tmp = cache_dir / f".{MANIFEST}.r{rank:03d}.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, cache_dir / MANIFEST)
    return posterior, flip


def _flip_choice(cache_dir: Path, manifest: dict | None, flip: bool | None) -> bool:
    """--flip / --no-flip against what the folder holds (its manifest; shards from before flips
    existed hold none); None: what the folder holds, else no flips. Mixing is refused."""
    has_shards = next(cache_dir.glob(SHARD_GLOB), None) is not None
    had = None
    if manifest is not None and "flip" in manifest:
        had = bool(manifest["flip"])
    elif has_shards:
        had = False
    if flip is None:
        return bool(had)
    if had is not None and had != flip:
        holds = "with" if had else "without"
        raise TunelabError(f"{cache_dir} holds latents cached {holds} the mirrored images; caching more "
                           f"{'with' if flip else 'without'} them would mix the two: use {'--flip' if had else '--no-flip'}, "
                           "or cache into a new folder")
    return flip


def check_agreement(store: LatentStore, index: "IndexTable") -> None:
    """Refuse a shard folder that does not fit `index`: cached from other buckets (its manifest),
    from another index (none of the sampled images in it), or holding latents of another size
    than the sampled rows' buckets (shapes from the shard headers: nothing is decoded)."""
    fix = (f"cache this index's latents into a new folder: `tunelab data cache {index.path} --out NEW_DIR` "
           "and set data.latents to it")
    manifest = read_manifest(store.dir)
    if manifest is not None and not _same_buckets(manifest, index.footer):
        raise TunelabError(f"data.latents {store.dir} was cached from an index with other buckets ({_buckets_of(manifest)}); "
                           f"data.index {index.path} has {_buckets_of(index.footer)}: {fix}")
    records = _sample_records(index)
    present = [r for r in records if r["key"] in store]
    if records and not present:
        raise TunelabError(f"data.latents {store.dir} holds none of {len(records)} sampled images of data.index "
                           f"{index.path} (e.g. {records[0]['key']!r}): cached from another index? {fix}")
    for rec in present:
        want = (rec["bucket_height"] // 8, rec["bucket_width"] // 8)
        got = store.shape(rec["key"])
        if tuple(got[1:]) != want:
            raise TunelabError(
                f"data.latents {store.dir} holds latents of a {got[2] * 8}x{got[1] * 8} bucket for {rec['key']!r}, but "
                f"data.index {index.path} puts it in {rec['bucket_width']}x{rec['bucket_height']} (cached from another "
                f"bucket setup): {fix}")


def check_flipped(store: LatentStore, index: "IndexTable") -> None:
    """Refuse, for data.flip_aug, a shard folder cached without the mirrored latents: its manifest
    says so (`flip`), or (folders without one) a sampled row's entry has none."""
    manifest = read_manifest(store.dir)
    lacking = manifest is not None and not manifest.get("flip")
    if manifest is None:
        lacking = any(not store.has_flipped(r["key"]) for r in _sample_records(index) if r["key"] in store)
    if lacking:
        raise TunelabError(f"data.latents {store.dir} was cached without the mirrored images (`tunelab data cache` "
                           "without --flip), which data.flip_aug needs: " + flip_fix(index.path))


def _unknown_layout(root: Path, kohya: KohyaNpzLatents, record: dict | None) -> str:
    """Why a folder is neither layout, with what was looked for."""
    some = next(islice(root.rglob("*.npz"), 1), None)
    if some is None:
        what = "is empty" if next(root.iterdir(), None) is None else "holds no latent caches"
        return f"{root} {what}: {_EXPECTED}"
    if some.name.endswith(KOHYA_SD_SUFFIX):
        return (f"{root} holds kohya latents for SD 1.x/2.x ({some.name}: `{KOHYA_SD_SUFFIX}`), made with another VAE; "
                f"SDXL needs `{KOHYA_SDXL_SUFFIX}` caches (sd-scripts' sdxl_train.py --cache_latents_to_disk) or "
                "`tunelab data cache`")
    if record is None:
        return f"{root}: the index has no training rows to look its .npz files up for"
    tried = ", ".join(str(p) for p in kohya.candidates(record["key"], record)[:4])
    return (f"{root} holds .npz files (e.g. {some.relative_to(root)}) but none named like the index's images: for "
            f"{record['key']!r} it looked for {tried}; point data.latents at the folder they were cached in")


# --- building ---------------------------------------------------------------------------------


@dataclass
class CacheSummary:
    encoded: int = 0
    skipped_done: int = 0
    rejected: int = 0
    shards_written: list[str] = field(default_factory=list)


def _todo_batches(
    index_path: Path, done: pa.Array, skip: pa.Array, rank: int, world_size: int, batch_size: int
) -> Iterator[list[dict]]:
    """This rank's rows not yet cached, streamed per row group, in same-bucket batches."""
    pf = pq.ParquetFile(index_path, memory_map=True)
    start = 0
    for g in range(pf.metadata.num_row_groups):
        table = pf.read_row_group(g, columns=_COLUMNS)
        rows = np.arange(start, start + len(table))
        start += len(table)
        mine = pa.array(rows % world_size == rank)
        keep = pc.and_(mine, pc.invert(pc.or_(pc.is_in(table["key"], done), pc.is_in(table["key"], skip))))
        table = table.filter(keep).sort_by([("bucket_width", "ascending"), ("bucket_height", "ascending")])
        recs = table.to_pylist()
        batch: list[dict] = []
        for rec in recs:
            if batch and (rec["bucket_width"], rec["bucket_height"]) != (batch[0]["bucket_width"], batch[0]["bucket_height"]):
                yield batch
                batch = []
            batch.append(rec)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def _decode_batch(pool: ThreadPoolExecutor, batch: list[dict], footer: dict) -> list:
    """Decode a batch in the pool, by the index's resize rule and EXIF choice (its footer)."""
    buckets = BucketConfig(**footer["bucket_config"]) if footer.get("bucket_config") else None
    exif = footer.get("exif_transpose", True)

    def one(rec: dict) -> tuple[dict, object]:
        ref = ImageRef(rec["path"], rec["offset"], rec["size"])
        try:
            return rec, load_into_bucket(ref, (rec["bucket_width"], rec["bucket_height"]), buckets=buckets,
                                         exif_transpose=exif)
        except ImageRejected as rej:
            return rec, rej

    return [pool.submit(one, rec) for rec in batch]


POSTERIORS = ("mean", "sample")


def posterior_noise(key: str, shape: tuple[int, ...]):
    """The N(0, 1) noise of one image's posterior sample: seeded by its key (the same on any rank,
    in any order, on a repair)."""
    import torch

    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def encode_pixels(vae: "torch.nn.Module", pixels: list[np.ndarray], device: str = "cpu", posterior: str = "mean",
                  keys: list[str] | None = None) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 4, H/8, W/8) fp16 latents: the posterior's mean, or a sample
    mean + std x noise(key) (`posterior_noise`)."""
    import torch

    dtype = next(vae.parameters()).dtype
    x = torch.from_numpy(np.stack(pixels)).to(device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0  # (B, 3, H, W)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        latents = dist.mean
        if posterior == "sample":
            if keys is None or len(keys) != len(pixels):
                raise ValueError("posterior='sample' needs one key per image (the noise is seeded by it)")
            noise = torch.stack([posterior_noise(k, tuple(latents.shape[1:])) for k in keys]).to(latents.device)
            latents = dist.mean + dist.std * noise.to(dist.mean.dtype)
        elif posterior != "mean":
            raise TunelabError(f"posterior {posterior!r}: choose one of {', '.join(POSTERIORS)}")
    return latents.float().cpu().numpy().astype(np.float16)


def _done_keys(cache_dir: Path) -> pa.Array:
    return pa.array(LatentStore(cache_dir).keys(), pa.string())


def cache_latents(
    index_path: str | Path,
    cache_dir: str | Path,
    vae: "torch.nn.Module",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 4,
    shard_size: int = 1024,
    workers: int = 4,
    device: str = "cpu",
    progress: bool = True,
    posterior: str | None = None,
    flip: bool | None = None,
) -> CacheSummary:
    """Encode every index row this rank owns and no complete shard holds yet. `posterior`: mean or
    sample (None: what the folder was cached with, else mean); `flip`: also the mirrored images'
    latents, for data.flip_aug (None: what the folder was cached with, else not)."""
    index_path, cache_dir = Path(index_path), Path(cache_dir)
    footer = read_footer(index_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    posterior, flip = _claim(cache_dir, index_path, footer, rank, posterior, flip)
    rejects_path = cache_dir / f"rejects-r{rank:03d}.jsonl"
    skip = pa.array([r["key"] for p in cache_dir.glob("rejects-r*.jsonl") for r in read_rejects(p)], pa.string())
    done = _done_keys(cache_dir)
    summary = CacheSummary(skipped_done=len(done))
    total = -(-footer["rows"] // world_size)
    bar = tqdm(total=total, initial=min(total, len(done) // world_size), desc=f"caching (rank {rank})",
               unit=" img", disable=not progress)
    pending: dict[str, tuple[np.ndarray, dict]] = {}
    mirrored: dict[str, np.ndarray] | None = {} if flip else None  # key -> the mirrored image's latents
    with RejectsLog(rejects_path) as rejects, ThreadPoolExecutor(workers) as pool:
        try:
            batches = _todo_batches(index_path, done, skip, rank, world_size, batch_size)
            ahead = _decode_batch(pool, next(batches, []), footer)
            while ahead:
                current = [f.result() for f in ahead]
                ahead = _decode_batch(pool, next(batches, []), footer)  # decode the next batch while encoding this one
                _encode_into(vae, current, pending, rejects, device, summary, posterior, mirrored)
                bar.update(len(current))
                if len(pending) >= shard_size:
                    summary.shards_written.append(_write_shard(cache_dir, rank, pending, flipped=mirrored).name)
                    pending, mirrored = {}, ({} if flip else None)
        finally:
            if pending:  # a normal end or an exception: keep what was encoded
                summary.shards_written.append(_write_shard(cache_dir, rank, pending, flipped=mirrored).name)
            bar.close()
    summary.rejected = rejects.count
    log.info("rank %d: encoded %d, already cached %d, rejected %d, %d new shards",
             rank, summary.encoded, summary.skipped_done, summary.rejected, len(summary.shards_written))
    return summary


def _encode_into(vae, current: list, pending: dict, rejects: RejectsLog, device: str, summary: CacheSummary,
                 posterior: str = "mean", mirrored: dict | None = None) -> None:
    """Encode one decoded batch into `pending`; with `mirrored` (flip), the mirrored pixels too (a
    posterior sample of them is seeded by KEY#flipped: its own draw, as kohya encodes them anew)."""
    good = []
    for rec, result in current:
        if isinstance(result, ImageRejected):
            rejects.add(rec["key"], rec["path"], result.reason)
        else:
            good.append((rec, result))
    if not good:
        return
    latents = encode_pixels(vae, [pixels for _, (pixels, _, _) in good], device, posterior,
                            [rec["key"] for rec, _ in good])  # (B, 4, h, w)
    for (rec, (_, size, _crop)), lat in zip(good, latents):
        crop = kohya_crop_ltrb((rec["bucket_width"], rec["bucket_height"]), size)  # the shards' convention (module doc)
        pending[rec["key"]] = (np.ascontiguousarray(lat), {"original_size": list(size), "crop_ltrb": list(crop)})
    if mirrored is not None:  # (H, W, 3): axis 1 is left-right
        flipped = encode_pixels(vae, [pixels[:, ::-1] for _, (pixels, _, _) in good], device, posterior,
                                [rec["key"] + FLIPPED_SUFFIX for rec, _ in good])
        for (rec, _), lat in zip(good, flipped):
            mirrored[rec["key"]] = np.ascontiguousarray(lat)
    summary.encoded += len(good)


# --- verify / repair --------------------------------------------------------------------------


@dataclass
class VerifyReport:
    shards: int = 0
    entries_ok: int = 0
    bad_shards: list[str] = field(default_factory=list)  # unreadable: truncated header/data, not safetensors
    corrupt: dict[str, list[str]] = field(default_factory=dict)  # shard -> keys whose checksum fails
    missing: list[str] = field(default_factory=list)  # index keys in no shard (rejected images excluded)
    duplicates: list[str] = field(default_factory=list)  # keys held by more than one shard

    @property
    def ok(self) -> bool:
        return not (self.bad_shards or self.corrupt or self.missing)

    def text(self) -> str:
        n_corrupt = sum(len(v) for v in self.corrupt.values())
        lines = [f"{self.shards} shards, {self.entries_ok:,} good entries, {n_corrupt} corrupt, "
                 f"{len(self.missing):,} missing, {len(self.bad_shards)} unreadable shards"]
        lines += [f"  unreadable: {s}" for s in self.bad_shards]
        lines += [f"  corrupt in {s}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}" for s, keys in self.corrupt.items()]
        if self.missing:
            lines.append(f"  missing e.g.: {', '.join(self.missing[:5])}")
        return "\n".join(lines)


def _check_shard(path: Path) -> tuple[list[str], list[str]]:
    """(good keys, corrupt keys) of a shard, the mirrored latents checked too; raises if the file
    itself is unreadable."""
    table = shard_entries(path)
    good, bad = [], []
    with safe_open(str(path), framework="np") as f:
        for key, info in table.items():
            try:
                ok = checksum(f.get_tensor(key)) == info["checksum"]
                if ok and "flipped_checksum" in info:
                    ok = checksum(f.get_tensor(key + FLIPPED_SUFFIX)) == info["flipped_checksum"]
            except Exception:  # noqa: BLE001 - a tensor that cannot be read is corrupt
                ok = False
            (good if ok else bad).append(key)
    return good, bad


def verify_cache(index_path: str | Path, cache_dir: str | Path, progress: bool = True) -> VerifyReport:
    """Check every entry's checksum and that every index key (not rejected) has latents."""
    cache_dir = Path(cache_dir)
    report = VerifyReport()
    seen: set[str] = set()
    shards = sorted(cache_dir.glob(SHARD_GLOB))
    for shard in tqdm(shards, desc="verifying", unit=" shard", disable=not progress):
        report.shards += 1
        try:
            good, bad = _check_shard(shard)
        except Exception as exc:  # noqa: BLE001 - any failure to parse is an unreadable shard
            log.debug("unreadable shard %s: %s", shard, exc)
            report.bad_shards.append(shard.name)
            continue
        report.entries_ok += len(good)
        report.duplicates += [k for k in good if k in seen]
        seen.update(good)
        if bad:
            report.corrupt[shard.name] = bad
    rejected = {r["key"] for p in cache_dir.glob("rejects-r*.jsonl") for r in read_rejects(p)}
    keys = pq.read_table(index_path, columns=["key"], memory_map=True)["key"]
    have = pa.array(sorted(seen | rejected), pa.string())
    report.missing = keys.filter(pc.invert(pc.is_in(keys, have))).to_pylist()
    return report


def repair_cache(
    index_path: str | Path, cache_dir: str | Path, vae: "torch.nn.Module", report: VerifyReport | None = None, **cache_kw
) -> VerifyReport:
    """Drop corrupt entries and unreadable shards, re-encode what they held and anything missing."""
    cache_dir = Path(cache_dir)
    report = report or verify_cache(index_path, cache_dir, progress=False)
    for name in report.bad_shards:
        os.replace(cache_dir / name, cache_dir / f"{name}.bad")  # kept aside for inspection, never read
        log.warning("moved unreadable shard %s aside (%s.bad)", name, name)
    for name, bad in report.corrupt.items():
        _rewrite_without(cache_dir / name, set(bad))
    cache_latents(index_path, cache_dir, vae, **cache_kw)  # resume = encode everything not in a good shard
    return verify_cache(index_path, cache_dir, progress=False)


def _rewrite_without(path: Path, drop: set[str]) -> None:
    table, convention = shard_header(path)
    keep = {k: v for k, v in table.items() if k not in drop}
    with safe_open(str(path), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in keep}
        tensors |= {k + FLIPPED_SUFFIX: f.get_tensor(k + FLIPPED_SUFFIX) for k, v in keep.items() if "flipped_checksum" in v}
    if tensors:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(keep), CROP_META_KEY: convention})  # kept as it was
        os.replace(tmp, path)
    else:
        path.unlink()
    log.warning("removed %d corrupt entries from %s", len(drop), path.name)
