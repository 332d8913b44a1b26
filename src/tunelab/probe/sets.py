"""A probe's fixed inputs: the learn and preserve sets, the timesteps and the noise.

Every checkpoint a probe measures sees exactly the same inputs, so two checkpoints' numbers
differ only by their weights:

- **learn**: images the finetune was *not* trained on but should now do well on: the index's
  holdout split (`tunelab data index --holdout 0.05`), the training rows, or another index; the
  first N rows by key hash, their prompts chosen as the run's captions settings choose them
  (epoch 0, without caption dropout);
- **preserve**: what the base knew and the finetune data never shows. The base itself draws it:
  fixed prompts (`car, wrc`, `man with car`, ... ; the toy world's preserve looks) with fixed
  seeds, Euler, encoded back to latents. Nothing has to be collected or downloaded;
- **timesteps**: K stratified quantiles (k + 0.5) / K of the run's timestep distribution
  (uniform indices for epsilon / v; logit-normal with the shift for flow), the lowest third of
  the quantiles the "low" noise band, then "mid" and "high";
- **noise**: one N(0, 1) draw per (set, sample, timestep) from a CPU generator seeded by
  (probe seed, set, sample, timestep): the same numbers on every device and every call.

A set is written as one `.safetensors` file (latents, and prompts / sizes in its metadata), so
`tunelab probe` after training measures the checkpoints on the inputs the in-training probe used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.config import ProbeSection, RunConfig
    from tunelab.train.objectives import Objective

log = logging.getLogger(__name__)

SET_NAMES = ("learn", "preserve")
BANDS = ("low", "mid", "high")  # noise bands: thirds of the timestep distribution's quantiles

# The preserve set's prompts when the run file names none: concepts a finetune usually does not
# show (the field's "did it forget cars?"), and the empty prompt (the unconditional branch CFG uses).
SDXL_PRESERVE_PROMPTS = ("car, wrc", "man with car", "city street at night", "1girl, solo", "")
PRESERVE_CFG = {"sdxl": 5.0, "toy": 2.0}  # toy: the CFG its base draws best at (docs/toy-world.md)


def default_preserve_prompts(arch: str) -> list[str]:
    if arch == "toy":
        from tunelab.toy.world import preserve_looks, prompt_of

        return [prompt_of(look) for look in preserve_looks()[::2]]  # 8 looks: cars and the other base shapes
    return list(SDXL_PRESERVE_PROMPTS)


def preserve_scale(cfg: "ProbeSection", arch: str) -> float:
    """The CFG scale the preserve images (and image scores) are rendered at."""
    return cfg.preserve_cfg if cfg.preserve_cfg is not None else PRESERVE_CFG.get(arch, 5.0)


@dataclass
class ProbeSet:
    """One set's fixed samples: scaled latents (what the UNet denoises) with prompts and SDXL sizes."""

    name: str
    latents: list[torch.Tensor]  # each (C, h, w) float32, times the VAE's scaling factor
    prompts: list[str]
    original_size_hw: list[tuple[int, int]]
    crop_top_left: list[tuple[int, int]]
    target_size_hw: list[tuple[int, int]]
    keys: list[str] = field(default_factory=list)  # where each sample came from (index key or prompt#seed)

    def __len__(self) -> int:
        return len(self.latents)

    def meta(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "original_size_hw": self.original_size_hw,
                "crop_top_left": self.crop_top_left, "target_size_hw": self.target_size_hw, "keys": self.keys}


def save_sets(sets: Sequence[ProbeSet], path: Path, fingerprint: str) -> Path:
    """All sets in one `.safetensors` file (written beside, then renamed)."""
    from safetensors.torch import save_file

    tensors = {f"{s.name}.{i}": t.contiguous() for s in sets for i, t in enumerate(s.latents)}
    meta = {"tunelab_probe_sets": json.dumps({s.name: s.meta() for s in sets}), "fingerprint": fingerprint}
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_sets(path: Path, fingerprint: str | None = None) -> list[ProbeSet] | None:
    """The sets of a file `save_sets` wrote; None when missing or made for other settings."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            return None
        sets = []
        for name, m in json.loads(meta["tunelab_probe_sets"]).items():
            latents = [f.get_tensor(f"{name}.{i}") for i in range(len(m["prompts"]))]
            sets.append(ProbeSet(name, latents, m["prompts"], [tuple(x) for x in m["original_size_hw"]],
                                 [tuple(x) for x in m["crop_top_left"]], [tuple(x) for x in m["target_size_hw"]],
                                 m.get("keys", [])))
    return sets


# --- timesteps and noise ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTimesteps:
    values: torch.Tensor  # (K,) UNet timesteps: long indices (epsilon / v) or float t * 1000 (flow)
    quantiles: tuple[float, ...]  # the quantile of the run's timestep distribution each one sits at
    bands: tuple[str, ...]  # "low" / "mid" / "high" noise

    def __len__(self) -> int:
        return len(self.quantiles)


def probe_timesteps(objective: "Objective", k: int) -> ProbeTimesteps:
    """K stratified quantiles of the timesteps `objective.sample` draws (module docstring)."""
    from tunelab.train.objectives import FLOW_TIMESTEP_SCALE, shift_timesteps

    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    if objective.prediction == "flow":
        z = torch.special.ndtri(q)
        t = shift_timesteps(torch.sigmoid(objective.flow_logit_mean + objective.flow_logit_std * z), objective.flow_shift)
        values = (t * FLOW_TIMESTEP_SCALE).float()
    else:  # randint(0, T): the quantile q is index floor(q T)
        values = (q * objective.num_train_timesteps).floor().long().clamp(max=objective.num_train_timesteps - 1)
    bands = tuple(BANDS[min(2, int(3 * float(x)))] for x in q)
    return ProbeTimesteps(values, tuple(float(x) for x in q), bands)


def probe_noise(seed: int, set_index: int, sample: int, k: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed noise of one (set, sample, timestep): float32 from a CPU generator."""
    from tunelab.train.step import batch_seed

    gen = torch.Generator("cpu").manual_seed(batch_seed(seed, set_index, sample * 4096 + k))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


