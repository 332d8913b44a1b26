"""A finetune of a toy base on one split of the toy world, with the product's own stages.

`prepare` writes the split, indexes it and caches its latents with the base's VAE; `finetune`
writes a run file and trains it with the trainer. The demo and `tunelab toy experiment` both
run these, so what they measure is what a user's run does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tunelab.toy.evaluate import concept_looks, preserve_looks
from tunelab.toy.world import prompt_of


@dataclass(frozen=True)
class ToyData:
    world: Path
    index: Path
    latents: Path
    held_out: "ToyData | None" = None  # images of the same split the finetune never sees (the probe's learn set)


@dataclass(frozen=True)
class FinetuneSettings:
    """The knobs the seed's experiments turn (the rest is the run file's defaults)."""

    text_encoder: str = "on"  # off / on / only
    unet: str = "unet71"  # full / unet63 / unet68 / unet71
    lr_unet: float = 1e-4
    lr_text: float = 3e-4
    steps: int = 120
    batch: int = 8
    grad_accumulation: int = 1
    mixed_precision: str = "no"
    full_bf16: bool = False
    bf16_update: str = "exact"  # how bf16 weights take their updates (train.bf16_update)
    seed: int = 0
    save_every: int = 0  # checkpoint (and grid) every N steps; 0 = only the last
    grid: bool = False  # render the grid at each checkpoint
    probe: bool = False  # probes during training: learn (the held-out images) and preserve (docs/probes.md)
    probe_every: int = 0  # steps between probes; 0 = 4 probes per run (and step 0)

    def but(self, **changes) -> "FinetuneSettings":
        return replace(self, **changes)


def grid_prompts() -> list[str]:
    """Rows of the demo's grid: the concept, then two things it must not forget."""
    return [prompt_of(concept_looks()[2]), prompt_of(preserve_looks()[0]), prompt_of(preserve_looks()[8])]


HELD_OUT_SEED = 1000  # the held-out images' world seed is the finetune data's seed + this


def prepare(out: str | Path, base: str | Path, split: str = "concept", n: int = 48, seed: int = 0,
            progress: bool = False, held_out: int = 0) -> ToyData:
    """The split's images, index and latent cache (encoded with the base's VAE); with `held_out`,
    as many other images of the split (another world seed) for the probe's learn set."""
    data = split_data(out, base, split, split, n, seed, seed, progress)
    if held_out:
        data = replace(data, held_out=held_out_data(out, base, split, held_out, seed, progress))
    return data


def held_out_data(out: str | Path, base: str | Path, split: str, n: int, seed: int = 0,
                  progress: bool = False) -> ToyData:
    """`n` images of the split the finetune never sees (world seed + HELD_OUT_SEED), indexed and cached."""
    return split_data(out, base, split, f"{split}-held-out", n, seed + HELD_OUT_SEED, seed, progress)


def split_data(out: str | Path, base: str | Path, split: str, name: str, n: int, world_seed: int, seed: int,
               progress: bool = False) -> ToyData:
    """`out/toy-NAME` (n images of the split), `out/NAME.parquet` and `out/NAME-latents`."""
    import torch

    from tunelab.data.index import IndexOptions, build_index
    from tunelab.data.latents import cache_latents
    from tunelab.models.checkpoint import load_checkpoint
    from tunelab.toy.pretrain import TOY_BUCKETS
    from tunelab.toy.world import make_world

    out = Path(out)
    world = out / f"toy-{name}"
    make_world(world, n=n, seed=world_seed, split=split, prefix=name)
    index = out / f"{name}.parquet"
    build_index([f"folder:{world},prefix=toy/"], index, IndexOptions(buckets=TOY_BUCKETS, seed=seed))
    latents = out / f"{name}-latents"
    vae = load_checkpoint(base, dtype=torch.float32).vae  # fp32: the CPU's fp16 kernels are slow
    cache_latents(index, latents, vae, batch_size=32, progress=progress)
    return ToyData(world, index, latents)


_RUN = """# written by tunelab.toy.finetune
[run]
name = "{name}"
output_dir = "{run}"
seed = {seed}
[model]
base = "{base}"
max_chunks = 1
[data]
index = "{index}"
latents = "{latents}"
[data.captions]
mode = "tags"
[train]
batch_size = {batch}
grad_accumulation = {accum}
max_steps = {steps}
mixed_precision = "{precision}"
full_bf16 = {full_bf16}
bf16_update = "{bf16_update}"
gradient_checkpointing = false
[train.parts]
text_encoder = "{te}"
unet = "{unet}"
[optim]
lr_unet = {lr_unet}
lr_text_encoder_1 = {lr_text}
lr_text_encoder_2 = {lr_text}
[save]
every_n_steps = {save_every}
every_n_epochs = 0
dtype = "fp32"
keep_states = 1
[grid]
prompts = {prompts}
seeds = [11, 12]
every_n_steps = {grid_every}
steps = 30
cfg = 2.0
"""

_PROBE = """[probe]
enabled = true
every_n_steps = {every}
learn = "{learn}"
learn_latents = "{learn_latents}"
"""


def write_run_file(path: str | Path, run: str | Path, base: str | Path, data: ToyData, s: FinetuneSettings,
                   name: str = "toy-finetune") -> Path:
    import json

    path = Path(path)
    prompts = json.dumps(grid_prompts() if s.grid else [])
    path.write_text(_RUN.format(
        name=name, run=run, seed=s.seed, base=base, index=data.index, latents=data.latents, batch=s.batch,
        accum=s.grad_accumulation, steps=s.steps, precision=s.mixed_precision,
        full_bf16=str(s.full_bf16).lower(), bf16_update=s.bf16_update, te=s.text_encoder, unet=s.unet, lr_unet=s.lr_unet,
        lr_text=s.lr_text if s.text_encoder != "off" else 0.0, save_every=s.save_every, prompts=prompts,
        grid_every=s.save_every if s.grid else 0))
    if s.probe:  # the learn set: the held-out images, else the index's holdout split
        with path.open("a") as f:
            f.write(_PROBE.format(every=s.probe_every or max(1, s.steps // 4),
                                  learn=data.held_out.index if data.held_out else "holdout",
                                  learn_latents=data.held_out.latents if data.held_out else ""))
    return path


def finetune(run: str | Path, base: str | Path, data: ToyData, s: FinetuneSettings = FinetuneSettings(),
             name: str = "toy-finetune", isolated: bool = False) -> Path:
    """Train the run (its run file beside it as `run.toml`); returns its last checkpoint.

    isolated: train in a `tunelab train` subprocess (accelerate fixes the mixed precision once
    per process, so runs that differ in it cannot share one)."""
    from tunelab.run import RunDir

    run = Path(run)
    run.parent.mkdir(parents=True, exist_ok=True)
    run_file = write_run_file(run.parent / f"{run.name}.toml", run, base, data, s, name)
    if isolated:
        _train_in_subprocess(run_file)
    else:
        from tunelab.train.trainer import train

        train(run_file)
    return RunDir(run).checkpoint_path("last")


def _train_in_subprocess(run_file: Path) -> None:
    import subprocess
    import sys

    from tunelab.errors import TunelabError

    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(run_file)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise TunelabError(f"training {run_file} failed (exit {proc.returncode}):\n{tail}")
