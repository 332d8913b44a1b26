"""The dataset index: one Parquet row per image, built by streaming every source.

Columns: key, source, path, offset, size (tar members), width, height (as displayed; as stored in
the header with `exif_transpose = False`, kohya's way), tags, caption, bucket (id into the bucket
set), bucket_width, bucket_height, split (train/holdout), repeats (times the row counts per epoch:
kohya's `N_concept` folder repeats, else 1; indexes built before the column existed read as 1).
The footer's key-value metadata `tunelab.index` holds the bucket config, the bucket set, the
histogram, the mean aspect error, the counts, and `exif_transpose` with `exif_turned` (how many
images EXIF orientation turns, applied or not; indexes from before them read as applied);
`<index>.buckets.txt` is the readable histogram; `<index>.rejects.jsonl` lists images that could
not be used.

Hand-written glue around pyarrow: sources arrive as record batches, each batch gets its key prefix,
bucket (numpy, vectorised), tag filter and seeded split (vectorised key hash), and is written at
once with `ParquetWriter` — memory stays at a few batches whatever the row count. The file is
written to a temporary name and renamed when complete, so a killed run never leaves a half index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from tunelab.data.buckets import BucketAssigner, BucketConfig, aspect_errors, histogram_text
from tunelab.data.images import RejectsLog
from tunelab.data.sources import Reject, SourceSpec, read_source, table_checks_own_keys
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("tags", pa.string()),
        ("caption", pa.string()),
        ("bucket", pa.int16()),
        ("bucket_width", pa.int16()),
        ("bucket_height", pa.int16()),
        ("split", pa.string()),
        ("repeats", pa.int32()),
    ]
)
META_KEY = b"tunelab.index"
FORMAT_VERSION = 1


@dataclass
class IndexOptions:
    """What `build_index` does besides reading sources."""

    buckets: BucketConfig = field(default_factory=BucketConfig)
    where_tags: Sequence[str] = ()  # keep only rows having all these tags (underscore = space)
    holdout: float = 0.0  # fraction of rows put in the "holdout" split, chosen by key hash
    seed: int = 0  # seed of that choice
    workers: int = 8  # threads reading image headers
    repeats: bool = True  # kohya `N_concept` folders count N times per epoch; False: read them as plain folders
    # Apply EXIF orientation (upright images). False = kohya's way (pixels and size as stored): needed
    # for kohya's latent caches of such photos, whose bucket kohya chose from the stored size.
    exif_transpose: bool = True
    # Images with a side shorter than this (as displayed) are rejected: a 1 x 1 pixel, a 10 px icon
    # or a tracking pixel saved as a picture would be blown up to a whole bucket of blur. kohya has
    # no such floor (it enlarges anything); 0 = its way.
    min_image_side: int = 16


@dataclass
class IndexSummary:
    rows: int
    rejected: int
    per_source: dict[str, int]
    holdout_rows: int
    bucket_counts: list[int]
    buckets: list[list[int]]
    mean_aspect_error: float
    train_samples: int = 0  # rows of the train split counted with their repeats: what one epoch trains on
    exif_turned: int = 0  # images whose EXIF orientation swaps width and height (applied or not)

    def histogram(self) -> str:
        return histogram_text(np.array(self.bucket_counts), np.array(self.buckets), self.mean_aspect_error)


# --- vectorised helpers ------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixer (uint64 arithmetic wraps, which is intended)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def key_uniform(keys: pa.Array, seed: int) -> np.ndarray:
    """A number in [0, 1) per key that depends only on (key text, seed); (N,) float64.

    Polynomial hash over the UTF-8 bytes, computed for all strings at once from Arrow's buffers.
    """
    keys = pa.array(keys, pa.string()) if not isinstance(keys, pa.Array) else keys.cast(pa.string())
    keys = pc.fill_null(keys, "")
    offsets = np.frombuffer(keys.buffers()[1], np.int32)[keys.offset : keys.offset + len(keys) + 1]
    data = np.frombuffer(keys.buffers()[2], np.uint8)[offsets[0] : offsets[-1]] if len(keys) else np.empty(0, np.uint8)
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    pos = np.arange(len(data)) - np.repeat(starts, lengths)  # byte position inside its string
    powers = np.cumprod(np.full(max(int(lengths.max(initial=0)), 1), 0x100000001B3, np.uint64))  # P^(i+1)
    terms = (data.astype(np.uint64) + np.uint64(1)) * powers[pos]
    sums = np.add.reduceat(terms, np.minimum(starts, max(len(terms) - 1, 0))) if len(terms) else np.zeros(len(keys), np.uint64)
    sums = np.where(lengths > 0, sums, np.uint64(0))
    h = _splitmix64(sums ^ _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + lengths.astype(np.uint64)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def tag_regex(tag: str) -> str:
    """Regex matching `tag` as a whole comma-separated item; `_` and space match each other."""
    body = re.escape(tag.strip()).replace("_", "[_ ]").replace(r"\ ", "[_ ]")
    return rf"(^|,)\s*{body}\s*(,|$)"


def _tag_mask(tags: pa.Array, where_tags: Sequence[str]) -> pa.Array | None:
    mask = None
    for tag in where_tags:
        hit = pc.fill_null(pc.match_substring_regex(tags, tag_regex(tag)), False)
        mask = hit if mask is None else pc.and_(mask, hit)
    return mask


class _Finisher:
    """Turns raw source batches into index batches, counting as it goes."""

    def __init__(self, opts: IndexOptions) -> None:
        self.opts = opts
        self.assigner = BucketAssigner(opts.buckets)  # the fixed set, or no_upscale's growing one
        self.counts = np.zeros(len(self.assigner.buckets), np.int64)
        self.error_sum = 0.0
        self.rows = 0
        self.holdout_rows = 0
        self.train_samples = 0
        self.exif_turned = 0
        self.per_source: dict[str, int] = {}

    def __call__(self, raw: pa.RecordBatch, spec: SourceSpec, reject: Reject) -> pa.RecordBatch | None:
        if self.opts.where_tags:
            mask = _tag_mask(raw.column("tags"), self.opts.where_tags)
            raw = raw.filter(mask)
        if raw.num_rows == 0:
            return None
        raw = self._orient(raw)
        raw = self._drop_tiny(raw, reject)
        if raw.num_rows == 0:
            return None
        ids = self.assigner.assign(raw.column("width").to_numpy(zero_copy_only=False),
                                   raw.column("height").to_numpy(zero_copy_only=False))  # (N,) int16
        raw, ids = self._drop_unbucketed(raw, ids, reject)
        n = raw.num_rows
        if n == 0:
            return None
        width = raw.column("width").to_numpy(zero_copy_only=False)  # (N,)
        height = raw.column("height").to_numpy(zero_copy_only=False)
        buckets = self.assigner.buckets
        self.counts = np.pad(self.counts, (0, len(buckets) - len(self.counts))) + np.bincount(ids, minlength=len(buckets))
        self.error_sum += float(aspect_errors(width, height, ids, buckets).sum())
        keys = pc.binary_join_element_wise(pa.scalar(spec.prefix), raw.column("key"), "") if spec.prefix else raw.column("key")
        if self.opts.holdout > 0:
            holdout = key_uniform(keys, self.opts.seed) < self.opts.holdout  # (N,) bool
        else:
            holdout = np.zeros(n, bool)
        repeats = pc.fill_null(raw.column("repeats"), 1).to_numpy(zero_copy_only=False).astype(np.int32)  # (N,)
        if not self.opts.repeats:
            repeats = np.ones(n, np.int32)
        self.rows += n
        self.holdout_rows += int(holdout.sum())
        self.train_samples += int(repeats[~holdout].sum())
        self.per_source[spec.name] = self.per_source.get(spec.name, 0) + n
        columns = {
            "key": keys,
            "source": pa.DictionaryArray.from_arrays(np.zeros(n, np.int8), [spec.name]).cast(pa.string()),
            **{name: raw.column(name) for name in ("path", "offset", "size", "width", "height", "tags", "caption")},
            "bucket": pa.array(ids),
            "bucket_width": pa.array(buckets[ids, 0].astype(np.int16)),
            "bucket_height": pa.array(buckets[ids, 1].astype(np.int16)),
            "split": pa.DictionaryArray.from_arrays(holdout.astype(np.int8), ["train", "holdout"]).cast(pa.string()),
            "repeats": pa.array(repeats),
        }
        return pa.RecordBatch.from_pydict(columns, schema=INDEX_SCHEMA)

    def _orient(self, raw: pa.RecordBatch) -> pa.RecordBatch:
        """Count the rows EXIF turned; without `exif_transpose`, give them back their stored sides."""
        turned = pc.fill_null(raw.column("turned"), False)
        self.exif_turned += int(pc.sum(turned).as_py() or 0)
        if self.opts.exif_transpose or not pc.any(turned).as_py():
            return raw
        w, h = raw.column("width"), raw.column("height")
        raw = raw.set_column(raw.schema.get_field_index("width"), "width", pc.if_else(turned, h, w))
        return raw.set_column(raw.schema.get_field_index("height"), "height", pc.if_else(turned, w, h))

    def _drop_tiny(self, raw: pa.RecordBatch, reject: Reject) -> pa.RecordBatch:
        floor = self.opts.min_image_side
        if floor <= 0:
            return raw
        tiny = pc.or_(pc.less(raw.column("width"), floor), pc.less(raw.column("height"), floor))
        if not pc.any(tiny).as_py():
            return raw
        for row in raw.filter(tiny).select(["key", "path", "width", "height"]).to_pylist():
            reject(row["key"], row["path"], f"too small ({row['width']} x {row['height']} px: a side under "
                   f"--min-image-side {floor})")
        return raw.filter(pc.invert(tiny))

    def _drop_unbucketed(self, raw: pa.RecordBatch, ids: np.ndarray, reject: Reject) -> tuple[pa.RecordBatch, np.ndarray]:
        """no_upscale: images smaller than one bucket step on a side have no bucket (id -1)."""
        small = ids < 0
        if not small.any():
            return raw, ids
        step = self.opts.buckets.step
        for row in raw.filter(pa.array(small)).select(["key", "path", "width", "height"]).to_pylist():
            reject(row["key"], row["path"], f"too small for a bucket ({row['width']} x {row['height']}: a side under "
                   f"the bucket step {step} px), and bucket no_upscale never enlarges an image")
        return raw.filter(pa.array(~small)), ids[~small]

    def summary(self, rejected: int) -> IndexSummary:
        return IndexSummary(
            rows=self.rows,
            rejected=rejected,
            per_source=self.per_source,
            holdout_rows=self.holdout_rows,
            bucket_counts=self.counts.tolist(),
            buckets=self.assigner.buckets.tolist(),
            mean_aspect_error=self.error_sum / max(self.rows, 1),
            train_samples=self.train_samples,
            exif_turned=self.exif_turned,
        )


def _check_unique_keys(path: Path) -> None:
    keys = pq.read_table(path, columns=["key"], memory_map=True)["key"]
    distinct = pc.count_distinct(keys).as_py()
    if distinct != len(keys):
        counts = pc.value_counts(keys)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise TunelabError(
            f"{len(keys) - distinct:,} duplicate keys (e.g. {dup!r}); give each source its own prefix, "
            "e.g. `folder:./a,prefix=a/` and `folder:./b,prefix=b/`"
        )


def build_index(
    sources: Sequence[SourceSpec | str], out: str | Path, opts: IndexOptions | None = None, progress: bool = True
) -> IndexSummary:
    """Read every source, assign buckets, write `out` (Parquet) atomically; return the summary."""
    opts = opts or IndexOptions()
    specs = [s if isinstance(s, SourceSpec) else SourceSpec.parse(s) for s in sources]
    if not specs:
        raise TunelabError("no sources given; add at least one, e.g. `--source folder:./images`")
    if not 0.0 <= opts.holdout < 1.0:
        raise TunelabError(f"holdout must be in [0, 1), got {opts.holdout}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    rejects_path = out.with_name(out.stem + ".rejects.jsonl")
    rejects_path.unlink(missing_ok=True)
    finish = _Finisher(opts)
    bar = tqdm(desc="indexing", unit=" rows", disable=not progress, unit_scale=True)
    try:
        with RejectsLog(rejects_path) as rejects, _writer(tmp) as writer:
            for spec in specs:
                # Reading (decompress, parse, header probes) overlaps with compressing and writing.
                for raw in _prefetch(read_source(spec, rejects.add, opts.workers, folder_repeats=opts.repeats)):
                    batch = finish(raw, spec, rejects.add)
                    if batch is not None:
                        writer.write_batch(batch)
                        bar.update(batch.num_rows)
            summary = finish.summary(rejects.count)
            writer.add_key_value_metadata({META_KEY: json.dumps(_footer(summary, opts)).encode()})
        if summary.rows == 0:
            raise TunelabError("no rows in the index: the sources are empty, all images were rejected, or --where-tag matched nothing")
        if not (len(specs) == 1 and table_checks_own_keys(specs[0])):
            _check_unique_keys(tmp)  # the general check: ~1.6 s per million keys
        os.replace(tmp, out)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    out.with_name(out.stem + ".buckets.txt").write_text(summary.histogram() + "\n", encoding="utf-8")
    log.info("index %s: %s rows (%s rejected, see %s)", out, f"{summary.rows:,}", f"{summary.rejected:,}", rejects_path.name)
    return summary


def _prefetch(items: Iterator[pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    """Run `items` in a background thread, `depth` batches ahead; errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            q.put(exc)

    thread = threading.Thread(target=work, daemon=True, name="index-reader")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class _writer:
    """ParquetWriter as a context manager, with settings tuned for this table."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> pq.ParquetWriter:
        # Dictionary-encode only the low-cardinality columns; zstd everywhere. Big row groups keep
        # column reads (the sampler's `bucket`) fast, and batches arrive at ≤ 131072 rows anyway.
        self.w = pq.ParquetWriter(
            self.path, INDEX_SCHEMA, compression="zstd", compression_level=1,
            use_dictionary=["source", "split", "bucket", "bucket_width", "bucket_height"],
            write_statistics=["bucket", "bucket_width", "bucket_height", "width", "height"],  # not long text
        )
        return self.w

    def __exit__(self, *exc: object) -> None:
        self.w.close()


def _footer(summary: IndexSummary, opts: IndexOptions) -> dict:
    return {
        "version": FORMAT_VERSION,
        "bucket_config": opts.buckets.model_dump(),
        "buckets": summary.buckets,
        "bucket_counts": summary.bucket_counts,
        "mean_aspect_error": summary.mean_aspect_error,
        "rows": summary.rows,
        "rejected": summary.rejected,
        "per_source": summary.per_source,
        "holdout": opts.holdout,
        "holdout_rows": summary.holdout_rows,
        "seed": opts.seed,
        "where_tags": list(opts.where_tags),
        "repeats": opts.repeats,
        "train_samples": summary.train_samples,
        "exif_transpose": opts.exif_transpose,
        "exif_turned": summary.exif_turned,
    }


def read_footer(path: str | Path) -> dict:
    """The `tunelab.index` metadata of an index file; refuses files that are not tunelab indexes."""
    path = Path(path)
    if not path.exists():
        raise TunelabError(f"index {path} not found; build it with `tunelab data index`")
    try:
        meta = pq.ParquetFile(path).metadata.metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise TunelabError(f"{path} is not a readable Parquet file ({exc}); rebuild it with `tunelab data index`") from exc
    if META_KEY not in meta:
        raise TunelabError(f"{path} is Parquet but not a tunelab index; build one with `tunelab data index`")
    return json.loads(meta[META_KEY])


def check_bucket_config(footer: dict, wanted: BucketConfig | None, index_path: str | Path) -> None:
    """Refuse a run file's `[data.buckets]` (`wanted`; None when the run file leaves it out) that
    differs from the bucket config the index was built with (its footer's `bucket_config`).

    The index wins: each row's bucket is decided when the index is built, the sampler batches by
    it and the latent cache was encoded at those sizes, so the run file cannot change them; a
    differing section would otherwise be ignored without a word."""
    if wanted is None or footer.get("bucket_config") is None:
        return
    built = BucketConfig(**footer["bucket_config"]).model_dump()  # defaults for settings newer than the index
    if BucketConfig(**built) == wanted:
        return
    diff = ", ".join(f"{k} = {v} (the index has {built[k]})" for k, v in wanted.model_dump().items() if built[k] != v)
    w = wanted
    raise TunelabError(
        f"data.buckets in the run file differs from the buckets {index_path} was built with: {diff}. Training uses the "
        f"index's buckets. Either rebuild the index with the run file's: `tunelab data index --out {index_path} -s SOURCE... "
        f"--resolution {w.resolution} --min-side {w.min_side} --max-side {w.max_side} --step {w.step}"
        f"{' --bucket-no-upscale' if getattr(w, 'no_upscale', False) else ''}` (and its latents, "
        f"into a new folder: `tunelab data cache {index_path} --out NEW_DIR`), or delete [data.buckets] from the run file "
        "to train on the index's buckets"
    )


def index_digest(path: str | Path) -> str:
    """The identity of an index's content for resume checks: a hash of its footer and of the
    columns that decide what training sees and in which order (key, bucket, split, and repeats
    where the index has them: indexes from before that column keep their digest). An index
    rebuilt with other images, buckets, holdout or repeats gets another digest; one rebuilt from the same
    images the same, and so does one whose tags or captions were edited (prompts are made from the
    row each epoch, and the batches stay the same). Streams the columns by row group (12 M rows:
    a few hundred MB read once)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(read_footer(path), sort_keys=True).encode())
    pf = pq.ParquetFile(path, memory_map=True)
    columns = ["key", "bucket", "split"] + (["repeats"] if "repeats" in pf.schema_arrow.names else [])
    for batch in pf.iter_batches(batch_size=1 << 20, columns=columns):
        for column in batch.columns:
            h.update(_canonical_bytes(column))
    return h.hexdigest()


