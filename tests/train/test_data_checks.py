"""What `tunelab train` (and --dry-run, and `config check`) checks before the first step, beyond
the run file itself: the run file's [data.buckets] against the index's, the latent cache against
the index, a pickle base; and that only the main process prints the banner (issue 20)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.train.conftest import write_run
from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.train.trainer import train

BUILT_WITH = {"resolution": 80, "min_side": 32, "max_side": 128, "step": 32}  # the `world` fixture's index


def _config_check(monkeypatch, capsys, run_file: Path) -> tuple[int, str, str]:
    """`tunelab config check RUN` through the CLI's entry point, in-process (a subprocess costs seconds)."""
    from tunelab import cli

    monkeypatch.setattr(sys, "argv", ["tunelab", "config", "check", str(run_file)])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_file_buckets_that_differ_from_the_index_are_refused(tmp_path, world, monkeypatch, capsys):
    same = write_run(tmp_path / "same.toml", world, tmp_path / "r1", **{"data.buckets": BUILT_WITH})
    assert train(same, dry_run=True) is None
    code, out, _ = _config_check(monkeypatch, capsys, same)
    assert code == 0 and "24 images in 3 of the index's 5 buckets (resolution 80, sides 32-128, step 32)" in out

    other = write_run(tmp_path / "other.toml", world, tmp_path / "r2", **{"data.buckets": {**BUILT_WITH, "resolution": 96}})
    with pytest.raises(TunelabError, match=r"resolution = 96 \(the index has 80\).*tunelab data index --out .*"
                                           r"--resolution 96 --min-side 32 --max-side 128 --step 32"):
        train(other, dry_run=True)  # before: accepted, and training used the index's 80 without a word
    code, _, err = _config_check(monkeypatch, capsys, other)
    assert code == 2 and "delete [data.buckets] from the run file" in err and len(err.strip().splitlines()) == 1


def test_a_latent_cache_of_other_buckets_is_refused_before_training(tmp_path, world, monkeypatch, capsys):
    from tunelab.data.latents import _write_shard
    from tunelab.data.loader import IndexTable

    table = IndexTable(world)
    shards = tmp_path / "latents"  # every image at 64x64, as an index built at other settings would have it
    shards.mkdir()
    entries = {r["key"]: (np.zeros((4, 8, 8), np.float16), {"original_size": [64, 64], "crop_ltrb": [0, 0, 64, 64]})
               for r in table.records(range(len(table)))}
    _write_shard(shards, 0, entries)
    run_file = write_run(tmp_path / "r.toml", world, tmp_path / "r", data={"latents": str(shards)})
    # Before: --dry-run and config check passed, then collate failed mid-epoch with
    # "stack expects each tensor to be equal size".
    with pytest.raises(TunelabError, match=r"a 64x64 bucket .* puts it in (96x64|64x96).*tunelab data cache"):
        train(run_file, dry_run=True)
    code, _, err = _config_check(monkeypatch, capsys, run_file)
    assert code == 2 and "--out NEW_DIR" in err


def test_a_pickle_base_is_refused_with_the_command_that_converts_it(tmp_path, world, monkeypatch, capsys):
    ckpt = tmp_path / "base.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")  # never opened
    run_file = write_run(tmp_path / "p.toml", world, tmp_path / "p", model={"base": str(ckpt)})
    # Before: "pass --allow-pickle", which `tunelab train` does not have (and --dry-run read it as
    # a broken .safetensors header).
    fix = f"tunelab model convert {ckpt} --allow-pickle --out {tmp_path / 'base.safetensors'}"
    for dry_run in (True, False):
        with pytest.raises(TunelabError, match="model.base = .*refusing a pickle file") as err:
            train(run_file, dry_run=dry_run)
        assert fix in str(err.value)
    code, _, err = _config_check(monkeypatch, capsys, run_file)
    assert code == 2 and fix in err


def test_only_the_main_process_prints_the_banner(monkeypatch, tmp_path):
    from tunelab.run import RunDir
    from tunelab.train import trainer

    printed = []
    for main in (True, False):  # rank 0, then any other rank
        fake = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=main), callbacks=None, run=RunDir(tmp_path))
        monkeypatch.setattr(trainer, "setup", lambda *args, fake=fake, **kw: fake)
        monkeypatch.setattr(trainer, "banner", lambda s: printed.append(s.accelerator.is_main_process) or ["line"])
        monkeypatch.setattr(trainer, "loop", lambda s: "trained")
        assert trainer.train(RunConfig()) == "trained"
    assert printed == [True]  # before: every process of a multi-process launch printed it
    assert (tmp_path / "banner.txt").read_text() == "line\n"  # kept for the report, by rank 0 alone
