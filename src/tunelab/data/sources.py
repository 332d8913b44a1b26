"""Readers for the four kinds of dataset source; each yields Arrow record batches of `RAW_SCHEMA`.

- `folder`: images anywhere under a directory, tags in `name.txt`, caption in `name.caption`
  (kohya's layout); a directory whose sub-folders are named `N_concept` is kohya's DreamBooth
  layout instead: the images directly inside `N_concept/` count N times per epoch (see
  `kohya_repeats`);
- `kohya`: a kohya metadata JSON `{key: {"tags", "caption", "train_resolution"}}`, streamed;
- `table`: a Parquet or CSV table (id -> tags, optional caption, optional width/height) with a
  path template (`{id}.webp`) or a tar shard rule (`{id % 1000:04d}.tar`);
- `tar`: tar shards read in place (webdataset layout: `x.webp`, `x.txt`, `x.caption`).

Hand-written because no library reads these layouts into one table. Pyarrow does the heavy
lifting for tables (streaming batches, vectorised template evaluation, joins); the JSON reader
is a small incremental parser over `json.JSONDecoder.raw_decode`, because the stdlib cannot
stream and metadata files reach 14 GB. Image sizes come from headers (threaded: it is I/O).
Unusable rows go to the rejects log via `reject(key, path, reason)`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tunelab.data.images import IMAGE_EXTENSIONS, ImageRef, ImageRejected, probe_header
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),
        ("offset", pa.int64()),  # tar members: byte offset of the data; null for plain files
        ("size", pa.int64()),  # tar members: byte length; null for plain files
        ("width", pa.int32()),  # as displayed (EXIF orientation applied)
        ("height", pa.int32()),
        ("tags", pa.string()),
        ("caption", pa.string()),
        ("repeats", pa.int32()),  # times the image counts per epoch (kohya folder repeats); null = 1
        ("turned", pa.bool_()),  # EXIF orientation swapped width and height; null: sizes given by a table
    ]
)
Reject = Callable[[str, str, str], None]
_CHUNK = 4096  # rows per batch for the per-file sources
_TAR_HEAD = 256 * 1024  # bytes of a tar member read to parse its header
_KINDS = ("folder", "kohya", "table", "tar")


@dataclass
class SourceSpec:
    """One source: `KIND:PATH[,option=value,...]`, e.g. `table:tags.parquet,template={id}.webp`."""

    kind: str
    path: str
    prefix: str = ""
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "SourceSpec":
        kind, sep, rest = text.partition(":")
        if not sep or kind not in _KINDS:
            raise TunelabError(
                f"source {text!r}: start it with one of {', '.join(k + ':' for k in _KINDS)} "
                "e.g. `folder:./images` or `table:tags.parquet,template={id}.webp,root=./images`"
            )
        parts = _split_options(rest)
        options = {}
        for part in parts[1:]:
            name, eq, value = part.partition("=")
            if not eq:
                raise TunelabError(f"source {text!r}: option {part!r} must look like name=value")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            options[name.strip()] = value
        prefix = options.pop("prefix", "")
        return cls(kind, parts[0], prefix, options)

    @property
    def name(self) -> str:
        return self.prefix.rstrip("/") or f"{self.kind}:{Path(self.path).name}"

    def option(self, name: str, default: str | None = None) -> str | None:
        return self.options.get(name, default)


def _split_options(text: str) -> list[str]:
    """Split on commas outside {...} and "...": templates like {id % 1000:04d} and quoted values
    such as class_tokens="astolfo, solo" stay whole."""
    parts, cur, depth, quoted = [], [], 0, False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "{":
            depth += 1
        elif not quoted and ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0 and not quoted:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def read_source(
    spec: SourceSpec, reject: Reject, workers: int = 8, folder_repeats: bool = True
) -> Iterator[pa.RecordBatch]:
    """Dispatch to the reader for `spec.kind`; every batch has `RAW_SCHEMA`.

    `folder_repeats=False` reads a kohya `N_concept` folder layout as a plain folder (every image
    below it, once)."""
    if not os.path.exists(spec.path):
        raise TunelabError(f"source {spec.kind}:{spec.path}: path not found")
    readers = {"folder": _read_folder, "kohya": _read_kohya, "table": _read_table, "tar": _read_tar}
    unknown = set(spec.options) - _ALLOWED_OPTIONS[spec.kind]
    if unknown:
        raise TunelabError(
            f"source {spec.kind}:{spec.path}: unknown option(s) {sorted(unknown)}; "
            f"allowed: prefix, {', '.join(sorted(_ALLOWED_OPTIONS[spec.kind]))}"
        )
    if spec.kind == "folder":
        yield from _read_folder(spec, reject, workers, folder_repeats)
        return
    yield from readers[spec.kind](spec, reject, workers)


_ALLOWED_OPTIONS = {
    "folder": {"repeats", "class_tokens"},
    "kohya": {"images", "repeats"},
    "table": {"template", "tar", "member", "root", "id", "tags", "caption", "width", "height"},
    "tar": set(),
}


# --- per-file sources ---------------------------------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip() or None
    except FileNotFoundError:
        return None


def _rows_to_batch(rows: list[dict]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=RAW_SCHEMA)


def _sized_rows(rows: list[dict], reject: Reject, pool: ThreadPoolExecutor) -> list[dict]:
    """Fill width/height from image headers (threaded); rejected rows are dropped."""

    def probe(row: dict) -> dict | None:
        ref = ImageRef(row["path"], row["offset"], row["size"])
        try:
            try:
                head = ImageRef(row["path"], row["offset"], min(row["size"], _TAR_HEAD)) if row["offset"] is not None else ref
                row["width"], row["height"], row["turned"] = probe_header(head)
            except ImageRejected:
                if head is ref:
                    raise
                row["width"], row["height"], row["turned"] = probe_header(ref)  # header beyond the first bytes
            return row
        except ImageRejected as rej:
            reject(row["key"], row["path"], rej.reason)
            return None

    return [r for r in pool.map(probe, rows) if r is not None]


def _batched(rows: Iterator[dict], reject: Reject, workers: int) -> Iterator[pa.RecordBatch]:
    with ThreadPoolExecutor(workers) as pool:
        chunk: list[dict] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= _CHUNK:
                yield _rows_to_batch(_sized_rows(chunk, reject, pool))
                chunk = []
        if chunk:
            yield _rows_to_batch(_sized_rows(chunk, reject, pool))


def _walk_images(root: Path) -> Iterator[Path]:
    """Image files under `root`, recursively, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield Path(dirpath) / name