def _canonical_bytes(arr: pa.Array) -> bytes:
    """An array's values as bytes that do not depend on buffer padding or slicing."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
        _, offsets, data = arr.buffers()
        off = np.frombuffer(offsets, dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
        return (off - off[0]).tobytes() + data.to_pybytes()[off[0]: off[-1]]
    return arr.to_numpy(zero_copy_only=False).tobytes()


# --- statistics -------------------------------------------------------------------------------


def _merge_counts(running: pa.Table | None, batch_counts: pa.StructArray) -> pa.Table:
    table = pa.Table.from_arrays([batch_counts.field("values"), batch_counts.field("counts")], ["tag", "n"])
    if running is not None:
        table = pa.concat_tables([running, table])
    return table.group_by("tag").aggregate([("n", "sum")]).rename_columns(["tag", "n"])


def _split_tags(tags: pa.Array) -> pa.Array:
    items = pc.list_flatten(pc.split_pattern(pc.fill_null(tags, ""), ","))
    items = pc.utf8_trim_whitespace(items)
    return items.filter(pc.not_equal(items, ""))


def index_stats(path: str | Path, top_tags: int = 30, progress: bool = True) -> dict:
    """Counts, tag frequencies, caption coverage and the bucket histogram, streaming the index."""
    footer = read_footer(path)
    buckets = np.array(footer["buckets"])
    pf = pq.ParquetFile(path, memory_map=True)
    counts = np.zeros(len(buckets), np.int64)
    per_source: dict[str, int] = {}
    per_split: dict[str, int] = {}
    samples_per_split: dict[str, int] = {}  # rows counted with their repeats: samples per epoch
    with_tags = with_caption = with_both = 0
    error_sum = 0.0
    tag_counts: pa.Table | None = None
    has_repeats = "repeats" in pf.schema_arrow.names  # absent in indexes built before repeats existed
    cols = ["source", "split", "tags", "caption", "bucket", "width", "height"] + (["repeats"] if has_repeats else [])
    for batch in tqdm(pf.iter_batches(batch_size=131072, columns=cols), desc="stats", disable=not progress,
                      total=pf.metadata.num_row_groups, unit=" batches"):
        repeats = batch.column("repeats") if has_repeats else pa.array(np.ones(batch.num_rows, np.int32))
        for item in pa.table({"split": batch.column("split"), "n": repeats}).group_by("split").aggregate([("n", "sum")]).to_pylist():
            samples_per_split[item["split"]] = samples_per_split.get(item["split"], 0) + item["n_sum"]
        ids = batch.column("bucket").to_numpy()
        counts += np.bincount(ids, minlength=len(buckets))
        error_sum += float(aspect_errors(batch.column("width").to_numpy(), batch.column("height").to_numpy(), ids, buckets).sum())
        for name, acc in (("source", per_source), ("split", per_split)):
            for item in pc.value_counts(batch.column(name)).to_pylist():
                acc[item["values"]] = acc.get(item["values"], 0) + item["counts"]
        has_t = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(batch.column("tags"))), 0), False)
        has_c = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(batch.column("caption"))), 0), False)
        with_tags += pc.sum(has_t).as_py() or 0
        with_caption += pc.sum(has_c).as_py() or 0
        with_both += pc.sum(pc.and_(has_t, has_c)).as_py() or 0
        tag_counts = _merge_counts(tag_counts, pc.value_counts(_split_tags(batch.column("tags"))))
    rows = int(counts.sum())
    top = tag_counts.sort_by([("n", "descending")]).slice(0, top_tags).to_pylist() if tag_counts is not None else []
    return {
        "rows": rows,
        "per_source": per_source,
        "per_split": per_split,
        "samples_per_split": samples_per_split,
        "with_tags": with_tags,
        "with_caption": with_caption,
        "with_both": with_both,
        "distinct_tags": tag_counts.num_rows if tag_counts is not None else 0,
        "top_tags": [(t["tag"], t["n"]) for t in top],
        "buckets": buckets.tolist(),
        "bucket_counts": counts.tolist(),
        "mean_aspect_error": error_sum / max(rows, 1),
        "rejected_at_build": footer.get("rejected", 0),
    }


def stats_text(stats: dict) -> str:
    """`tunelab data stats` output."""
    rows = max(stats["rows"], 1)
    pct = lambda n: f"{n:,} ({100 * n / rows:.1f}%)"  # noqa: E731
    lines = [
        f"rows: {stats['rows']:,}   (rejected when built: {stats['rejected_at_build']:,})",
        "sources: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats["per_source"].items())),
        "splits: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats["per_split"].items())),
        "samples per epoch (images x repeats): " + ", ".join(
            f"{k} {stats['samples_per_split'].get(k, v):,} from {v:,} images" for k, v in sorted(stats["per_split"].items())),
        f"with tags: {pct(stats['with_tags'])}   with caption: {pct(stats['with_caption'])}   "
        f"both: {pct(stats['with_both'])}",
        f"distinct tags: {stats['distinct_tags']:,}; most frequent:",
    ]
    lines += [f"  {n:>11,}  {tag}" for tag, n in stats["top_tags"]]
    lines.append(histogram_text(np.array(stats["bucket_counts"]), np.array(stats["buckets"]), stats["mean_aspect_error"]))
    return "\n".join(lines)
