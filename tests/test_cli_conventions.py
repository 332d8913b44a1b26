"""One convention for every command (docs/architecture.md, "Command-line conventions"): outputs are
`--out/-o`, inputs are positional, one option name per setting; renamed spellings still work for
one release and say so on stderr. Checked on the command tree itself, then by running the commands
(in-process: each subprocess start costs seconds of imports; one real process checks stderr)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from tests.conftest import run_cli
from tunelab.cli import app

# The spellings renamed in this release (now --arch, --latents, --n-prompts / --n-images); the
# positional OUT of `data index` is not a parameter (see `data index`'s extra arguments).
DEPRECATED = {"--preset", "--cache", "-c", "--n"}


def _commands(group=None, path=()):
    group = group or get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def _visible(cmd):
    return [p for p in cmd.params if not getattr(p, "hidden", False) and p.name != "help"]


def test_outputs_are_out_options_and_no_output_is_positional():
    for name, cmd in _commands():
        for p in _visible(cmd):
            if p.param_type_name == "argument":
                assert p.name not in ("out", "output", "dest"), f"{name}: positional output {p.name}"
            if p.name == "out":
                assert p.param_type_name == "option" and p.opts == ["--out", "-o"], f"{name}: {p.opts}"


def test_one_option_name_per_setting():
    spellings: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for _, cmd in _commands():
        for p in _visible(cmd):
            if p.param_type_name == "option":
                spellings[p.name].add(tuple(p.opts))
    assert {n: s for n, s in spellings.items() if len(s) > 1} == {}
    assert "n" not in spellings and "preset" not in spellings and "cache" not in spellings


def test_old_spellings_are_hidden_and_only_the_known_ones():
    for name, cmd in _commands():
        for p in cmd.params:
            if getattr(p, "hidden", False):
                assert set(p.opts) <= DEPRECATED, f"{name}: hidden {p.opts}"
            else:
                assert not set(p.opts) & DEPRECATED, f"{name}: {p.opts} should be hidden"


# --- running them -------------------------------------------------------------------------------------


def _warning(old: str, new: str) -> str:
    return f"warning: {old} is deprecated; use {new} (the old spelling goes in the next release)\n"


def _invoke(*args, ok: bool = True):
    res = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, (res.output, res.exception)
    return res


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Four toy images, written by the new spelling of `toy world`."""
    root = tmp_path_factory.mktemp("conv")
    res = _invoke("toy", "world", "-o", root / "w", "--n-images", 4)
    assert res.stderr == "" and len(list((root / "w").glob("*.png"))) == 4
    return root / "w"


INDEX_OPTS = ("--resolution", 64, "--min-side", 32, "--max-side", 128, "--step", 32)


@pytest.fixture(scope="module")
def index(world) -> Path:
    out = world.parent / "index.parquet"
    res = _invoke("data", "index", "--out", out, "-s", f"folder:{world}", *INDEX_OPTS)
    assert res.stderr.count("warning") == 0 and out.is_file()
    return out


def test_data_index_positional_out_still_works(tmp_path, world, index):
    old = tmp_path / "old.parquet"
    res = _invoke("data", "index", old, "-s", f"folder:{world}", *INDEX_OPTS)
    assert res.stderr.startswith(_warning("the positional OUT", "--out"))
    assert old.read_bytes() == index.read_bytes()  # the same index, by either spelling
    res = _invoke("data", "index", old, "--out", old, "-s", f"folder:{world}", ok=False)
    assert "give only --out" in str(res.exception)
    res = _invoke("data", "index", "-s", f"folder:{world}", ok=False)
    assert "missing option --out" in str(res.exception)


def test_data_verify_latents_and_old_cache(tmp_path, index):
    from tunelab.data.latents import cache_latents
    from tunelab.models.arch import build_components

    latents = tmp_path / "latents"
    cache_latents(index, latents, build_components("toy", seed=0).vae, progress=False)
    new = _invoke("data", "verify", index, "--latents", latents)
    assert new.stderr.count("warning") == 0 and "0 missing" in new.stdout
    for old in ("--cache", "-c"):
        res = _invoke("data", "verify", index, old, latents)
        assert res.stderr.startswith(_warning("--cache", "--latents")) and res.stdout == new.stdout
    res = _invoke("data", "verify", index, "--cache", latents, "--latents", latents, ok=False)
    assert "give only --latents" in str(res.exception)
    res = _invoke("data", "verify", index, ok=False)
    assert "missing option --latents" in str(res.exception)


def test_preview_n_prompts_and_old_n(index):
    new = _invoke("data", "preview", index, "--n-prompts", 2)
    assert "2 prompts" in new.stdout and new.stderr.count("warning") == 0
    old = _invoke("data", "preview", index, "--n", 2)
    assert old.stderr.startswith(_warning("--n", "--n-prompts")) and old.stdout == new.stdout
    res = _invoke("data", "preview", index, "--n", 2, "--n-prompts", 3, ok=False)
    assert "give only --n-prompts" in str(res.exception)


def test_inspect_arch_and_old_preset():
    new = _invoke("model", "inspect", "--arch", "toy", "--json")
    assert new.stderr == "" and '"preset": "toy"' in new.stdout
    old = _invoke("model", "inspect", "--preset", "toy", "--json")
    assert old.stderr == _warning("--preset", "--arch") and old.stdout == new.stdout
    res = _invoke("model", "inspect", ok=False)
    assert "give either a FILE or --arch" in str(res.exception)


def test_toy_world_old_n_warns_on_stderr_of_a_real_process(tmp_path):
    proc = run_cli("toy", "world", "--out", tmp_path / "w", "--n", 2)
    assert proc.stderr.splitlines()[0] == _warning("--n", "--n-images").strip()
    assert "wrote 2 images" in proc.stdout and len(list((tmp_path / "w").glob("*.png"))) == 2
    proc = run_cli("toy", "world", "--out", tmp_path / "w", "--n", 2, "--n-images", 3, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("give only --n-images")
