"""Models for the trainer's building blocks: full-size SDXL on the meta device (shapes only, no
memory) and a real toy model, each built once per session; a toy dataset index and toy run files
for the trainer's end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sdxl_meta():
    from tunelab.models.arch import build_components

    return build_components("sdxl", device="meta")


@pytest.fixture(scope="session")
def toy():
    from tunelab.models.arch import build_components

    return build_components("toy", seed=0)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """24 toy images (3 buckets: 9 + 8 + 7) and their index."""
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.toy.world import make_world

    root = tmp_path_factory.mktemp("world")
    make_world(root / "images", n=24, seed=0)
    opts = IndexOptions(buckets=BucketConfig(resolution=80, min_side=32, max_side=128, step=32))
    build_index([f"folder:{root / 'images'}"], root / "index.parquet", opts)
    return root / "index.parquet"


def write_run(path: Path, index: Path, out: Path, **sections) -> Path:
    """A toy run file; `sections` override {section: {key: value}} (dotted sections allowed)."""
    base = {
        "run": {"name": "t", "output_dir": str(out), "seed": 3},
        "model": {"base": "toy", "max_chunks": 2},
        "data": {"index": str(index)},
        "train": {"batch_size": 2, "grad_accumulation": 1, "max_steps": 6, "mixed_precision": "no",
                  "gradient_checkpointing": False},
        "train.parts": {"text_encoder": "on"},
        "optim": {"lr_unet": 1e-4, "lr_text_encoder_1": 1e-5, "lr_text_encoder_2": 1e-5},
        "save": {"every_n_steps": 2, "every_n_epochs": 0, "dtype": "fp32"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: quotes, backslashes and control characters escaped
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)
