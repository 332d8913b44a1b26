"""The run directory's layout: names, checkpoint order and retention, state records."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.models.safetensors_io import TensorSpec, write_streaming
from tunelab.run import CheckpointFile, RunDir, TrainerInfo, epoch_name, open_run, step_name


def _checkpoint(run: RunDir, name: str, steps: int) -> None:
    import torch

    run.checkpoints.mkdir(parents=True, exist_ok=True)
    write_streaming(run.checkpoint_path(name), [TensorSpec("x", (1,), torch.float32)], lambda s: torch.zeros(1),
                    {"ss_steps": str(steps)})


def test_names():
    assert step_name(12) == "step-00000012" and epoch_name(3) == "epoch-0003"
    run = RunDir("r")
    assert run.checkpoint_path("last").as_posix() == "r/checkpoints/last.safetensors"
    assert run.state_path(5).as_posix() == "r/state/step-00000005"
    assert run.samples_at(7).as_posix() == "r/samples/step-00000007"
    assert (run.metrics.name, run.events.name, run.probes.name, run.report.name) == \
        ("metrics.parquet", "events", "probes", "report.html")


def test_checkpoints_in_training_order_and_retention(tmp_path):
    run = RunDir(tmp_path / "r")
    # 10 steps per epoch: epoch-0001 was written at step 10, between step 8 and step 12
    for name, steps in [("last", 20), ("step-00000012", 12), ("epoch-0001", 10), ("step-00000008", 8),
                        ("epoch-0002", 20), ("step-00000004", 4)]:
        _checkpoint(run, name, steps)
    (run.checkpoints / "notes.txt").write_text("not a checkpoint")
    (run.checkpoints / "step-12.safetensors.partial").write_text("")
    order = [c.path.stem for c in run.checkpoint_files()]
    assert order == ["step-00000004", "step-00000008", "epoch-0001", "step-00000012", "epoch-0002", "last"]
    assert CheckpointFile.parse(run.checkpoint_path("epoch-0002")).epoch == 2
    removed = run.prune_checkpoints(keep_last=1)
    assert sorted(p.stem for p in removed) == ["epoch-0001", "step-00000004", "step-00000008"]
    assert [c.path.stem for c in run.checkpoint_files()] == ["step-00000012", "epoch-0002", "last"]
    assert run.prune_checkpoints(keep_last=0) == []


def test_states_count_only_when_complete(tmp_path):
    run = RunDir(tmp_path / "r")
    info = TrainerInfo(step=4, epoch=1, position=0, samples_seen=8, effective_batch=2, skipped_nonfinite=0,
                       fingerprint="abc", world_size=1, index_digest="d", num_samples=16)
    for step in (2, 4, 6):
        run.state_path(step).mkdir(parents=True)
    (run.state_path(4) / "trainer.json").write_text(info.to_json())
    (run.states / "step-00000008.partial").mkdir()
    assert run.latest_state() == run.state_path(4)  # 6 has no trainer.json: it never completed
    assert run.read_trainer_info(run.latest_state()) == info
    assert list(run.partial_states()) == [run.states / "step-00000008.partial"]


def test_a_state_record_from_an_older_version_reads_and_a_broken_one_is_named(tmp_path):
    old = {"step": 4, "epoch": 1, "position": 0, "samples_seen": 8, "effective_batch": 2, "skipped_nonfinite": 0,
           "fingerprint": "abc", "world_size": 1, "something_else": True}
    assert TrainerInfo.from_json(json.dumps(old)).index_digest is None
    with pytest.raises(TunelabError, match="missing fingerprint"):
        TrainerInfo.from_json(json.dumps({k: v for k, v in old.items() if k != "fingerprint"}))


def test_open_run_refuses_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(TunelabError, match="not a run directory"):
        open_run(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert open_run(tmp_path).path == tmp_path
