"""Training data: open an index cheaply, a bucketed distributed resumable batch sampler, a dataset.

Hand-written because torch's samplers know neither aspect-ratio buckets nor mid-epoch resume, and
accelerate's sharding cannot keep every batch inside one bucket. The design:
- `open_index` reads only the columns asked for (memory-mapped); the 12 M-row `bucket` column is
  25 MB. Text columns are fetched per row group, or — for training at scale — from an uncompressed
  Arrow IPC copy next to the index (`INDEX.arrow`, made once, memory-mapped, shared by every
  process and worker through the page cache);
- `BucketBatchSampler` builds an epoch with a few vectorised passes: a seeded permutation, a stable
  sort by bucket, batch starts per bucket, a seeded shuffle of the batches, and batch i of the
  epoch going to rank i mod world_size. Every batch holds one bucket; every rank gets the same
  number of batches (DDP needs equal step counts). Its state is (epoch, global batch position),
  so resuming — even with a different number of processes — continues with exactly the next batch;
- repeats (kohya's `N_concept` folders, the index's `repeats` column) are copies of a row made
  before that plan: a row with repeats 10 is 10 samples of the epoch, shuffled into its bucket like
  any other (two copies may share a batch, as in kohya's `BaseDataset.make_buckets`). The plan, the
  position and the rank split work on samples, so resume and sharding are unchanged;
- the sampler yields (epoch, row) pairs — (epoch, row, copy) for the 2nd, 3rd, ... copy of a
  repeated row — so the dataset's captions depend on (seed, epoch, row[, copy]), whatever the number
  of dataloader workers, and each copy gets its own tag shuffle and dropout;
- augmentations (kohya's flip_aug and random_crop) are drawn the same way, each from its own
  generator (`augment_rng`): a resumed run, or one with more workers or processes, mirrors and
  crops every sample exactly as an uninterrupted one; turning one on leaves the other's draws as
  they were.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tunelab.data.captions import CaptionConfig
from tunelab.data.index import read_footer
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.data.latents import LatentSource

log = logging.getLogger(__name__)

_IPC_MIN_ROWS = 200_000  # below this, text columns are simply read into memory
_TEXT_COLUMNS = ["key", "path", "offset", "size", "width", "height", "tags", "caption", "bucket_width", "bucket_height"]


class IndexTable:
    """Read access to an index: whole small columns, or chosen rows of any column."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.footer = read_footer(self.path)
        self._pf = pq.ParquetFile(self.path, memory_map=True)
        meta = self._pf.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (G + 1,)
        self._rows: pa.Table | None = None  # random-access copy, made on first `records`

    def __len__(self) -> int:
        return int(self._group_starts[-1])

    def __getstate__(self) -> dict:  # dataloader workers reopen instead of pickling mmaps
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def buckets(self) -> np.ndarray:
        return np.array(self.footer["buckets"], dtype=np.int32)  # (B, 2) of (width, height)

    def column(self, name: str) -> np.ndarray:
        """A whole numeric column as numpy, e.g. `bucket` (N,) int16."""
        return self._pf.read(columns=[name])[name].to_numpy()

    def bucket_ids(self) -> np.ndarray:
        return self.column("bucket")

    def repeats(self) -> np.ndarray:
        """Times each row counts per epoch, (N,) int64; all 1 for indexes built before repeats."""
        if "repeats" not in self._pf.schema_arrow.names:
            return np.ones(len(self), np.int64)
        return self.column("repeats").astype(np.int64)

    def rows_in_split(self, split: str) -> np.ndarray:
        """Row numbers of one split ("train" or "holdout"); (M,) int64."""
        col = self._pf.read(columns=["split"])["split"]
        return np.flatnonzero(col.to_numpy(zero_copy_only=False) == split)

    def keys(self, rows: Sequence[int]) -> list[str]:
        """Keys of a few rows, reading only the row groups that hold them."""
        return [r["key"] for r in self._by_row_group(rows, ["key"])]

    def _by_row_group(self, rows: Sequence[int], columns: list[str]) -> list[dict]:
        rows = np.asarray(rows, dtype=np.int64)
        groups = np.searchsorted(self._group_starts, rows, side="right") - 1
        out: list[dict] = [{} for _ in range(len(rows))]
        for g in np.unique(groups):
            table = self._pf.read_row_group(int(g), columns=columns)
            mine = np.flatnonzero(groups == g)
            for i, rec in zip(mine, table.take(pa.array(rows[mine] - self._group_starts[g])).to_pylist()):
                out[i] = rec
        return out

    def records(self, rows: Sequence[int]) -> list[dict]:
        """Full records (key, path, sizes, tags, caption, bucket size) of chosen rows, for training."""
        if self._rows is None:
            self._rows = self._random_access_table()
        return self._rows.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def _random_access_table(self) -> pa.Table:
        if len(self) < _IPC_MIN_ROWS:
            return self._pf.read(columns=_TEXT_COLUMNS)
        ipc = self.path.with_suffix(".arrow")
        stamp = f"{self.path.stat().st_size}:{self.path.stat().st_mtime_ns}".encode()
        if ipc.exists():
            reader = pa.ipc.open_file(pa.memory_map(str(ipc)))
            if (reader.schema.metadata or {}).get(b"tunelab.source") == stamp:
                return reader.read_all()  # zero-copy over the mapping
        log.info("making the random-access copy %s (once per index)", ipc.name)
        tmp = ipc.with_name(ipc.name + f".tmp{os.getpid()}")
        schema = self._pf.schema_arrow.with_metadata({b"tunelab.source": stamp})
        schema = pa.schema([schema.field(c) for c in _TEXT_COLUMNS], metadata=schema.metadata)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in self._pf.iter_batches(batch_size=131072, columns=_TEXT_COLUMNS):
                writer.write_batch(batch)
        os.replace(tmp, ipc)
        return pa.ipc.open_file(pa.memory_map(str(ipc))).read_all()  # zero-copy over the mapping


