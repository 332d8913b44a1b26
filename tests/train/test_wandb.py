"""`[log] wandb = true`: an optional dependency, off by default, offline unless asked. Without the
package the run file is refused when it is loaded (before any model), naming the install command;
with it, rank 0's MetricsLogger sends the same scalars and the grid image. The suite runs without
wandb: the package is hidden when installed, and a stand-in module records the calls."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli
from tunelab.config import RunConfig, load_config, parse_config
from tunelab.errors import TunelabError
from tunelab.train.metrics import MetricsLogger, WandbSettings

from .conftest import write_run


@pytest.fixture
def no_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec says None


def test_defaults_are_off_and_offline() -> None:
    log = RunConfig().log
    assert log.wandb is False and log.wandb_mode == "offline" and log.wandb_project == "tunelab"
    assert WandbSettings.from_config(RunConfig(), Path("run")) is None


def test_missing_wandb_is_refused_when_the_run_file_loads(tmp_path: Path, no_wandb) -> None:
    path = write_run(tmp_path / "r.toml", tmp_path / "none.parquet", tmp_path / "run", log={"wandb": True})
    with pytest.raises(TunelabError, match=r"pip install 'tunelab\[wandb\]'") as err:
        load_config(path)
    assert "log.wandb = true" in str(err.value) and "log.wandb = false" in str(err.value)
    # A run's resolved config.json still reads where wandb is missing (grids, reports).
    assert parse_config({"log": {"wandb": True}}).log.wandb is True
    # The library path checks again when the logger starts, with the same message.
    settings = WandbSettings.from_config(parse_config({"log": {"wandb": True}}), tmp_path / "run")
    with pytest.raises(TunelabError, match=r"tunelab\[wandb\]"):
        MetricsLogger(tmp_path / "run" / "events", tmp_path / "run" / "m.parquet", True, wandb=settings)
    assert not (tmp_path / "run" / "events").exists()  # refused before tensorboard wrote anything


def test_config_check_and_dry_run_name_the_extra(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; the in-process test above covers the refusal")
    path = write_run(tmp_path / "r.toml", tmp_path / "none.parquet", tmp_path / "run", log={"wandb": True})
    for args in (("config", "check", path), ("train", path, "--dry-run")):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and "pip install 'tunelab[wandb]'" in proc.stderr and "Traceback" not in proc.stderr


class _FakeRun:
    def __init__(self, **init):
        self.init, self.logged, self.finished = init, [], False

    def log(self, data: dict, step: int) -> None:
        self.logged.append((step, data))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        module.runs.append(_FakeRun(**kwargs))
        return module.runs[-1]

    module.init = init
    module.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_logger_sends_scalars_and_grid_to_wandb_on_rank_0(tmp_path: Path, fake_wandb) -> None:
    cfg = parse_config({"run": {"name": "astolfo"}, "log": {"wandb": True, "wandb_project": "p"}})
    settings = WandbSettings.from_config(cfg, tmp_path / "run")
    MetricsLogger(tmp_path / "other" / "events", tmp_path / "other" / "m.parquet", False, wandb=settings).close()
    assert fake_wandb.runs == []  # ranks other than 0 never start W&B
    logger = MetricsLogger(tmp_path / "run" / "events", tmp_path / "run" / "m.parquet", True, resume_step=4,
                           wandb=settings)
    logger.log(5, {"loss": 0.25, "lr/unet": 1e-5})
    grid = tmp_path / "grid.png"
    Image.new("RGB", (8, 8)).save(grid)
    logger.log_image("grid", grid, 5)
    logger.close()
    (run,) = fake_wandb.runs
    assert run.init["mode"] == "offline" and run.init["project"] == "p" and run.init["group"] == "astolfo"
    assert run.init["dir"] == str(tmp_path / "run") and run.init["config"]["log"]["wandb"] is True
    assert "resumed at step 4" in run.init["notes"]
    assert run.logged == [(5, {"loss": 0.25, "lr/unet": 1e-5}), (5, {"grid": ("image", str(grid))}),
                          (5, {"grid/rendered": 1.0})]
    assert run.finished and (tmp_path / "run" / "m.parquet").exists()  # tensorboard + parquet as before
