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