def open_index(path: str | Path) -> IndexTable:
    return IndexTable(path)


class BucketBatchSampler:
    """Batches of rows that share a bucket, sharded over ranks, resumable mid-epoch.

    Yields lists of (epoch, row) pairs, (epoch, row, copy) for copy ≥ 1 of a repeated row.
    `rows` maps sampler positions to index rows (e.g. only the train split); by default position i
    is row i. `repeats` (per position, ≥ 1; default 1) makes a position count that many samples.
    """

    def __init__(
        self,
        bucket_ids: np.ndarray,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        rows: np.ndarray | None = None,
        repeats: np.ndarray | None = None,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise TunelabError(f"sampler: need batch_size ≥ 1 and 0 ≤ rank < world_size (got {batch_size}, {rank}, {world_size})")
        self.bucket_ids = np.asarray(bucket_ids)
        self.rows = np.arange(len(self.bucket_ids)) if rows is None else np.asarray(rows)
        if len(self.rows) != len(self.bucket_ids):
            raise TunelabError("sampler: `rows` and `bucket_ids` must have the same length")
        self.repeats = np.ones(len(self.rows), np.int64) if repeats is None else np.asarray(repeats, np.int64)
        if len(self.repeats) != len(self.rows) or (self.repeats.size and self.repeats.min() < 1):
            raise TunelabError("sampler: `repeats` needs one count ≥ 1 per position; rebuild the index with `tunelab data index`")
        # Samples: position p appears repeats[p] times. Without repeats a sample is its position,
        # and the plan is exactly what it was before repeats existed (same draws, same batches).
        self._position_of: np.ndarray | None = None  # (S,) sample -> position
        self._copy_of: np.ndarray | None = None  # (S,) sample -> which copy of its position (0, 1, ...)
        self._sample_buckets = self.bucket_ids
        if (self.repeats > 1).any():
            self._position_of = np.repeat(np.arange(len(self.rows)), self.repeats)
            self._copy_of = np.arange(len(self._position_of)) - np.repeat(np.cumsum(self.repeats) - self.repeats, self.repeats)
            self._sample_buckets = self.bucket_ids[self._position_of]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0
        self.position = 0  # global batches already handed out this epoch (all ranks)
        self._cache: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order (N,), batch starts (nb,), batch lengths (nb,)) of all batches of the epoch."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1:]
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch])
        buckets = self._sample_buckets  # (S,) one entry per sample
        n = len(buckets)
        perm = rng.permutation(n) if self.shuffle else np.arange(n)
        order = perm[np.argsort(buckets[perm], kind="stable")]  # grouped by bucket, random inside
        counts = np.bincount(buckets, minlength=1)  # (B,)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (B,) start of each bucket in `order`
        per_bucket = counts // self.batch_size if self.drop_last else -(-counts // self.batch_size)
        bucket_of_batch = np.repeat(np.arange(len(counts)), per_bucket)  # (nb,)
        within = np.arange(len(bucket_of_batch)) - np.repeat(np.cumsum(per_bucket) - per_bucket, per_bucket)
        starts = first[bucket_of_batch] + within * self.batch_size
        lengths = np.minimum(self.batch_size, first[bucket_of_batch] + counts[bucket_of_batch] - starts)
        if self.shuffle:
            shuffled = rng.permutation(len(starts))
            starts, lengths = starts[shuffled], lengths[shuffled]
        usable = len(starts) // self.world_size * self.world_size  # equal batch count on every rank
        self._cache = (epoch, order, starts[:usable], lengths[:usable])
        return self._cache[1:]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._epoch_plan(self.epoch)[1]) // self.world_size

    @property
    def num_samples(self) -> int:
        """Samples per epoch before batching: positions counted with their repeats."""
        return len(self._sample_buckets)

    def _items(self, epoch: int, samples: np.ndarray) -> list[tuple[int, ...]]:
        if self._position_of is None:
            return [(epoch, int(r)) for r in self.rows[samples]]
        rows, copies = self.rows[self._position_of[samples]], self._copy_of[samples]
        return [(epoch, int(r), int(c)) if c else (epoch, int(r)) for r, c in zip(rows, copies)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """The rest of the current epoch; the next call starts the next epoch."""
        epoch = self.epoch
        order, starts, lengths = self._epoch_plan(epoch)
        for g in range(self.position + self.rank, len(starts), self.world_size):
            self.position = g - self.rank + self.world_size
            s = starts[g]
            yield self._items(epoch, order[s : s + lengths[g]])
        self.epoch, self.position = epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self, consumed: int | None = None) -> dict:
        """Where to resume. Pass `consumed` (batches this rank trained on this epoch) when a
        DataLoader prefetches ahead of training; otherwise the count handed out is used."""
        position = self.position if consumed is None else consumed * self.world_size
        return {"epoch": self.epoch, "position": position, "seed": self.seed, "batch_size": self.batch_size,
                "num_samples": self.num_samples, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for name, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("num_samples", self.num_samples)):
            if state[name] != mine:
                raise TunelabError(
                    f"cannot resume the sampler: {name} was {state[name]} and is now {mine}; "
                    "resume with the same index, seed and batch size (or start a new run)"
                )
        # A position counts global batches, so a resume with another world size carries on too.
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


