"""The fast event reader against tensorboard's own reader, on kohya's real file and on files we write."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.util import tensor_util

from tunelab.analyze import events
from tunelab.analyze.events import (
    discover_runs,
    masked_crc32c_rows,
    pick_loss_tag,
    read_event_file,
    read_metrics_parquet,
    read_scalars,
)
from tunelab.errors import TunelabError

from tests.analyze.fixtures import FIXTURES, KOHYA  # noqa: E402,F401


def _accumulator(path: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0}, purge_orphaned_data=False)
    acc.Reload()
    return acc


def _assert_same_as_tensorboard(path: Path, ours: events.Scalars) -> None:
    """Every scalar, step and wall time equal, tag by tag, in the same order."""
    acc = _accumulator(path)
    expected: dict[str, list] = {t: acc.Scalars(t) for t in acc.Tags()["scalars"]}
    for t in acc.Tags()["tensors"]:
        rows = [(e.step, e.wall_time, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(t)]
        if all(a.size == 1 and a.dtype.kind in "fiub" for _, _, a in rows):
            expected[t] = [ea.ScalarEvent(w, s, float(a.reshape(-1)[0])) for s, w, a in rows]
    assert set(ours.tags) == set(expected)
    for tag, evs in expected.items():
        got = ours.series[tag]
        assert got.step.dtype == np.int64 and got.value.dtype == np.float64 and got.wall_time.dtype == np.float64
        np.testing.assert_array_equal(got.step, [e.step for e in evs], err_msg=tag)
        np.testing.assert_array_equal(got.wall_time, [e.wall_time for e in evs], err_msg=tag)
        np.testing.assert_array_equal(got.value, [e.value for e in evs], err_msg=tag)


@pytest.fixture(scope="module")
def kohya_file() -> Path:
    if not KOHYA:
        pytest.skip("kohya fixture not present")
    return KOHYA[0]


def test_kohya_file_matches_tensorboard(kohya_file: Path) -> None:
    ours = read_event_file(kohya_file, verify=True)
    assert len(ours) == 155_630
    assert len(ours.series["loss"]) == 15_560
    assert ours.series["loss"].step.max() == 3890
    assert ours.series["loss"].value.mean() == pytest.approx(0.1075, abs=5e-4)
    _assert_same_as_tensorboard(kohya_file, ours)


def _write_with_summary_writer(logdir: Path, big_records: bool = False) -> Path:
    """A log written by torch's SummaryWriter with the awkward cases a reader must survive."""
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(0)
    writer = SummaryWriter(str(logdir))
    for step in range(300):
        for micro in range(3):  # several values per step, as with gradient accumulation
            writer.add_scalar("loss", float(rng.random()), step, walltime=1.7e9 + step + micro / 10)
        writer.add_scalar("lr/unet", 1e-5 * (1 - step / 300), step)
        if step % 50 == 0:
            writer.add_scalar("effective_batch", 16.0, step)
            writer.add_scalar("scalar/new-style", float(step) / 7, step, new_style=True)
            writer.add_histogram("weights", rng.normal(size=100), step)
            writer.add_text("note", f"step {step}", step)
        if big_records and step % 100 == 0:
            writer.add_image("big", rng.random((3, 256, 256)), step)  # records far beyond 64 KiB
    writer.add_scalar("ünïcode/tag with spaces and a long name that needs several words", 1.5, 7)
    for value in (math.nan, math.inf, -math.inf, 0.0, -0.0, 3.4e38, 1e-45):
        writer.add_scalar("edge/values", value, 11)
    for step in (-5, 0, 127, 128, 2**31, 2**40, 2**62):
        writer.add_scalar("edge/steps", 1.0, step)
    writer.close()
    (path,) = list(logdir.glob("events.out.tfevents.*"))
    return path


def test_summary_writer_file_matches_tensorboard(tmp_path: Path) -> None:
    path = _write_with_summary_writer(tmp_path)
    ours = read_event_file(path, verify=True)
    _assert_same_as_tensorboard(path, ours)
    assert ours.series["scalar/new-style"].value[1] == pytest.approx(50 / 7)  # tensor scalars read too
    assert "weights" not in ours.series and "note" not in ours.series
    np.testing.assert_array_equal(ours.series["edge/steps"].step, [-5, 0, 127, 128, 2**31, 2**40, 2**62])


def test_large_records_and_small_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_with_summary_writer(tmp_path, big_records=True)
    whole = read_event_file(path)
    _assert_same_as_tensorboard(path, whole)
    # Chunks far smaller than one image record: records straddle chunks and accumulate.
    monkeypatch.setattr(events, "_CHUNK_BYTES", 4096)
    pieces = read_event_file(path, verify=True)
    for tag in whole.tags:
        np.testing.assert_array_equal(pieces.series[tag].value, whole.series[tag].value)
        np.testing.assert_array_equal(pieces.series[tag].step, whole.series[tag].step)


def test_masked_crc_matches_tensorboard() -> None:
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, size=(50, 37), dtype=np.uint8)
    expected = [masked_crc32c(bytes(r)) for r in rows]
    np.testing.assert_array_equal(masked_crc32c_rows(rows), expected)