# --- building the sets -----------------------------------------------------------------------------------


def check_learn_rows(p: "ProbeSection", rows: Sequence[int], path: str | Path) -> None:
    """A learn split without rows is refused with the fix (by `config check` and at the probe's start)."""
    if len(rows) == 0:
        raise TunelabError(f"probe.learn = {p.learn!r} but {path} has no {p.learn} rows; rebuild the index with "
                           "`tunelab data index ... --holdout 0.05`, or set probe.learn = 'train' (it then measures "
                           "fit to the training images, not generalisation)")


def learn_set(cfg: "RunConfig", vae: torch.nn.Module, device: torch.device | str = "cpu") -> ProbeSet:
    """The learn set of `cfg.probe` (its `learn`, `learn_samples`), latents scaled for the UNet."""
    from tunelab.data.index import key_uniform
    from tunelab.data.latents import open_latents
    from tunelab.data.loader import TrainDataset, collate, open_index
    from tunelab.train.step import batch_latents

    p = cfg.probe
    own = p.learn in ("holdout", "train")
    path = cfg.data.index if own else p.learn
    if not path or not Path(path).is_file():
        what = "data.index" if own else "probe.learn"
        raise TunelabError(f"the probe's learn set needs an index: {what} = {path!r} does not exist "
                           "(build one with `tunelab data index`)")
    index = open_index(path)
    rows = index.rows_in_split(p.learn) if own else torch.arange(len(index)).numpy()
    check_learn_rows(p, rows, path)
    order = key_uniform(index.keys(rows.tolist()), p.seed).argsort(kind="stable")
    chosen = [int(rows[i]) for i in order[: p.learn_samples]]
    latents_dir = (cfg.data.latents if own else p.learn_latents) or None
    source = open_latents(latents_dir, index) if latents_dir else None
    captions = cfg.data.captions.model_copy(update={"caption_dropout": 0.0})
    data = TrainDataset(index, captions, seed=cfg.run.seed, latents=source, crop_conditioning=cfg.data.crop_conditioning)
    out = ProbeSet("learn", [], [], [], [], [])
    for row in chosen:
        batch = collate([data[(0, row)]])
        if batch is None:
            raise TunelabError(f"the probe's learn image at row {row} of {path} cannot be read (see the rejects log)")
        out.latents.append(batch_latents(batch, vae, device)[0].cpu())
        out.prompts.append(batch["prompt"][0])
        out.original_size_hw.append(tuple(batch["original_size_hw"][0].tolist()))
        out.crop_top_left.append(tuple(batch["crop_top_left"][0].tolist()))
        out.target_size_hw.append(tuple(batch["target_size_hw"][0].tolist()))
        out.keys.append(batch["key"][0])
    return out


@torch.no_grad()
def preserve_set(comps: Any, tokenizers: tuple[Any, Any], cfg: "ProbeSection", arch: str,
                 images_dir: Path | None = None, batch: int = 4) -> ProbeSet:
    """The preserve set: the base draws `cfg.preserve_prompts` (or the arch's) with fixed seeds;
    the images (kept in `images_dir` to look at) are encoded back to scaled latents."""
    from tunelab.sample.pipeline import SampleSettings, build_pipeline, generate_batch

    prompts = list(cfg.preserve_prompts) or default_preserve_prompts(arch)
    pairs = [(prompt, seed) for prompt in prompts for seed in cfg.preserve_seeds]
    settings = SampleSettings(steps=cfg.preserve_steps, cfg=preserve_scale(cfg, arch), sampler="Euler", max_chunks=1)
    model = build_pipeline(comps, tokenizers)
    vae = comps.vae
    out = ProbeSet("preserve", [], [], [], [], [])
    if images_dir is not None:
        images_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        images = generate_batch(model, [p for p, _ in chunk], [s for _, s in chunk], settings)
        for (prompt, seed), image in zip(chunk, images):
            pixels = torch.from_numpy(_array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1
            pixels = pixels.to(next(vae.parameters()).device, next(vae.parameters()).dtype)
            latent = vae.encode(pixels).latent_dist.mean.float()[0] * vae.config.scaling_factor
            h, w = image.height, image.width
            out.latents.append(latent.cpu())
            out.prompts.append(prompt)
            out.original_size_hw.append((h, w))
            out.crop_top_left.append((0, 0))
            out.target_size_hw.append((h, w))
            out.keys.append(f"{prompt}#{seed}")
            if images_dir is not None:
                image.save(images_dir / f"{len(out.latents) - 1:03d}-seed{seed}.png")
    return out


def _array(image: Any):
    import numpy as np

    return np.asarray(image.convert("RGB")).copy()