FLIP, CROP = 1, 2  # the augmentation streams of `augment_rng`


def augment_rng(seed: int, epoch: int, row: int, copy: int, stream: int) -> np.random.Generator:
    """The generator of one sample's augmentation `stream` (FLIP or CROP): a function of (seed,
    epoch, row, copy) alone, like the captions' (captions.sample_rng), and independent of them."""
    entropy = [seed & 0xFFFFFFFF, epoch, row, copy, 0x617567, stream]  # 0x617567: "aug", apart from captions
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def draws_flip(seed: int, epoch: int, row: int, copy: int = 0) -> bool:
    """Whether a sample is mirrored under data.flip_aug: probability 0.5, as kohya's
    `subset.flip_aug and random.random() < 0.5` (sd-scripts `BaseDataset.__getitem__`)."""
    return bool(augment_rng(seed, epoch, row, copy, FLIP).random() < 0.5)


class TrainDataset:
    """Samples for training: prompt (from captions config) and pixels or cached latents.

    `__getitem__((epoch, row))` (or `(epoch, row, copy)`) returns a dict with key, prompt, `original_size_hw`,
    `crop_top_left` (SDXL's (top, left) conditioning), `target_size_hw`, and either `pixels`
    (3, H, W) float in [-1, 1] or `latents` (4, H/8, W/8). An image that cannot be read is logged to
    `rejects` and its sample is `None`; `collate` drops it, so training goes on.

    `crop_conditioning` is the convention crop_top_left is fed in (buckets.py): "kohya" (sd-scripts'
    `get_crop_ltrb`, the default) or "crop" (the real crop). Images decoded here and every latent
    cache (kohya's, tunelab's of either age) are converted to it, so one run feeds one convention.
    Images are decoded by the index's resize rule and EXIF choice (its footer).

    `flip_aug` mirrors a sample left-right with probability 0.5 (`draws_flip`): decoded pixels are
    flipped, a cache gives the mirrored image's latents (kohya's `latents_flipped`), and the crop
    box is mirrored as kohya mirrors it (`buckets.mirror_crop_ltrb`); the sample says `flipped`.
    `random_crop` cuts the bucket from a random place of each decoded image (kohya's random_crop;
    images only: a cache fixes the crop) and crop_top_left is that crop's in the "crop" convention
    and kohya's fitted offset, which ignores it as sd-scripts does, in the "kohya" one.
    """

    def __init__(
        self,
        index: IndexTable | str | Path,
        captions: CaptionConfig | None = None,
        seed: int = 0,
        latents: "LatentSource | None" = None,
        rejects_path: str | Path | None = None,
        crop_conditioning: str = "kohya",
        flip_aug: bool = False,
        random_crop: bool = False,
    ) -> None:
        from tunelab.data.buckets import CROP_CONVENTIONS, BucketConfig

        self.index = index if isinstance(index, IndexTable) else IndexTable(index)
        self.captions = captions or CaptionConfig()
        self.seed = seed
        self.latents = latents
        if crop_conditioning not in CROP_CONVENTIONS:
            raise TunelabError(f"data.crop_conditioning = {crop_conditioning!r}: choose one of {', '.join(CROP_CONVENTIONS)}")
        self.crop_conditioning = crop_conditioning
        if random_crop and latents is not None:
            raise TunelabError("data.random_crop needs images decoded while training (a latent cache fixes each crop): "
                               "leave data.latents empty, or set data.random_crop = false")
        self.flip_aug, self.random_crop = flip_aug, random_crop
        footer = self.index.footer
        self.buckets = BucketConfig(**footer["bucket_config"]) if footer.get("bucket_config") else None
        self.exif_transpose = bool(footer.get("exif_transpose", True))  # indexes before the choice applied EXIF
        self.rejects_path = Path(rejects_path) if rejects_path else self.index.path.with_name(
            self.index.path.stem + ".train-rejects.jsonl"
        )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]) -> dict | None:
        from tunelab.data.captions import prompt_for

        epoch, row, *rest = item  # (epoch, row) or (epoch, row, copy) for a repeated row's later copies
        copy = rest[0] if rest else 0
        rec = self.index.records([row])[0]
        flipped = self.flip_aug and draws_flip(self.seed, epoch, row, copy)
        sample = {"key": rec["key"], "row": row, "flipped": flipped,
                  "prompt": prompt_for(rec["tags"], rec["caption"], self.captions, self.seed, epoch, row, copy=copy),
                  "target_size_hw": (rec["bucket_height"], rec["bucket_width"])}
        if self.latents is not None:
            return self._from_latents(rec, sample, flipped)
        crop_rng = augment_rng(self.seed, epoch, row, copy, CROP) if self.random_crop else None
        return self._from_image(rec, sample, flipped, crop_rng)

    def _conditioning(self, crop: tuple[float, ...], stored: str, size: tuple[int, int], bucket: tuple[int, int],
                      flipped: bool) -> tuple[int, int]:
        """crop_top_left in the run's convention, of the mirrored sample when `flipped`."""
        from tunelab.data.buckets import convert_crop_ltrb, crop_top_left, mirror_crop_ltrb

        crop = convert_crop_ltrb(crop, stored, self.crop_conditioning, size, bucket, self.buckets)
        if flipped:
            crop = mirror_crop_ltrb(crop, self.crop_conditioning, size, bucket, self.buckets)
        return crop_top_left(crop)

    def _from_latents(self, rec: dict, sample: dict, flipped: bool) -> dict:
        import torch

        bucket = (rec["bucket_width"], rec["bucket_height"])
        entry = self.latents.get(rec["key"], rec, flipped=flipped)  # the row: kohya's files are found from the image
        if entry is None:
            raise TunelabError(self.latents.missing(rec["key"], rec))
        w, h = entry.original_size
        return {**sample, "latents": torch.from_numpy(entry.latents.astype(np.float32)), "original_size_hw": (h, w),
                "crop_top_left": self._conditioning(entry.crop_ltrb, entry.crop_convention, (w, h), bucket, flipped)}

    def _from_image(self, rec: dict, sample: dict, flipped: bool, crop_rng: np.random.Generator | None) -> dict | None:
        import torch

        from tunelab.data.images import ImageRef, ImageRejected, RejectsLog, load_into_bucket

        bucket = (rec["bucket_width"], rec["bucket_height"])
        ref = ImageRef(rec["path"], rec["offset"], rec["size"])
        try:
            pixels, (w, h), crop = load_into_bucket(ref, bucket, buckets=self.buckets, exif_transpose=self.exif_transpose,
                                                    crop_rng=crop_rng)
        except ImageRejected as rej:
            with RejectsLog(self.rejects_path) as log_file:
                log_file.add(rec["key"], rec["path"], rej.reason)
            return None
        if flipped:
            pixels = pixels[:, ::-1]  # (H, W, 3): mirrored left-right
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
        return {**sample, "pixels": tensor, "original_size_hw": (h, w),
                "crop_top_left": self._conditioning(crop, "crop", (w, h), bucket, flipped)}


def collate(samples: list[dict | None]) -> dict | None:
    """Stack one bucket's samples; unreadable ones (None) are left out."""
    import torch

    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    out: dict = {name: [s[name] for s in samples] for name in ("key", "row", "prompt")}
    out["flipped"] = [bool(s.get("flipped", False)) for s in samples]
    for name in ("pixels", "latents"):
        if name in samples[0]:
            out[name] = torch.stack([s[name] for s in samples])  # (B, C, H, W)
    for name in ("original_size_hw", "crop_top_left", "target_size_hw"):
        out[name] = torch.tensor([s[name] for s in samples], dtype=torch.long)  # (B, 2)
    return out
