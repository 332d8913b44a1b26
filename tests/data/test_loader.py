"""Bucketed sampler: determinism, one bucket per batch, mid-epoch resume, 2-process gloo sharding;
the training dataset over a real index."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tunelab.data.captions import CaptionConfig
from tunelab.data.index import IndexOptions, build_index
from tunelab.data.loader import BucketBatchSampler, IndexTable, TrainDataset, collate
from tunelab.errors import TunelabError

from .conftest import write_image

BUCKETS = np.random.default_rng(0).integers(0, 5, 1000).astype(np.int16)


def _rows(batches: list[list[tuple[int, int]]]) -> list[list[int]]:
    return [[r for _, r in b] for b in batches]


def test_batches_are_single_bucket_deterministic_and_reshuffled() -> None:
    s = BucketBatchSampler(BUCKETS, batch_size=8, seed=1)
    epoch0 = _rows(list(s))
    epoch1 = _rows(list(s))
    assert len(epoch0) == len(s) == sum(np.bincount(BUCKETS) // 8)
    assert all(len(set(BUCKETS[b])) == 1 and len(b) == 8 for b in epoch0)
    flat = [r for b in epoch0 for r in b]
    assert len(flat) == len(set(flat))
    assert epoch0 != epoch1 and s.epoch == 2
    again = BucketBatchSampler(BUCKETS, batch_size=8, seed=1)
    assert _rows(list(again)) == epoch0
    assert _rows(list(BucketBatchSampler(BUCKETS, 8, seed=2))) != epoch0
    keep = BucketBatchSampler(BUCKETS, 8, seed=1, drop_last=False)
    assert sorted(r for b in _rows(list(keep)) for r in b) == list(range(1000))


def test_mid_epoch_resume_gives_exactly_the_next_batch() -> None:
    full = BucketBatchSampler(BUCKETS, 8, seed=3)
    list(full)
    reference = list(full)  # epoch 1
    s = BucketBatchSampler(BUCKETS, 8, seed=3)
    list(s)
    it = iter(s)
    seen = [next(it) for _ in range(7)]
    state = s.state_dict()
    resumed = BucketBatchSampler(BUCKETS, 8, seed=3)
    resumed.load_state_dict(state)
    assert seen + list(resumed) == reference
    assert all(e == 1 for b in reference for e, _ in b)  # epochs travel with the rows
    assert list(resumed) != [] and resumed.epoch == 3
    # With a prefetching DataLoader the loop tells how many batches it really consumed.
    ahead = BucketBatchSampler(BUCKETS, 8, seed=3, world_size=2, rank=1)
    it = iter(ahead)
    [next(it) for _ in range(5)]
    assert ahead.state_dict(consumed=3)["position"] == 6
    with pytest.raises(TunelabError, match="batch_size"):
        BucketBatchSampler(BUCKETS, 4, seed=3).load_state_dict(state)


def test_ranks_partition_the_epoch_and_resume_with_another_world_size() -> None:
    one = _rows(list(BucketBatchSampler(BUCKETS, 8, seed=5)))
    ranks = [_rows(list(BucketBatchSampler(BUCKETS, 8, seed=5, rank=r, world_size=3))) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # equal step counts for DDP
    interleaved = [b for step in zip(*ranks) for b in step]
    assert interleaved == one[: len(interleaved)]
    # 2 processes ran 4 steps each, then the job resumes on 4 processes.
    two = BucketBatchSampler(BUCKETS, 8, seed=5, world_size=2)
    two.position = 8
    state = two.state_dict()
    four = []
    for r in range(4):
        s = BucketBatchSampler(BUCKETS, 8, seed=5, rank=r, world_size=4)
        s.load_state_dict(state)
        four.append(_rows(list(s)))
    assert [b for step in zip(*four) for b in step] == one[8 : 8 + 4 * len(four[0])]


def _gloo_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s = BucketBatchSampler(BUCKETS, 8, seed=9, rank=dist.get_rank(), world_size=dist.get_world_size())
    mine = _rows(list(s))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_sharding(tmp_path: Path) -> None:
    out = str(tmp_path / "batches.pt")
    # fork: the children reuse the imported torch (spawn re-imports it, ~10 s on a busy machine)
    mp.start_processes(_gloo_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    gathered = torch.load(out)
    assert len(gathered[0]) == len(gathered[1]) > 0
    rows0 = {r for b in gathered[0] for r in b}
    rows1 = {r for b in gathered[1] for r in b}
    assert not rows0 & rows1
    single = _rows(list(BucketBatchSampler(BUCKETS, 8, seed=9)))
    assert [b for step in zip(*gathered) for b in step] == single[: 2 * len(gathered[0])]


def test_dataset_prompts_pixels_and_rejects(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for i in range(12):
        write_image(root / f"{i:02d}.png", (128 if i % 2 else 64, 64))
        (root / f"{i:02d}.txt").write_text(f"tag{i}, shared")
    build_index([f"folder:{root}"], tmp_path / "i.parquet",
                IndexOptions(holdout=0.3, seed=1), progress=False)
    index = IndexTable(tmp_path / "i.parquet")
    (root / "03.png").write_bytes(b"broken after indexing")
    train = index.rows_in_split("train")
    sampler = BucketBatchSampler(index.bucket_ids()[train], batch_size=2, seed=0, rows=train, drop_last=False)
    ds = TrainDataset(index, CaptionConfig(shuffle_tags=True), seed=4)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    batches = [b for b in loader if b is not None]
    seen = [r for b in batches for r in b["row"]]
    assert set(seen) | {3} >= set(train.tolist()) and 3 not in seen
    for b in batches:
        assert b["pixels"].shape[0] == len(b["key"]) and b["pixels"].shape[1] == 3
        assert -1.0 <= b["pixels"].min() and b["pixels"].max() <= 1.0
        assert (b["target_size_hw"] == torch.tensor(b["pixels"].shape[2:])).all()
    first = batches[0]
    assert ds[(0, first["row"][0])]["prompt"] == first["prompt"][0]  # same prompt in and out of workers
    if 3 in train:
        assert (tmp_path / "i.train-rejects.jsonl").exists()
    assert index.keys([0, 11, 5]) == ["00", "11", "05"]
