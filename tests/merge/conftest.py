"""Three toy checkpoints (fp32, seeded) shared by the merge tests: a base and two 'finetunes'
that differ from it by small seeded deltas, as real finetunes of one base do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory) -> dict[str, Path]:
    from tunelab.models.checkpoint import new_checkpoint

    root = tmp_path_factory.mktemp("merge-models")
    base = new_checkpoint("toy", root / "base.safetensors", seed=1, dtype="fp32")
    tensors = load_file(base)
    out = {"base": base}
    for name, seed in (("ft1", 11), ("ft2", 12)):
        g = torch.Generator().manual_seed(seed)
        moved = {k: v + 0.02 * torch.randn(v.shape, generator=g) * (v.std() if v.numel() > 1 else 1.0)
                 for k, v in tensors.items()}
        save_file(moved, root / f"{name}.safetensors")
        out[name] = root / f"{name}.safetensors"
    save_file({k: v for k, v in load_file(out["ft2"]).items() if k.startswith("first_stage_model.")},
              root / "vae.safetensors")
    out["vae"] = root / "vae.safetensors"
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(path).items()}


PROBE = {"enabled": True, "every_n_steps": 0, "learn_samples": 2, "preserve_seeds": [0], "preserve_steps": 4,
         "timesteps": 2}


@pytest.fixture(scope="session")
def probed_run(tmp_path_factory):
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.models.checkpoint import new_checkpoint
    from tunelab.toy.world import make_world
    from tunelab.train.trainer import train

    root = tmp_path_factory.mktemp("probed")
    make_world(root / "img", n=12, seed=0, split="concept")
    build_index([f"folder:{root / 'img'}"], root / "i.parquet",
                IndexOptions(buckets=BucketConfig(resolution=80, min_side=32, max_side=128, step=32), holdout=0.25))
    base = new_checkpoint("toy", root / "base.safetensors", seed=5, dtype="fp32")
    from tests.train.conftest import write_run

    cfg = write_run(root / "r.toml", root / "i.parquet", root / "run", probe=PROBE, model={"base": str(base)},
                    train={"max_steps": 4}, save={"every_n_steps": 0},
                    grid={"prompts": ["astolfo, solo"], "seeds": [3], "steps": 2, "cfg": 2.0})
    train(cfg)
    return root / "run", base


