"""Architecture presets: `sdxl` (full size) and `toy` (tiny, same topology).

The configs ship inside the package (`tunelab/configs/<arch>/*.json`), so building a model never
fetches anything. Model code is diffusers' and transformers' own; this module only chooses the
hyper-parameters and builds the four modules, optionally on the meta device (shapes only, no
memory), which is how `tunelab model inspect --preset sdxl` and the trainer's `--dry-run` see a
2.6 B-parameter UNet on a laptop.

The toy preset keeps SDXL's topology: three UNet levels with two ResBlocks each (so the SGM block
ids IN00..IN08, M00, OUT00..OUT08 exist), transformers on levels 1 and 2 and in the middle, two CLIP
text encoders whose penultimate states are concatenated, a pooled projection from encoder 2, the
text-time additional embedding (pooled + 6 size/crop ids), and a four-level VAE (8x downsampling).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import torch

from tunelab.errors import TunelabError

ARCHES = ("sdxl", "toy")

# modelspec.architecture values that A1111 / ComfyUI / CivitAI display.
MODELSPEC_ARCH = {"sdxl": "stable-diffusion-xl-v1-base", "toy": "tunelab-toy-sdxl"}
RESOLUTION = {"sdxl": 1024, "toy": 64}


@dataclass(frozen=True)
class ArchSpec:
    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder_1: dict[str, Any]
    text_encoder_2: dict[str, Any]
    scheduler: dict[str, Any]

    @property
    def resolution(self) -> int:
        return RESOLUTION[self.name]


@dataclass
class Components:
    """The four modules of an SDXL-class model, plus what a checkpoint file carried besides them.

    `extras` are tensors the file had that no module owns (`v_pred`/`ztsnr` markers, scheduler
    buffers, `logit_scale`); `absent` are optional keys the file lacked (TE1's last layer, ...).
    Both are kept so that load -> save reproduces the file's tensors exactly. `metadata` is the
    file's header metadata and `source` the file or folder loaded (None: built in code), which a
    trained checkpoint names as its base.
    """

    arch: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder_1: torch.nn.Module
    text_encoder_2: torch.nn.Module
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str | None = None

    def modules(self) -> dict[str, torch.nn.Module]:
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder_1": self.text_encoder_1,
            "text_encoder_2": self.text_encoder_2,
        }


def _read_json(arch: str, name: str) -> dict[str, Any]:
    text = resources.files("tunelab").joinpath("configs", arch, f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


@lru_cache(maxsize=None)
def _load_spec(name: str) -> ArchSpec:
    parts = {n: _read_json(name, n) for n in ("unet", "vae", "scheduler")}
    if name == "toy":
        from tunelab.models.text import toy_text_encoder_configs

        te1, te2 = toy_text_encoder_configs()
    else:
        te1, te2 = _read_json(name, "text_encoder"), _read_json(name, "text_encoder_2")
    return ArchSpec(name=name, text_encoder_1=te1, text_encoder_2=te2, **parts)


def load_arch(name: str) -> ArchSpec:
    if name not in ARCHES:
        raise TunelabError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHES)}")
    return _load_spec(name)


def build_components(
    arch: str | ArchSpec,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> Components:
    """Build the UNet, VAE and both text encoders from a preset.

    device="meta" allocates nothing (shapes and dtypes only); device="empty" puts parameters on
    meta but keeps buffers real, ready for `load_state_dict(..., assign=True)` from a file. A seed
    makes the random initialisation reproducible (diffusers / transformers default initialisers);
    an accelerator device builds the weights there directly (its own random stream, not the CPU's).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = load_arch(arch) if isinstance(arch, str) else arch
    if seed is not None:
        torch.manual_seed(seed)
    # meta: modules are created without storage; cpu/cuda: real, randomly initialised weights.
    if str(device) == "meta":
        ctx = torch.device("meta")
    elif str(device) == "empty":
        from accelerate import init_empty_weights

        ctx, device = init_empty_weights(include_buffers=False), "meta"
    elif str(device) == "cpu":
        ctx = contextlib.nullcontext()
    else:
        ctx = torch.device(device)
    with ctx:
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
        te1 = CLIPTextModel(CLIPTextConfig(**spec.text_encoder_1))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2))
    comps = Components(spec.name, unet, vae, te1, te2)
    for module in comps.modules().values():
        module.eval()  # dropout-free either way; training code switches modes explicitly
        # Cast only when asked: diffusers warns on any .to() with a dtype.
        if dtype != torch.float32:
            module.to(dtype=dtype)
    return comps


def scheduler_config(arch: str) -> dict[str, Any]:
    return dict(load_arch(arch).scheduler)
