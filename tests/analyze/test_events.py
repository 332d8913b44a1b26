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


def _accumulator(path: Path, purge: bool = False) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0}, purge_orphaned_data=purge)
    acc.Reload()
    return acc


def _assert_same_as_tensorboard(path: Path, ours: events.Scalars, purge: bool = False) -> None:
    """Every scalar, step and wall time equal, tag by tag, in the same order.

    `purge`: tensorboard's restart purge on (its default), for the files of a restarted run. Then
    only simple-value scalars are compared: this accumulator leaves its `tensors` store (TF2-style
    scalars) out of `_Purge`, which we do not copy (see `events._purge_orphans`).
    """
    acc = _accumulator(path, purge)
    expected: dict[str, list] = {t: acc.Scalars(t) for t in acc.Tags()["scalars"]}
    for t in acc.Tags()["tensors"]:
        rows = [(e.step, e.wall_time, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(t)]
        if all(a.size == 1 and a.dtype.kind in "fiub" for _, _, a in rows) and not purge:
            expected[t] = [ea.ScalarEvent(w, s, float(a.reshape(-1)[0])) for s, w, a in rows]
    expected = {t: evs for t, evs in expected.items() if evs}  # a tag whose values were all purged
    assert set(ours.tags) - set(expected) <= (set(acc.Tags()["tensors"]) if purge else set())
    assert set(expected) <= set(ours.tags)
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
    # Still every value: kohya's log has no restart marker (no SessionLog.START) and its steps never
    # go back, so tensorboard's restart purge (applied by the reader) drops nothing from it.
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


# --- restarts: tensorboard's purge of orphaned values -----------------------------------------------
#
# The rule under test is tensorboard's `EventAccumulator._MaybePurgeOrphanedData` in
# tensorboard/backend/event_processing/event_accumulator.py: with file_version >= 2 a SessionLog.START
# at step S drops the values read before it with step >= S (`_CheckForRestartAndMaybePurge`); without
# one, a Summary event whose step goes back drops its tags' earlier values with step >= its step
# (`_CheckForOutOfOrderStepAndMaybePurge`). Every test compares with that accumulator, purge on.


def killed_and_resumed_run(logdir: Path) -> dict[str, dict[int, float]]:
    """30 steps logged through torch's SummaryWriter the way tunelab's trainer does: the first
    process saves its state at step 20, logs on to step 24 and is killed while writing a record;
    the resumed process starts from that state with `purge_step=21` (MetricsLogger passes
    resume_step + 1) and logs steps 21..30. Returns {tag: {step: value tensorboard shows}}."""
    from torch.utils.tensorboard import SummaryWriter

    def log(writer: SummaryWriter, steps: range, offset: float) -> dict[str, dict[int, float]]:
        shown: dict[str, dict[int, float]] = {"loss": {}, "lr/unet": {}, "scalar/new-style": {}}
        for step in steps:
            wall = 1.7e9 + step + offset
            for tag, value in (("loss", offset + 1 / step), ("lr/unet", 1e-4 * step)):
                writer.add_scalar(tag, value, step, walltime=wall)
                shown[tag][step] = float(np.float32(value))
            writer.add_scalar("scalar/new-style", offset + step, step, walltime=wall, new_style=True)
            shown["scalar/new-style"][step] = float(np.float32(offset + step))
            if step % 10 == 0:
                writer.add_histogram("weights", np.arange(10.0) * step, step, walltime=wall)
        writer.close()
        return shown

    logdir.mkdir(parents=True, exist_ok=True)
    first = log(SummaryWriter(str(logdir)), range(1, 25), 0.0)
    (killed,) = logdir.glob("events.*")
    killed.write_bytes(killed.read_bytes()[:-7])  # SIGKILL in the middle of the last record
    # Event files are named events.out.tfevents.<unix time>.<host>.<pid>.<n>: two processes, in order.
    killed.rename(logdir / "events.out.tfevents.1700000000.host.101.0")
    resumed = log(SummaryWriter(str(logdir), purge_step=21), range(21, 31), 1000.0)
    (new,) = (p for p in logdir.glob("events.*") if p.name != "events.out.tfevents.1700000000.host.101.0")
    new.rename(logdir / "events.out.tfevents.1700000100.host.102.0")
    return {tag: {**{s: v for s, v in first[tag].items() if s <= 20}, **resumed[tag]} for tag in first}


def test_killed_and_resumed_run_keeps_one_value_per_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shown = killed_and_resumed_run(tmp_path / "run")
    (_, files), = discover_runs(tmp_path / "run")
    with caplog.at_level(logging.INFO):
        ours = read_scalars(files)
    assert "incomplete record" in caplog.text and "orphaned by a restart dropped" in caplog.text
    for tag, values in shown.items():
        got = ours.series[tag]
        np.testing.assert_array_equal(got.step, np.arange(1, 31), err_msg=tag)  # 30 values, not 34
        np.testing.assert_array_equal(got.value, [values[s] for s in range(1, 31)], err_msg=tag)
    assert ours.series["loss"].value[20] == pytest.approx(1000 + 1 / 21)  # step 21: the resumed value


def test_killed_and_resumed_run_matches_tensorboard(tmp_path: Path) -> None:
    killed_and_resumed_run(tmp_path / "run")
    (_, files), = discover_runs(tmp_path / "run")
    _assert_same_as_tensorboard(tmp_path / "run", read_scalars(files), purge=True)


def test_a_single_file_with_a_restart_marker_is_purged_too(tmp_path: Path) -> None:
    killed_and_resumed_run(tmp_path)
    first, second = sorted(tmp_path.glob("events.out.tfevents.17*"))
    whole = first.read_bytes()
    _, used = events._frame(whole, np.frombuffer(whole + bytes(16), dtype=np.uint8))  # without the torn record
    both = tmp_path / "events.out.tfevents.both"
    both.write_bytes(whole[:used] + second.read_bytes())  # a writer that appended to the same file
    first.unlink(), second.unlink()
    ours = read_event_file(both)
    assert len(ours.series["loss"]) == 30
    _assert_same_as_tensorboard(both, ours, purge=True)


def _event(step: int, wall: float, **what) -> bytes:
    from tensorboard.compat.proto import event_pb2

    return event_pb2.Event(step=step, wall_time=wall, **what).SerializeToString()


def _write_records(path: Path, payloads: list[bytes]) -> None:
    from tensorboard.summary.writer.record_writer import RecordWriter

    with open(path, "wb") as fh:
        writer = RecordWriter(fh)
        for p in payloads:
            writer.write(p)


def _random_restarted_run(rng: np.random.Generator, logdir: Path) -> None:
    """1-3 files of random events: steps that go back, file versions 2 / 1 / none (also mid-file),
    SessionLog START and CHECKPOINT events, several values per event, histograms, step 0."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    logdir.mkdir(parents=True)
    wall, step = 1.7e9, 0
    for f in range(int(rng.integers(1, 4))):
        payloads = []
        head = rng.choice(["v2", "v1", "none"], p=[0.5, 0.2, 0.3])
        if head != "none":
            payloads.append(_event(0, wall, file_version=f"brain.Event:{head[1]}"))
        for _ in range(int(rng.integers(20, 60))):
            wall += 1.0
            step = max(0, step + int(rng.choice([1, 1, 1, 0, -3, -7]))) if rng.random() > 0.05 else 0
            kind = rng.choice(["scalar", "scalar", "scalar", "two", "histo", "start", "checkpoint", "version"])
            if kind == "start" or kind == "checkpoint":
                status = event_pb2.SessionLog.START if kind == "start" else event_pb2.SessionLog.CHECKPOINT
                payloads.append(_event(step, wall, session_log=event_pb2.SessionLog(status=status)))
            elif kind == "version":
                payloads.append(_event(step, wall, file_version=f"brain.Event:{rng.choice([1, 2])}"))
            elif kind == "histo":
                histo = summary_pb2.HistogramProto(min=0, max=1, num=1, sum=1, bucket_limit=[1], bucket=[1])
                payloads.append(_event(step, wall, summary=summary_pb2.Summary(value=[
                    summary_pb2.Summary.Value(tag="h", histo=histo)])))
            else:
                tags = rng.choice(["a", "b", "c"], size=2 if kind == "two" else 1, replace=rng.random() < 0.2)
                values = [summary_pb2.Summary.Value(tag=str(t), simple_value=float(rng.random())) for t in tags]
                payloads.append(_event(step, wall, summary=summary_pb2.Summary(value=values)))
        _write_records(logdir / f"events.out.tfevents.{1700000000 + f}.host", payloads)


@pytest.mark.parametrize("seed", range(40))
def test_random_restarts_match_tensorboard(tmp_path: Path, seed: int) -> None:
    _random_restarted_run(np.random.default_rng(seed), tmp_path / "run")
    (_, files), = discover_runs(tmp_path / "run")
    _assert_same_as_tensorboard(tmp_path / "run", read_scalars(files), purge=True)


def test_out_of_order_steps_without_file_version(tmp_path: Path) -> None:
    """No file_version: a step going back purges the later values of that event's tags only."""
    from tensorboard.compat.proto import summary_pb2

    def scalar(tag: str, step: int, value: float) -> bytes:
        return _event(step, 1.7e9 + value, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, simple_value=value)]))

    path = tmp_path / "events.out.tfevents.1.host"
    _write_records(path, [scalar("a", s, s) for s in range(1, 6)] + [scalar("b", s, 10 + s) for s in range(1, 6)]
                   + [scalar("a", 3, 33.0), scalar("a", 4, 44.0)])
    ours = read_event_file(path)
    np.testing.assert_array_equal(ours.series["a"].value, [1, 2, 33, 44])  # a: 3, 4, 5 of the first pass purged
    np.testing.assert_array_equal(ours.series["b"].value, [11, 12, 13, 14, 15])  # b untouched
    _assert_same_as_tensorboard(path, ours, purge=True)
