"""The safetensors file format at the byte level: a validating header reader and a streaming writer.

Why by hand: `safetensors.torch.save_file` needs every tensor in memory at once (a full SDXL
checkpoint is 6.9 GB in fp16, on top of the model itself), and its loader reports malformed files
with tracebacks. Here the writer lays out the header from shapes alone and then writes tensors one
at a time, into a temporary file renamed into place only when complete; the reader checks every
header field and fails with one line naming what is wrong. Tensor reading itself stays with
`safetensors.safe_open` (memory-mapped).

Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets},
"__metadata__": {str: str}}, then the data buffer; offsets are relative to the buffer start.

The writer can stamp `modelspec.hash_sha256` as the SAI model spec defines it: "0x" + the sha256 of
all tensor content, i.e. of the data buffer, excluding the header (Stability-AI/ModelSpec README,
`hash_sha256`; its `examples/python/example_no_reqs.py` hashes the bytes after the header). The
header is written first with a placeholder of the same length, the buffer is hashed while it is
written, and the placeholder is overwritten before the file is renamed into place: one pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from tunelab import faults
from tunelab.errors import TunelabError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_ST = {dt: name for name, (dt, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # byte offset of the data buffer in the file


def _fail(path: Path, why: str) -> TunelabError:
    return TunelabError(f"{path}: not a valid .safetensors file: {why}")


def read_header(path: str | Path) -> Header:
    """Parse and fully validate a safetensors header without touching tensor data."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"file is {size} bytes, too short to hold the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise _fail(path, f"header length {n} is absurd for a {size}-byte file (truncated or not safetensors?)")
        raw = f.read(n)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"header is not valid JSON ({err})") from None
    except RecursionError:  # e.g. 100,000 nested brackets: no real header nests
        raise _fail(path, "header JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise _fail(path, "header JSON is not an object")
    meta = doc.pop("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    tensors = {name: _tensor_info(path, name, entry) for name, entry in doc.items()}
    _check_layout(path, tensors, size - 8 - n)
    return Header(tensors, meta, 8 + n)


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"entry {name!r} is not an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):  # not bool
        raise _fail(path, f"tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
        raise _fail(path, f"tensor {name!r} has malformed data_offsets {offs!r}")
    info = TensorInfo(dtype, tuple(shape), offs[0], offs[1])
    if info.end - info.begin != info.numel * DTYPES[dtype][1]:
        raise _fail(path, f"tensor {name!r}: {info.end - info.begin} bytes do not hold shape {shape} of {dtype}")
    return info


def _check_layout(path: Path, tensors: dict[str, TensorInfo], buffer_bytes: int) -> None:
    pos = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            raise _fail(path, f"tensor {name!r} starts at byte {info.begin}, expected {pos} (overlap or gap)")
        pos = info.end
    if pos > buffer_bytes:
        raise _fail(path, f"data offsets reach byte {pos} but the file holds {buffer_bytes} data bytes (truncated?)")
    if pos < buffer_bytes:
        raise _fail(path, f"{buffer_bytes - pos} trailing bytes after the last tensor")


# --- writing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


HASH_KEY = "modelspec.hash_sha256"
_HASH_PLACEHOLDER = "0x" + "0" * 64  # as long as the real value: the header keeps its length


def write_streaming(
    path: str | Path,
    specs: Iterable[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
    progress: Callable[[TensorSpec], None] | None = None,
    hash_key: str | None = None,
) -> str | None:
    """Write a safetensors file tensor by tensor; memory holds one tensor at a time.

    The file appears at `path` only when complete (temporary file in the same folder, fsync,
    rename), so a crash never leaves a half-written checkpoint under the final name. With
    `hash_key` (e.g. HASH_KEY) the metadata gets "0x" + sha256 of the data buffer under that key,
    which is also returned.
    """
    path = Path(path)
    specs = sorted(specs, key=lambda s: s.name)
    meta = dict(metadata or {})
    if hash_key:
        meta[hash_key] = _HASH_PLACEHOLDER
    header: dict[str, object] = {"__metadata__": meta}
    pos = 0
    for s in specs:
        nbytes = math.prod(s.shape) * DTYPES[TORCH_TO_ST[s.dtype]][1]
        header[s.name] = {"dtype": TORCH_TO_ST[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data buffer aligned to 8 bytes, as the reference writer does
    where = _placeholder_offset(raw, hash_key) if hash_key else None
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.fchmod(fd, file_mode())  # mkstemp makes 0600; a checkpoint gets what open() would give it
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for s in specs:
                data = _tensor_bytes(s, produce(s))
                f.write(data)
                digest.update(data)
                faults.point("checkpoint.write")  # the n-th tensor written
                if progress:
                    progress(s)
            value = _stamp_and_sync(f, digest, where)
        faults.point("checkpoint.rename")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return value if hash_key else None


def _stamp_and_sync(f, digest, where: int | None) -> str:
    """Write the data's hash over the header's placeholder (at `where` in the header JSON, if
    any), then flush and fsync: the file is complete and ready to be renamed into place."""
    value = "0x" + digest.hexdigest()
    if where is not None:
        f.seek(8 + where)
        f.write(value.encode())
    f.flush()
    os.fsync(f.fileno())
    return value


def _placeholder_offset(raw: bytes, key: str) -> int:
    """Byte offset of the placeholder value in the header JSON (keys are unique and quotes inside
    values are escaped, so the pattern occurs once)."""
    pattern = (json.dumps(key) + ":" + json.dumps(_HASH_PLACEHOLDER)).encode()
    return raw.index(pattern) + len(pattern) - len(_HASH_PLACEHOLDER) - 1


def rewrite_metadata(src: str | Path, dst: str | Path, metadata: dict[str, str], hash_key: str | None = None,
                     block: int = 1 << 24) -> str | None:
    """Copy a safetensors file with a new `__metadata__` (the tensors' bytes copied as they are,
    in blocks), atomically like `write_streaming`; with `hash_key` the data's modelspec hash is
    stamped too (and returned). For files another writer made (sd-mecha's merges)."""
    header = read_header(src)
    dst = Path(dst)
    meta = dict(metadata)
    if hash_key:
        meta[hash_key] = _HASH_PLACEHOLDER
    doc: dict[str, object] = {"__metadata__": meta}
    for name, info in header.tensors.items():
        doc[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [info.begin, info.end]}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    where = _placeholder_offset(raw, hash_key) if hash_key else None
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    os.fchmod(fd, file_mode())
    try:
        with os.fdopen(fd, "wb") as f, Path(src).open("rb") as g:
            f.write(struct.pack("<Q", len(raw)) + raw)
            g.seek(header.data_start)
            for chunk in iter(lambda: g.read(block), b""):
                f.write(chunk)
                digest.update(chunk)
            value = _stamp_and_sync(f, digest, where)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return value if hash_key else None


def data_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """ "0x" + sha256 of a safetensors file's data buffer (everything after the header): the
    modelspec `hash_sha256` of the file, whatever its metadata says. Streams; reads the whole file."""
    header = read_header(path)
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        f.seek(header.data_start)
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return "0x" + digest.hexdigest()


def read_small_tensor(path: str | Path, header: Header, name: str, max_bytes: int = 1024) -> torch.Tensor:
    """One small tensor (a marker scalar) read from the file's bytes by its header entry, without
    memory-mapping the file: header-only tools stay header-only plus a few bytes."""
    info = header.tensors[name]
    if info.end - info.begin > max_bytes:
        raise TunelabError(f"{path}: tensor {name!r} holds {info.end - info.begin} bytes; expected a small marker")
    with Path(path).open("rb") as f:
        f.seek(header.data_start + info.begin)
        data = f.read(info.end - info.begin)
    dtype = DTYPES[info.dtype][0]
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(info.shape) if data else torch.zeros(info.shape, dtype=dtype)


def file_mode() -> int:
    """The permission bits a new file gets from open() under the current umask (0644 under 022),
    so that a UI running as another user can read what tunelab writes."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _tensor_bytes(spec: TensorSpec, t: torch.Tensor) -> bytes | memoryview:
    if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
        raise ValueError(f"{spec.name}: produced {tuple(t.shape)} {t.dtype}, header says {spec.shape} {spec.dtype}")
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    # A flat byte view of the tensor's storage (little-endian on every platform torch supports).
    return memoryview(t.view(-1).view(torch.uint8).numpy())