def kohya_repeats(name: str) -> tuple[int, str] | None:
    """kohya's folder name `N_concept` read as (N, "concept"); None when the name has no count.

    sd-scripts' rule (library/config_util.py, `generate_dreambooth_subsets_config_by_subdirs` ->
    `extract_dreambooth_params`): split the name at "_", read the first part with `int()` (so
    `10_a_b` -> (10, "a_b"), `10` -> (10, ""), `0_x` -> (0, "x"), `photos` -> None). A count < 1
    means kohya skips the folder.
    """
    tokens = name.split("_")
    try:
        return int(tokens[0]), "_".join(tokens[1:])
    except ValueError:
        return None


_HUGE_REPEATS = 1000  # a "count" this large is more likely a year (2019_summer) than a repeat count


@dataclass
class _KohyaLayout:
    """The immediate sub-folders of a source directory, in kohya's DreamBooth convention."""

    used: list[tuple[Path, int, str]]  # (folder, repeats >= 1, class tokens)
    skipped: list[str]  # folder names without a count, or with a count < 1


def _kohya_layout(root: Path) -> _KohyaLayout | None:
    """kohya's layout when at least one immediate sub-folder is named `N_concept`, else None."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    parsed = [(d, kohya_repeats(d.name)) for d in subdirs]
    if not any(r is not None for _, r in parsed):
        return None
    used = [(d, r[0], r[1]) for d, r in parsed if r is not None and r[0] >= 1]
    skipped = [d.name for d, r in parsed if r is None or r[0] < 1]
    return _KohyaLayout(used, skipped)


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (kohya's `glob_images(dir, "*")`: not recursive)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))


def _folder_row(root: Path, img: Path, repeats: int | None = None, class_tokens: str = "") -> dict:
    stem = img.with_suffix("")
    tags, caption = _read_text(stem.with_suffix(".txt")), _read_text(stem.with_suffix(".caption"))
    if tags is None and caption is None and class_tokens:
        tags = class_tokens  # kohya: no caption file -> the folder's class tokens ("10_sks dog" -> "sks dog")
    return {"key": stem.relative_to(root).as_posix(), "path": str(img), "offset": None, "size": None,
            "tags": tags, "caption": caption, "repeats": repeats}


def source_repeats(spec: SourceSpec) -> int | None:
    """The `repeats=N` option (a kohya dataset TOML subset's `num_repeats`), or None."""
    text = spec.option("repeats")
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise TunelabError(f"source {spec.kind}:{spec.path}: repeats={text!r} must be a whole number >= 1")
    return int(text)


def _read_folder(spec: SourceSpec, reject: Reject, workers: int, folder_repeats: bool = True) -> Iterator[pa.RecordBatch]:
    root = Path(spec.path)
    subset_repeats = source_repeats(spec)
    layout = _kohya_layout(root) if folder_repeats and subset_repeats is None and root.is_dir() else None

    def rows() -> Iterator[dict]:
        if subset_repeats is not None:  # a kohya subset: the images directly in image_dir, each N times
            for img in _images_in(root):
                yield _folder_row(root, img, subset_repeats, spec.option("class_tokens", ""))
            return
        if layout is None:
            for img in _walk_images(root):
                yield _folder_row(root, img)
            return
        counts = []
        for folder, repeats, class_tokens in layout.used:
            images = _images_in(folder)
            counts.append(f"{folder.name} x{repeats} ({len(images):,} images)")
            for img in images:
                yield _folder_row(root, img, repeats, class_tokens)
        _report_kohya_layout(root, layout, counts)

    yield from _batched(rows(), reject, workers)


def _report_kohya_layout(root: Path, layout: _KohyaLayout, counts: list[str]) -> None:
    """Say what kohya's convention made of the folder, and every image it leaves out (as kohya does)."""
    log.info("folder:%s is kohya's N_concept layout; repeats per epoch: %s", root, ", ".join(counts) or "none")
    loose = len(_images_in(root))
    nested = sum(1 for folder, _, _ in layout.used for sub in folder.iterdir() if sub.is_dir() for _ in _walk_images(sub))
    unused = sum(1 for name in layout.skipped for _ in _walk_images(root / name))
    left_out = [f"{unused:,} image(s) in folders without a repeat count ({', '.join(layout.skipped[:5])}"
                f"{', ...' if len(layout.skipped) > 5 else ''})" if layout.skipped else "",
                f"{loose:,} image(s) directly in {root.name}/" if loose else "",
                f"{nested:,} image(s) in folders below an N_concept folder" if nested else ""]
    left_out = [part for part in left_out if part]
    if left_out:
        log.warning("folder:%s: not indexed, as in kohya's sd-scripts: %s; index with --no-repeats to read every "
                    "image below %s once", root, "; ".join(left_out), root)
    for folder, repeats, _ in layout.used:
        if repeats >= _HUGE_REPEATS:
            log.warning("folder:%s: %s counts %s times per epoch; if that number is not a repeat count, "
                        "index with --no-repeats", root, folder.name, f"{repeats:,}")


def iter_json_object(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, object]]:
    """(key, value) pairs of a top-level JSON object, reading `chunk_chars` at a time.

    Memory stays at about one chunk plus the largest value, whatever the file size.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            more = f.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            return not eof

        def skip(chars: str) -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    if buf[pos] not in chars:
                        raise TunelabError(f"{path}: expected one of {chars!r} at char ~{f.tell()}; is it a JSON object?")
                    pos += 1
                    return buf[pos - 1]
                if not fill():
                    raise TunelabError(f"{path}: the JSON ends early (truncated file?)")

        def value() -> object:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":  # raw_decode wants no leading blanks
                    pos += 1
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a number at the buffer end might continue
                        pos = end
                        return obj
                except json.JSONDecodeError:
                    if eof:
                        raise TunelabError(f"{path}: invalid JSON near char ~{f.tell()}") from None
                fill()

        skip("{")
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos >= len(buf) and fill():
                continue
            if buf[pos:pos + 1] == "}":
                return
            key = value()
            skip(":")
            yield str(key), value()
            if skip(",}") == "}":
                return


def _image_lookup(root: Path) -> dict[str, str]:
    """Key (relative path without extension, and bare file stem) -> image path, for kohya JSON."""
    lookup: dict[str, str] = {}
    for img in _walk_images(root):
        rel = img.with_suffix("").relative_to(root).as_posix()
        lookup.setdefault(rel, str(img))
        lookup.setdefault(img.stem, str(img))
    return lookup


def _join_tags(tags: object) -> str | None:
    if isinstance(tags, list):
        return ", ".join(str(t) for t in tags) or None
    return str(tags).strip() or None if tags is not None else None


def _read_kohya(spec: SourceSpec, reject: Reject, workers: int) -> Iterator[pa.RecordBatch]:
    """kohya metadata: keys are image paths without extension (absolute, or under `images=`)."""
    images = Path(spec.option("images") or Path(spec.path).parent)
    lookup = _image_lookup(images) if images.is_dir() else {}
    repeats = source_repeats(spec)

    def rows() -> Iterator[dict]:
        for key, meta in iter_json_object(spec.path):
            meta = meta if isinstance(meta, dict) else {}
            path = lookup.get(key) or lookup.get(Path(key).name)
            if path is None and os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS and os.path.exists(key):
                path = key
            if path is None:
                reject(key, str(images / key), "missing file (no image for this metadata key)")
                continue
            caption = meta.get("caption")
            yield {
                "key": Path(key).as_posix().lstrip("/"),
                "path": path,
                "offset": None,
                "size": None,
                "tags": _join_tags(meta.get("tags")),
                "caption": str(caption).strip() or None if caption is not None else None,
                "repeats": repeats,
            }

    yield from _batched(rows(), reject, workers)


# --- tar shards ---------------------------------------------------------------------------------


def _tar_members(tar_path: Path) -> Iterator[tuple[str, tarfile.TarInfo, tarfile.TarFile]]:
    """(member stem, info, open tarfile) for regular members, reading headers in place."""
    with tarfile.open(tar_path, mode="r:") as tf:
        for info in tf:
            if info.isfile():
                stem, _ = os.path.splitext(info.name)
                yield stem, info, tf


def _read_tar(spec: SourceSpec, reject: Reject, workers: int) -> Iterator[pa.RecordBatch]:
    root = Path(spec.path)
    shards = [root] if root.is_file() else sorted(root.rglob("*.tar"))
    if not shards:
        raise TunelabError(f"source tar:{spec.path}: no .tar files found there")

    def rows() -> Iterator[dict]:
        for shard in shards:
            groups: dict[str, dict] = {}
            for stem, info, tf in _tar_members(shard):
                row = groups.setdefault(stem, {"key": stem, "path": str(shard), "offset": None, "size": None})
                ext = os.path.splitext(info.name)[1].lower()
                if ext in IMAGE_EXTENSIONS:
                    row["offset"], row["size"] = info.offset_data, info.size
                elif ext in (".txt", ".caption"):
                    text = tf.extractfile(info).read().decode("utf-8", errors="replace").strip()
                    row["tags" if ext == ".txt" else "caption"] = text or None
            for stem, row in groups.items():
                if row["offset"] is None:
                    reject(stem, str(shard), "missing file (text without an image in the shard)")
                    continue
                yield {"tags": None, "caption": None, **row}

    yield from _batched(rows(), reject, workers)


# --- tables -------------------------------------------------------------------------------------


def _iter_table(path: str, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    if path.lower().endswith((".csv", ".csv.gz", ".tsv")):
        opts = pacsv.ParseOptions(delimiter="\t" if path.lower().endswith(".tsv") else ",", newlines_in_values=True)
        conv = pacsv.ConvertOptions(include_columns=columns, strings_can_be_null=True)
        reader = pacsv.open_csv(path, parse_options=opts, convert_options=conv,
                                read_options=pacsv.ReadOptions(block_size=1 << 24))
        yield from reader
        return
    # Buffered reads, not a memory map: mapped pages of a multi-GB input would all count as RSS.
    pf = pq.ParquetFile(path, memory_map=False, buffer_size=1 << 22)
    yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


def _table_columns(spec: SourceSpec) -> dict[str, str | None]:
    """Our role -> the table's column name (None if the table has no such column)."""
    path = spec.path
    if path.lower().endswith((".csv", ".csv.gz", ".tsv")):
        first = next(_iter_table_header(path))
        names = set(first)
    else:
        names = set(pq.ParquetFile(path).schema_arrow.names)
    roles = {"id": "id", "tags": "tags", "caption": "caption", "width": "width", "height": "height"}
    cols = {role: spec.option(role, default) for role, default in roles.items()}
    for role in ("id", "tags"):
        if cols[role] not in names:
            raise TunelabError(
                f"source table:{path}: no column {cols[role]!r} for {role}; name it with `{role}=COLUMN` "
                f"(columns: {', '.join(sorted(names))})"
            )
    return {role: (c if c in names else None) for role, c in cols.items()}


