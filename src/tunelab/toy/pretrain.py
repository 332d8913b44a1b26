"""`tunelab toy pretrain`: the toy base model, trained from nothing on the toy world's base split.

Stages, each the product's own code where the product has it:

1. the base split (`toy.world`, split "base") and its index (`data.index`);
2. the VAE, an autoencoder over random crops of the base split (`vae_split`; its own small loop:
   the trainer does not train VAEs), then rescaled so latents times the preset's
   `scaling_factor` have unit spread, then read back through encode -> decode with the concept
   reader. A share of the base split wears cyan stripes (`stripe_share`, tagged `stripes`, never
   on a pink star), so the codec decodes the concept's marks and the base knows the word
   `stripes` without ever having seen `astolfo`;
3. the latent cache (`data.latents`) with that VAE;
4. UNet and both text encoders from random weights with the trainer (`train.trainer`): text
   encoders on, tags or caption per sample, captions dropped now and then (for CFG);
5. one fp16 SGM `.safetensors` (`toy-base.safetensors`), its settings in the metadata.

Everything is seeded; on one machine the same settings give the same file bit for bit. The file
shipped in the package (`tunelab/toy/assets/`) was made with `PretrainSettings()` defaults.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunelab.data.buckets import BucketConfig

log = logging.getLogger(__name__)

# Area 80 x 80 keeps the world's three sizes as their own buckets: 64x64, 96x64, 64x96
# (latents 8x8, 12x8, 8x12: the UNet's two downsamplings need sides divisible by 32 px).
TOY_BUCKETS = BucketConfig(resolution=80, min_side=32, max_side=128, step=32)
BASE_FILE = "toy-base.safetensors"


@dataclass(frozen=True)
class PretrainSettings:
    """What `pretrain` does; the defaults made the shipped base."""

    seed: int = 0
    images: int = 3000  # base-split images
    stripe_share: float = 0.2  # of them with cyan stripes, tagged `stripes` (never pink stars)
    vae_split: str = "base"  # what the autoencoder sees (a world of `images` images of this split)
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_crop: int = 32  # px: the autoencoder is convolutional, so crops train it 4x faster than whole images
    vae_lr: float = 4e-3
    steps: int = 4000  # optimizer steps of UNet + text encoders
    batch: int = 32
    lr_unet: float = 1e-3
    lr_text: float = 1e-3
    min_snr: float = 5.0  # min-SNR weighting: converges several times faster (Hang et al. 2023)
    warmup: int = 100
    caption_dropout: float = 0.1  # empty prompt now and then: the unconditional branch CFG needs

    @classmethod
    def tiny(cls, seed: int = 0) -> "PretrainSettings":
        """A few steps of everything: for tests of the pipeline, not for pictures."""
        return cls(seed=seed, images=24, vae_steps=3, vae_batch=4, steps=3, batch=4, warmup=1)


@dataclass
class PretrainResult:
    base: Path
    seconds: dict[str, float] = field(default_factory=dict)


def pretrain(out: str | Path, settings: PretrainSettings = PretrainSettings(), progress: bool = True) -> PretrainResult:
    """Pretrain the toy base into `out` (world, index, latents, run and `toy-base.safetensors`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    world, index = _world_and_index(out, s)
    seconds["world"] = time.perf_counter() - t

    t = time.perf_counter()
    comps = _fresh_components(s.seed)
    vae_world = world
    if s.vae_split != "base":
        from tunelab.toy.world import make_world

        vae_world = out / f"vae-world-{s.vae_split}"
        make_world(vae_world, n=s.images, seed=s.seed, split=s.vae_split, prefix="vae")
    losses = train_vae(comps.vae, vae_world, s, progress)
    scale_latents(comps.vae, _images(world, 256))
    seconds["vae"] = time.perf_counter() - t
    _report_vae(out, losses, vae_round_trip(comps.vae, world))

    t = time.perf_counter()
    from tunelab.data.latents import cache_latents
    from tunelab.models.checkpoint import save_checkpoint

    init = save_checkpoint(comps, out / "init.safetensors", dtype="fp32", title="tunelab toy base (VAE trained)")
    cache_latents(index, out / "latents", comps.vae, batch_size=64, progress=progress)
    seconds["cache"] = time.perf_counter() - t

    t = time.perf_counter()
    last = _train_unet(out, init, index, s)
    seconds["unet"] = time.perf_counter() - t

    base = _finish(last, out / BASE_FILE, s, seconds)
    log.info("toy base: %s (%.1f MiB) in %.0f s (%s)", base, base.stat().st_size / 2**20, sum(seconds.values()),
             ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return PretrainResult(base, seconds)


def _world_and_index(out: Path, s: PretrainSettings) -> tuple[Path, Path]:
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.toy.world import make_world

    world = out / "world"
    make_world(world, n=s.images, seed=s.seed, split="base", prefix="base", stripe_share=s.stripe_share)
    index = out / "index.parquet"
    build_index([f"folder:{world},prefix=base/"], index, IndexOptions(buckets=TOY_BUCKETS, seed=s.seed))
    return world, index


def _fresh_components(seed: int):
    from tunelab.models.arch import build_components

    return build_components("toy", seed=seed)


def _images(folder: Path, limit: int | None = None) -> list[torch.Tensor]:
    """The folder's PNGs in name order as (3, H, W) tensors in [-1, 1]."""
    return _images_of(sorted(folder.glob("*.png"))[:limit])


def _images_of(files: list[Path]) -> list[torch.Tensor]:
    from PIL import Image

    return [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
            for f in files]


def _crops(images: list[torch.Tensor], n: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """n random crops (on the latent grid, so crops see the same alignment as whole images)."""
    picks = torch.randint(len(images), (n,), generator=gen).tolist()
    out = []
    for i in picks:
        im = images[i]
        h, w = im.shape[1:]
        y = int(torch.randint((h - crop) // 8 + 1, (1,), generator=gen)) * 8
        x = int(torch.randint((w - crop) // 8 + 1, (1,), generator=gen)) * 8
        out.append(im[:, y:y + crop, x:x + crop])
    return torch.stack(out)


def train_vae(vae: torch.nn.Module, world: Path, s: PretrainSettings, progress: bool = True) -> list[float]:
    """Train the autoencoder on random crops: L1 + L2 reconstruction and SD's tiny KL weight (1e-6)."""
    from tqdm import tqdm

    images = _images(world)
    gen = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / s.vae_steps)))
    vae.train()
    losses = []
    bar = tqdm(range(s.vae_steps), desc="VAE", disable=not progress, unit="step")
    for _ in bar:
        x = _crops(images, s.vae_batch, s.vae_crop, gen)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-6 * post.kl().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    vae.eval()
    return losses


@torch.no_grad()
def vae_round_trip(vae: torch.nn.Module, world: Path, n: int = 96) -> dict[str, float]:
    """Encode and decode the world's first n images and read them back with the concept reader:
    the share of each attribute that survives the codec (what no UNet can draw if it is lost),
    and the mean squared error in [-1, 1]. Measured so that a bad VAE shows before the UNet's
    training, not after it."""
    from PIL import Image

    from tunelab.toy.reader import ATTRIBUTES, read
    from tunelab.toy.world import read_looks

    looks = list(read_looks(world).items())[:n]
    right = dict.fromkeys((*ATTRIBUTES, "all"), 0)
    mse = 0.0
    for name, look in looks:
        x = _images_of([world / f"{name}.png"])[0][None]
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse += float((rec - x).pow(2).mean())
        got = read(Image.fromarray(((rec[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy())).look()
        for a in ATTRIBUTES:
            right[a] += getattr(got, a) == getattr(look, a)
        right["all"] += got == look
    striped = [look for _, look in looks if look.stripes]
    return {**{a: v / len(looks) for a, v in right.items()}, "mse": mse / len(looks), "n": len(looks),
            "striped": len(striped)}


def _report_vae(out: Path, losses: list[float], check: dict[str, float]) -> None:
    """`vae.json` (losses and the round trip) and `vae-loss.png` beside the run; the round trip logged."""
    (out / "vae.json").write_text(json.dumps({"losses": losses, "round_trip": check}, indent=1))
    log.info("VAE round trip on %d base images (%d striped), read back: all %.1f %%, colour %.1f %%, shape %.1f %%, "
             "stripes %.1f %%; MSE %.4f", check["n"], check["striped"], 100 * check["all"], 100 * check["color"],
             100 * check["shape"], 100 * check["stripes"], check["mse"])
    if check["color"] < 0.8:  # the shipped VAE keeps 85 % (stripes included) and its base draws 96 % right
        log.warning("the VAE keeps the colour of only %.0f %% of the base images: a UNet trained on it will miss "
                    "colours too; vae-loss.png shows which fix: a loss still falling at the end wants more vae_steps or a higher "
                    "vae_lr (4e-3 kept more than 2e-3: docs/toy-world.md), a spike a lower vae_lr", 100 * check["color"])
    if len(losses) >= 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.plot(range(1, len(losses) + 1), losses, lw=0.6, color="#1f77b4")
        ax.set_yscale("log")
        ax.set_xlabel("VAE step")
        ax.set_ylabel("L1 + L2 + KL loss")
        ax.set_title(f"toy VAE: colour kept {100 * check['color']:.0f} %, all {100 * check['all']:.0f} %, "
                     f"MSE {check['mse']:.4f}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "vae-loss.png")
        plt.close(fig)


@torch.no_grad()
def scale_latents(vae: torch.nn.Module, images: list[torch.Tensor]) -> float:
    """Rescale the latent space (not the reconstructions) so latents x scaling_factor have std 1.

    The encoder's `quant_conv` mean rows are multiplied by a, its log-variance rows shifted by
    2 ln a, and `post_quant_conv`'s inputs divided by a: decode(encode(x)) is unchanged."""
    means = torch.cat([vae.encode(im[None]).latent_dist.mean.flatten() for im in images])
    a = 1.0 / (vae.config.scaling_factor * float(means.std()))
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= a
    vae.quant_conv.bias[:c] *= a
    vae.quant_conv.bias[c:] += 2 * math.log(a)
    vae.post_quant_conv.weight /= a
    return a


_RUN = """# written by `tunelab toy pretrain`: UNet + both text encoders from random weights
[run]
name = "toy-pretrain"
output_dir = "{run}"
seed = {seed}
[model]
base = "{init}"
max_chunks = 1
[data]
index = "{index}"
latents = "{latents}"
[data.captions]
mode = "tags"
caption_dropout = {dropout}
[train]
batch_size = {batch}
grad_accumulation = 1
max_steps = {steps}
mixed_precision = "no"
gradient_checkpointing = false
max_grad_norm = 1.0
[train.parts]
text_encoder = "on"
[optim]
lr_unet = {lr_unet}
lr_text_encoder_1 = {lr_text}
lr_text_encoder_2 = {lr_text}
schedule = "cosine"
warmup_steps = {warmup}
[loss]
min_snr_gamma = {min_snr}
[save]
every_n_steps = 0
every_n_epochs = 0
dtype = "fp32"
keep_states = 1
[log]
every_n_steps = 10
"""


def _train_unet(out: Path, init: Path, index: Path, s: PretrainSettings) -> Path:
    from tunelab.run import RunDir
    from tunelab.train.trainer import train

    run_file = out / "pretrain.toml"
    run_file.write_text(_RUN.format(run=out / "run", seed=s.seed, init=init, index=index, latents=index.parent / "latents",
                                    dropout=s.caption_dropout, batch=s.batch, steps=s.steps, lr_unet=s.lr_unet,
                                    lr_text=s.lr_text, warmup=s.warmup, min_snr=s.min_snr))
    train(run_file)
    return RunDir(out / "run").checkpoint_path("last")


def _finish(last: Path, base: Path, s: PretrainSettings, seconds: dict[str, float]) -> Path:
    from tunelab.models.checkpoint import load_checkpoint, save_checkpoint

    comps = load_checkpoint(last)
    training = {"tunelab_toy_pretrain": json.dumps(asdict(s), sort_keys=True)}
    return save_checkpoint(comps, base, dtype="fp16", title="tunelab toy base", training=training)


def shipped_base() -> Path:
    """The toy base the package ships (made by `tunelab toy pretrain` with the default settings)."""
    from importlib import resources

    from tunelab.errors import TunelabError

    path = Path(str(resources.files("tunelab").joinpath("toy", "assets", BASE_FILE)))
    if not path.is_file():
        raise TunelabError(f"the shipped toy base is missing ({path}); reinstall tunelab, or make one with "
                           "`tunelab toy pretrain --out toy-pretrain` and pass its toy-base.safetensors")
    return path