def test_truncated_file_keeps_whole_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = _write_with_summary_writer(tmp_path / "a")
    cut = tmp_path / "events.out.tfevents.cut"
    cut.write_bytes(full.read_bytes()[:-7])  # a writer killed mid-record
    with caplog.at_level(logging.WARNING):
        ours = read_event_file(cut)
    assert "incomplete record" in caplog.text
    assert len(ours) == len(read_event_file(full)) - 1


def test_corrupt_length_and_payload_are_reported(tmp_path: Path) -> None:
    data = bytearray(_write_with_summary_writer(tmp_path / "a").read_bytes())
    bad_length = tmp_path / "events.out.tfevents.len"
    first_len = int.from_bytes(data[:8], "little")
    second = 16 + first_len
    corrupt = data.copy()
    corrupt[second] ^= 0x01  # the length of the second record
    bad_length.write_bytes(bytes(corrupt))
    with pytest.raises(TunelabError, match=f"byte {second} fails its length checksum"):
        read_event_file(bad_length)
    corrupt = data.copy()
    corrupt[second + 5] = 0xFF  # a huge length must not pass for a record still being written
    bad_length.write_bytes(bytes(corrupt))
    with pytest.raises(TunelabError, match="length checksum"):
        read_event_file(bad_length)
    bad_payload = tmp_path / "events.out.tfevents.payload"
    corrupt = data.copy()
    corrupt[second + 14] ^= 0x01  # inside the second record's wall time
    bad_payload.write_bytes(bytes(corrupt))
    read_event_file(bad_payload)  # payload checksums are only checked on request
    with pytest.raises(TunelabError, match="payload checksum"):
        read_event_file(bad_payload, verify=True)


def test_metrics_parquet(tmp_path: Path) -> None:
    path = tmp_path / "metrics.parquet"
    table = pa.table({
        "step": pa.array([0, 0, 1, 1, 2], pa.int64()),
        "tag": ["loss", "lr/unet", "loss", "lr/unet", "loss"],
        "value": [0.5, 1e-5, 0.4, 1e-5, 0.3],
        "wall_time": [1.0, 1.0, 2.0, 2.0, 3.0],
    })
    pq.write_table(table, path)
    got = read_metrics_parquet(path)
    assert got.tags == ["loss", "lr/unet"]
    np.testing.assert_array_equal(got.series["loss"].value, [0.5, 0.4, 0.3])
    np.testing.assert_array_equal(got.series["loss"].step, [0, 1, 2])
    np.testing.assert_array_equal(got.series["lr/unet"].wall_time, [1.0, 2.0])
    assert discover_runs(tmp_path) == [(tmp_path, [path])]
    pq.write_table(table.drop(["wall_time"]), tmp_path / "broken.parquet")
    with pytest.raises(TunelabError, match="wall_time"):
        read_metrics_parquet(tmp_path / "broken.parquet")


def test_discover_runs(tmp_path: Path) -> None:
    for run in ("a/logs", "b"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "events.out.tfevents.1.host").write_bytes(b"")
    (tmp_path / "b" / "events.out.tfevents.2.host").write_bytes(b"")
    runs = discover_runs(tmp_path)
    assert [d.relative_to(tmp_path).as_posix() for d, _ in runs] == ["a/logs", "b"]
    assert len(runs[1][1]) == 2  # a restarted run: two files, one run
    with pytest.raises(TunelabError, match="does not exist"):
        discover_runs(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TunelabError, match="neither a tensorboard event file"):
        discover_runs(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="no event files"):
        discover_runs(tmp_path / "empty")


def test_restarted_run_files_concatenate(tmp_path: Path) -> None:
    first = _write_with_summary_writer(tmp_path / "x")
    (tmp_path / "run").mkdir()
    for i in range(2):
        (tmp_path / "run" / f"events.out.tfevents.{i}.host").write_bytes(first.read_bytes())
    (_, files), = discover_runs(tmp_path / "run")
    both = read_scalars(files)
    assert len(both.series["loss"]) == 2 * 900


def test_pick_loss_tag() -> None:
    assert pick_loss_tag(["lr/unet", "loss/current", "loss"]) == "loss"
    assert pick_loss_tag(["lr/unet", "loss/current", "loss/average"]) == "loss/current"
    assert pick_loss_tag(["lr", "val_loss_ema"]) == "val_loss_ema"
    assert pick_loss_tag(["loss", "lr"], "lr") == "lr"
    with pytest.raises(TunelabError, match="Did you mean 'loss/current'"):
        pick_loss_tag(["loss/current", "lr/unet"], "loss/curent")
    with pytest.raises(TunelabError, match="several loss-like tags"):
        pick_loss_tag(["a_loss", "b_loss"])
    with pytest.raises(TunelabError, match="no loss tag"):
        pick_loss_tag(["lr/unet"])


def test_unknown_tag_in_scalars_has_hint(kohya_file: Path) -> None:
    with pytest.raises(TunelabError, match="Did you mean 'lr/unet'"):
        read_event_file(kohya_file).get("lr/unet2")
