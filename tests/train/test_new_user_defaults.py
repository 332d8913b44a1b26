"""What a new user hits with the defaults (issue 20, items 1, 2 and 4), each forced:

1. tokenizers default to the base's own; a toy / SDXL mismatch is refused before any weight loads
   (`config check`, `train --dry-run`, `train`);
2. the in-training grid renders under every precision the run file accepts, and the modules come
   back in the dtypes training keeps them in;
3. prompt truncation is a count (banner, `prompts_truncated` metric, one warning), and the default
   max_chunks keeps 225 tokens.

Tiny toy runs, in-process."""

from __future__ import annotations

import logging

import pyarrow.parquet as pq
import pytest
import torch

from tests.sdxl_fakes import sdxl_header_file, sdxl_sized_tokenizers
from tests.train.conftest import write_run
from tunelab.config import load_config
from tunelab.errors import TunelabError


@pytest.fixture(autouse=True)
def _fresh_accelerator():
    """accelerate keeps one AcceleratorState per process, fixed at the first precision it saw;
    these tests change precision between in-process runs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _no_weights(monkeypatch):
    """Make any weight load fail the test: the refusals must come from headers alone."""
    import tunelab.models.checkpoint as ckpt

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the tokenizers were checked")

    monkeypatch.setattr(ckpt, "load_checkpoint", refuse)


def _check(run_file):
    from typer.testing import CliRunner

    from tunelab.cli import app

    return CliRunner().invoke(app, ["config", "check", str(run_file)])


# --- 1. tokenizers ---------------------------------------------------------------------------------------


def test_an_sdxl_base_with_default_tokenizers_is_refused_before_loading(tmp_path, world, monkeypatch):
    from tunelab.train.trainer import train

    _no_weights(monkeypatch)
    sdxl = sdxl_header_file(tmp_path / "sdxl.safetensors")
    run_file = write_run(tmp_path / "run.toml", world, tmp_path / "run", model={"base": str(sdxl)})
    model = run_file.read_text().split("[model]")[1].split("[")[0]
    assert "tokenizers" not in model  # the default, as a new user leaves it

    res = _check(run_file)
    assert isinstance(res.exception, TunelabError), res.output
    assert "model.tokenizers = 'auto'" in str(res.exception) and "hf download" in str(res.exception)
    for dry_run in (True, False):
        with pytest.raises(TunelabError, match="model.tokenizers = 'auto'.*single-file sdxl"):
            train(load_config(run_file), dry_run=dry_run)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_toy_tokenizers_with_an_sdxl_base_are_refused_before_loading(tmp_path, world, monkeypatch):
    from tunelab.train.trainer import train

    _no_weights(monkeypatch)
    sdxl = sdxl_header_file(tmp_path / "sdxl.safetensors")
    run_file = write_run(tmp_path / "run.toml", world, tmp_path / "run", model={"base": str(sdxl), "tokenizers": "toy"})
    res = _check(run_file)  # used to print "tokenizers: toy" and OK
    assert isinstance(res.exception, TunelabError) and "718 tokens" in str(res.exception)
    with pytest.raises(TunelabError, match="model.tokenizers = 'toy'.*718 tokens"):
        train(load_config(run_file), dry_run=True)
    with pytest.raises(TunelabError, match="model.tokenizers = 'toy'"):
        train(load_config(run_file))


def test_sdxl_tokenizers_with_a_toy_base_are_refused_and_a_folder_is_accepted(tmp_path, world):
    folder = sdxl_sized_tokenizers(tmp_path / "sdxl-tokenizers")
    toy_run = write_run(tmp_path / "toy.toml", world, tmp_path / "run", model={"tokenizers": str(folder)})
    res = _check(toy_run)
    assert isinstance(res.exception, TunelabError) and "49,408 tokens" in str(res.exception)

    sdxl = sdxl_header_file(tmp_path / "sdxl.safetensors")
    good = write_run(tmp_path / "sdxl.toml", world, tmp_path / "run", model={"base": str(sdxl), "tokenizers": str(folder)})
    res = _check(good)
    assert res.exit_code == 0, res.output
    assert f"tokenizers: {folder}" in res.output


def test_toy_defaults_resolve_to_toy_tokenizers(tmp_path, world):
    res = _check(write_run(tmp_path / "run.toml", world, tmp_path / "run"))
    assert res.exit_code == 0, res.output
    assert "tokenizers: auto -> toy" in res.output


# --- 2. the in-training grid under every precision ---------------------------------------------------------


class _DtypeRecorder:
    """After the STEP grid: the dtype each module is in (it must be the one training keeps)."""

    every_n_steps, all_ranks = 1, False

    def __init__(self):
        self.seen: list[dict[str, torch.dtype]] = []

    def due(self, event, ctx):
        from tunelab.train.callbacks import Callback

        return Callback.due(self, event, ctx)

    def on_start(self, ctx): ...

    def on_checkpoint(self, ctx): ...

    def on_end(self, ctx): ...

    def on_step(self, ctx):
        self.seen.append({n: next(m.parameters()).dtype for n, m in ctx.comps.modules().items()})


@pytest.mark.parametrize("precision, full_bf16, frozen_dtype", [
    ("no", False, torch.float32),
    ("bf16", False, torch.bfloat16),  # the default: a bf16 VAE beside a float32 UNet crashed the grid
    ("bf16", True, torch.bfloat16),  # everything bf16, but accelerate's UNet returns float32
])
def test_in_training_grid_renders_under_every_precision(tmp_path, world, precision, full_bf16, frozen_dtype):
    from tunelab.train.callbacks import Callbacks, GridCallback
    from tunelab.train.trainer import train

    run = tmp_path / "run"
    run_file = write_run(tmp_path / "run.toml", world, run, train={"mixed_precision": precision, "full_bf16": full_bf16,
                                                                     "max_steps": 2},
                         save={"every_n_steps": 0}, grid={"prompts": ["red star"], "steps": 2},
                         **{"train.parts": {"text_encoder": "off"}})  # frozen encoders: held in the autocast dtype
    recorder = _DtypeRecorder()
    result = train(load_config(run_file), callbacks=Callbacks([GridCallback(every_n_steps=1), recorder]))
    assert result.steps == 2
    for step in ("step-00000001", "step-00000002"):  # the STEP grid and the END grid
        assert list((run / "samples" / step).glob("grid-*.png")), step
    trained = torch.bfloat16 if full_bf16 else torch.float32
    assert recorder.seen == [{"unet": trained, "vae": frozen_dtype, "text_encoder_1": frozen_dtype,
                              "text_encoder_2": frozen_dtype}]


def test_render_restores_the_weights_bit_for_bit(sample_components_bf16_vae):
    from tunelab.models.text import load_tokenizers
    from tunelab.sample.grid import GridSpec, render_grid_from_components
    from tunelab.sample.pipeline import SampleSettings

    comps, out = sample_components_bf16_vae
    before = {k: v.clone() for k, v in comps.vae.state_dict().items()}
    render_grid_from_components(comps, load_tokenizers("toy"), GridSpec(base=SampleSettings(prompt="red", steps=1)),
                                out, step=1)
    after = comps.vae.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], before[k]) for k in before)


@pytest.fixture
def sample_components_bf16_vae(tmp_path, toy_checkpoint):
    from tunelab.models.checkpoint import load_checkpoint

    comps = load_checkpoint(toy_checkpoint)
    comps.vae.to(dtype=torch.bfloat16)
    return comps, tmp_path / "grid"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without CUDA")
def test_fp16_is_refused_on_the_cpu_and_full_bf16_needs_bf16(tmp_path, world):
    from tunelab.train.trainer import train

    fp16 = write_run(tmp_path / "fp16.toml", world, tmp_path / "run", train={"mixed_precision": "fp16"})
    with pytest.raises(TunelabError, match="'fp16' needs a CUDA GPU; use 'bf16' or 'no' on the CPU"):
        train(load_config(fp16))
    no_bf16 = write_run(tmp_path / "nb.toml", world, tmp_path / "run", train={"mixed_precision": "no", "full_bf16": True})
    with pytest.raises(TunelabError, match="full_bf16 = true needs train.mixed_precision = 'bf16', not 'no'"):
        load_config(no_bf16)  # accepted before, then crashed in the first step (bf16 weights, float32 inputs)


# --- 4. truncation is a count -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_world(tmp_path_factory):
    """8 toy images, 3 of them with 89-token tags (more than one 75-token chunk), no holdout."""
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.toy.world import make_world

    root = tmp_path_factory.mktemp("long")
    make_world(root / "images", n=8, seed=0)
    for i in range(3):
        (root / "images" / f"toy_{i:05d}.txt").write_text(", ".join(f"tag{j:02d}" for j in range(15)))  # 89 tokens
    build_index([f"folder:{root / 'images'}"], root / "index.parquet",
                IndexOptions(buckets=BucketConfig(resolution=64, min_side=64, max_side=64, step=32)))
    return root / "index.parquet"


def test_default_max_chunks_keeps_225_tokens():
    from tunelab.config import ModelSection

    assert ModelSection().max_chunks == 3


def test_banner_counts_truncated_prompts_once(tmp_path, long_world, caplog):
    from tunelab.train.trainer import train

    run_file = write_run(tmp_path / "run.toml", long_world, tmp_path / "run", model={"max_chunks": 1})
    with caplog.at_level(logging.INFO, logger="tunelab.train.trainer"):
        train(load_config(run_file), dry_run=True)
    assert "prompts: 3 of all 8 prompts (train split, epoch 0) are longer than max_chunks=1 (75 tokens)" in caplog.text
    caplog.clear()
    run_file = write_run(tmp_path / "run2.toml", long_world, tmp_path / "run")  # max_chunks 2: 150 tokens fit
    with caplog.at_level(logging.INFO, logger="tunelab.train.trainer"):
        train(load_config(run_file), dry_run=True)
    assert "prompts: 0 of all 8 prompts" in caplog.text


def test_the_banner_count_samples_big_splits(long_world):
    import numpy as np

    from tunelab.data.captions import CaptionConfig
    from tunelab.data.loader import open_index
    from tunelab.data.preview import count_split_truncation
    from tunelab.models.text import load_tokenizers

    index, toks = open_index(long_world), load_tokenizers("toy")
    rows = np.arange(8)
    one = count_split_truncation(index, rows, CaptionConfig(), 0, toks, 1, limit=5)
    assert (one.checked, one.total) == (5, 8) and one == count_split_truncation(index, rows, CaptionConfig(), 0, toks, 1, limit=5)
    assert "of 5 prompts sampled from 8" in one.line()


def test_training_logs_prompts_truncated_and_warns_once(tmp_path, long_world, caplog):
    from tunelab.train.trainer import train

    run = tmp_path / "run"
    run_file = write_run(tmp_path / "run.toml", long_world, run, model={"max_chunks": 1},
                         train={"batch_size": 4, "max_steps": 4}, save={"every_n_steps": 0})
    with caplog.at_level(logging.DEBUG, logger="tunelab"):
        train(load_config(run_file))
    rows = [r for r in pq.read_table(run / "metrics.parquet").to_pylist() if r["tag"] == "prompts_truncated"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sum(r["value"] for r in rows) == 6  # 3 of 8 prompts per epoch, two epochs of 2 steps each
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "prompts_truncated" in warnings[0].getMessage()  # once per run, not per step
