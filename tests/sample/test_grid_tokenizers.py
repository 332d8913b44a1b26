"""`tunelab grid` checks every checkpoint's tokenizers from its header before loading any (it used
to load the whole SDXL file, 19 GB of RAM, and only then refuse)."""

from __future__ import annotations

import pytest

from tests.sdxl_fakes import sdxl_header_file
from tunelab.errors import TunelabError


@pytest.fixture
def loads(monkeypatch):
    """Checkpoint loads, counted; an sdxl fake would fail to load anyway (it holds two tensors)."""
    import tunelab.models.checkpoint as ckpt

    seen: list[str] = []
    real = ckpt.load_checkpoint

    def counting(path, *args, **kwargs):
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "load_checkpoint", counting)
    return seen


def _grid(*args):
    from typer.testing import CliRunner

    from tunelab.cli import app

    return CliRunner().invoke(app, ["grid", *map(str, args)])


def test_an_sdxl_file_without_tokenizers_is_refused_before_loading(tmp_path, loads, toy_checkpoint):
    sdxl = sdxl_header_file(tmp_path / "sdxl.safetensors")
    # the toy checkpoint comes first: nothing may load before the sdxl one is refused
    res = _grid(toy_checkpoint, sdxl, "-p", "red star", "--steps", 1, "--out", tmp_path / "g")
    assert isinstance(res.exception, TunelabError), res.output
    assert "--tokenizers = 'auto'" in str(res.exception) and "tokenizer_2/" in str(res.exception)
    res = _grid(sdxl, "--tokenizers", "toy", "-p", "red star", "--out", tmp_path / "g")
    assert isinstance(res.exception, TunelabError) and "718 tokens" in str(res.exception)
    assert loads == []


def test_toy_checkpoints_still_use_their_own_tokenizers(tmp_path, loads, toy_checkpoint):
    res = _grid(toy_checkpoint, "-p", "red star", "--steps", 1, "--width", 64, "--height", 64, "--out", tmp_path / "g")
    assert res.exit_code == 0, res.output
    assert loads == [str(toy_checkpoint)]


def test_load_for_sampling_checks_before_loading(tmp_path, loads):
    from tunelab.sample.grid import GridSpec, load_for_sampling

    sdxl = sdxl_header_file(tmp_path / "sdxl.safetensors")
    with pytest.raises(TunelabError, match="single-file sdxl checkpoint"):
        load_for_sampling(str(sdxl), GridSpec(checkpoints=[str(sdxl)]))
    assert loads == []