def _iter_table_header(path: str) -> Iterator[list[str]]:
    sep = "\t" if path.lower().endswith(".tsv") else ","
    reader = pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True))
    yield reader.schema.names


def _as_text(col: pa.Array) -> pa.Array:
    """Tags may be stored as a list of strings; the index stores one comma-separated string."""
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return pc.binary_join(col.cast(pa.list_(pa.string())), ", ")
    return col.cast(pa.string())


_FIELD = re.compile(r"^\s*(\w+)\s*(?:(%|//)\s*(\d+))?\s*$")
_SPEC = re.compile(r"^(0?)(\d*)d?$")


def eval_template(template: str, ids: pa.Array) -> pa.Array:
    """Evaluate a path template such as `{id}.webp` or `{id % 1000:04d}.tar` for a whole column.

    Fields: `{id}`, `{id % N}`, `{id // N}`, with an optional zero-padded width (`:04d`).
    Vectorised with pyarrow compute: no per-row Python.
    """
    parts: list[pa.Array | str] = []
    for literal, field_name, spec, _ in string.Formatter().parse(template):
        if literal:
            parts.append(literal)
        if field_name is None:
            continue
        fm, sm = _FIELD.match(field_name), _SPEC.match(spec or "")
        if fm is None or fm.group(1) != "id" or sm is None:
            raise TunelabError(
                f"template {template!r}: field {{{field_name}:{spec}}} not understood; use {{id}}, "
                "{id % 1000}, {id // 1000}, optionally with a width like {id % 1000:04d}"
            )
        values = ids
        if fm.group(2):
            n = pa.scalar(int(fm.group(3)), pa.int64())
            as_int = ids.cast(pa.int64())
            values = pc.subtract(as_int, pc.multiply(pc.divide(as_int, n), n)) if fm.group(2) == "%" else pc.divide(as_int, n)
        text = values.cast(pa.string())
        if sm.group(2):
            text = pc.utf8_lpad(text, int(sm.group(2)), padding="0" if sm.group(1) else " ")
        parts.append(text)
    if all(isinstance(p, str) for p in parts):
        raise TunelabError(f"template {template!r} has no {{id}} field, so every row would get the same file")
    return pc.binary_join_element_wise(*[pa.scalar(p) if isinstance(p, str) else p for p in parts], "")


def _shard_listing(shards: list[str]) -> pa.Table:
    """(path, member stem, offset, size) of image members in the given shards."""
    cols: dict[str, list] = {"path": [], "stem": [], "offset": [], "size": []}
    for shard in shards:
        if not os.path.exists(shard):
            continue
        for stem, info, _ in _tar_members(Path(shard)):
            if os.path.splitext(info.name)[1].lower() in IMAGE_EXTENSIONS:
                for name, v in zip(cols, (shard, stem, info.offset_data, info.size)):
                    cols[name].append(v)
    schema = pa.schema([("path", pa.string()), ("stem", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])
    return pa.Table.from_pydict(cols, schema=schema)


def _locate_in_tars(batch: pa.Table, spec: SourceSpec, listings: dict[str, pa.Table]) -> pa.Table:
    """Join rows to the tar members holding them (shards listed once, on first use)."""
    wanted = [p for p in pc.unique(batch["path"]).to_pylist() if p not in listings]
    for shard in wanted:
        listings[shard] = _shard_listing([shard])
    listing = pa.concat_tables([listings[p] for p in pc.unique(batch["path"]).to_pylist()])
    member = eval_template(spec.option("member", "{id}"), batch["id"])
    batch = batch.append_column("stem", member).append_column("row", pa.array(range(len(batch)), pa.int64()))
    joined = batch.drop_columns(["offset", "size"]).join(listing, ["path", "stem"], join_type="left outer")
    return joined.sort_by("row").drop_columns(["stem", "row"])


def _read_table(spec: SourceSpec, reject: Reject, workers: int, batch_rows: int = 131072) -> Iterator[pa.RecordBatch]:
    cols = _table_columns(spec)
    if bool(spec.option("template")) == bool(spec.option("tar")):
        raise TunelabError(f"source table:{spec.path}: give exactly one of template=... (files) or tar=... (shards)")
    root = spec.option("root") or str(Path(spec.path).parent)
    listings: dict[str, pa.Table] = {}
    wanted = [c for c in cols.values() if c is not None]
    int_ids: list = []  # integer ids are checked for repeats here, cheaply (see `table_checks_own_keys`)
    with ThreadPoolExecutor(workers) as pool:
        for raw in _iter_table(spec.path, wanted, batch_rows):
            ids = raw.column(cols["id"])
            if pa.types.is_integer(ids.type):
                int_ids.append(ids.to_numpy(zero_copy_only=False))
            rel = eval_template(spec.option("template") or spec.option("tar"), ids)
            n = len(raw)
            out = pa.table({
                "id": ids.cast(pa.string()),
                "key": ids.cast(pa.string()),
                "path": pc.binary_join_element_wise(pa.scalar(root.rstrip("/") + "/"), rel, ""),
                "offset": pa.nulls(n, pa.int64()),
                "size": pa.nulls(n, pa.int64()),
                "width": raw.column(cols["width"]).cast(pa.int32()) if cols["width"] else pa.nulls(n, pa.int32()),
                "height": raw.column(cols["height"]).cast(pa.int32()) if cols["height"] else pa.nulls(n, pa.int32()),
                "tags": _as_text(raw.column(cols["tags"])),
                "caption": _as_text(raw.column(cols["caption"])) if cols["caption"] else pa.nulls(n, pa.string()),
                "repeats": pa.nulls(n, pa.int32()),
                "turned": pa.nulls(n, pa.bool_()),
            })
            if spec.option("tar"):
                out = _locate_in_tars(out, spec, listings)
                out = _drop_unlocated(out, reject)
            out = out.drop_columns(["id"])
            yield from _fill_missing_sizes(out, reject, pool).select(RAW_SCHEMA.names).cast(RAW_SCHEMA).to_batches()
    _check_unique_ids(spec, int_ids)


def table_checks_own_keys(spec: SourceSpec) -> bool:
    """True when the table reader itself refuses repeated keys (integer ids: a fast sort)."""
    if spec.kind != "table" or spec.path.lower().endswith((".csv", ".csv.gz", ".tsv")):
        return False
    return pa.types.is_integer(pq.ParquetFile(spec.path).schema_arrow.field(_table_columns(spec)["id"]).type)


def _check_unique_ids(spec: SourceSpec, int_ids: list) -> None:
    if not int_ids:
        return
    ids = np.sort(np.concatenate(int_ids))  # (N,) int64: ~1 s for 12 M
    dup = ids[1:][ids[1:] == ids[:-1]]
    if dup.size:
        raise TunelabError(
            f"source table:{spec.path}: {dup.size:,} repeated ids (e.g. {int(dup[0])}); each image needs one row"
        )


def _drop_unlocated(table: pa.Table, reject: Reject) -> pa.Table:
    missing = pc.is_null(table["offset"])
    if pc.any(missing).as_py():
        for row in table.filter(missing).select(["key", "path"]).to_pylist():
            reject(row["key"], row["path"], "missing file (not in its tar shard)")
        table = table.filter(pc.invert(missing))
    return table


def _fill_missing_sizes(table: pa.Table, reject: Reject, pool: ThreadPoolExecutor) -> pa.Table:
    """Rows without width/height in the table get them from the image header."""
    unknown = pc.or_(pc.is_null(table["width"]), pc.is_null(table["height"]))
    if not pc.any(unknown).as_py():
        return table
    known = table.filter(pc.invert(unknown))
    probed = _sized_rows(table.filter(unknown).to_pylist(), reject, pool)
    return pa.concat_tables([known, pa.Table.from_pylist(probed, schema=known.schema)]) if probed else known
