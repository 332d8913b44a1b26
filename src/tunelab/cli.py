"""The `tunelab` command line: one app, one thin wrapper per stage of the flow.

Every command parses its options, calls one library function, and prints. Library code raises
`TunelabError` for bad input; `main()` turns it into a one-line message and exit status 2.
Heavy imports (torch, diffusers) happen inside the commands so `tunelab --help` stays instant.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from tunelab import __version__
from tunelab.errors import TunelabError

# transformers prints notices about optional backends (torchvision) through its own handler.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(
    name="tunelab",
    help=(
        "Full fine-tuning of SDXL-class text-to-image models, and measuring what a finetune "
        "learned and what it forgot.\n\n"
        "The flow: data index -> data cache -> train -> grid / probe / loss / drift -> merge -> report. "
        "Start with `tunelab demo` (runs the whole flow on a tiny built-in model in minutes)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Create, inspect and convert model checkpoints (single-file SGM .safetensors).", no_args_is_help=True)
data_app = typer.Typer(help="Build the dataset index, preview captions, cache latents, verify caches.", no_args_is_help=True)
config_app = typer.Typer(help="Check and explain run files (TOML).", no_args_is_help=True)
toy_app = typer.Typer(help="The toy world: tiny models and synthetic data for trying tunelab on a laptop.", no_args_is_help=True)
merge_app = typer.Typer(help="Merge checkpoints on sd-mecha: recipes as users have them, the field's methods as presets, merge-back sweeps, an evolutionary ratio search.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(toy_app, name="toy")
app.add_typer(merge_app, name="merge")

log = logging.getLogger("tunelab")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tunelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Third-party libraries are chatty at INFO; keep their warnings only.
    for noisy in ("diffusers", "accelerate", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # optional-backend notices


def _print_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False))


# --- one convention for every command --------------------------------------------------------------
# Outputs are `--out/-o`, inputs are positional, one option name per thing (docs/architecture.md,
# "Command-line conventions"). A renamed spelling keeps working for one release: it is declared as a
# hidden parameter beside the new one, and `_renamed` takes its value with a one-line warning.

T = TypeVar("T")


def _deprecated(old: str, new: str) -> None:
    typer.echo(f"warning: {old} is deprecated; use {new} (the old spelling goes in the next release)", err=True)


def _renamed(ctx: typer.Context, new: str, value: T | None, old: str, old_value: T | None,
             missing: str | None = None) -> T | None:
    """The value of option `new`, or of its deprecated spelling `old` (warning on stderr).

    `missing`: the option is required; the error to give when neither spelling was used."""
    if old_value is not None:
        if _given(ctx, new):
            raise TunelabError(f"{old} is the old spelling of {new}; give only {new}")
        _deprecated(old, new)
        value = old_value
    if value is None and missing is not None:
        raise TunelabError(f"missing option {new}: {missing}")
    return value


def _old_positional(ctx: typer.Context) -> str | None:
    """The positional argument a command used to take, left in `ctx.args` (its command allows
    extra arguments, so the old spelling parses without showing in the usage line)."""
    if len(ctx.args) > 1:
        raise TunelabError(f"unexpected arguments: {' '.join(ctx.args)}")
    return ctx.args[0] if ctx.args else None


def _given(ctx: typer.Context, option: str) -> bool:
    """Whether `option` was typed rather than left at its default. (By the source's name: typer
    0.2x carries its own copy of click, so the enum class depends on the version.)"""
    name = next(p.name for p in ctx.command.params if option in p.opts)
    return ctx.get_parameter_source(name).name == "COMMANDLINE"


# --- model ---------------------------------------------------------------------------------------

ArchOpt = typer.Option(help="Architecture preset: 'toy' (tiny, for tests and demos) or 'sdxl' (full size).")
DtypeOpt = typer.Option(help="Floating-point dtype of the written tensors: fp32, fp16 or bf16.")


@model_app.command("new")
def model_new(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .safetensors file.")],
    arch: Annotated[str, ArchOpt] = "toy",
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same file.")] = 0,
    dtype: Annotated[str, DtypeOpt] = "fp16",
) -> None:
    """Write a randomly initialised checkpoint (SGM single file), e.g. for tests and benchmarks.

    A full-size sdxl file is ~6.9 GB in fp16 and is generated tensor by tensor (little RAM).
    """
    from tunelab.models.checkpoint import new_checkpoint

    with _progress(f"writing {out.name}", total=_n_keys(arch)) as bar:
        path = new_checkpoint(arch, out, seed=seed, dtype=dtype, progress=lambda s: bar.update(1))
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {arch}, {dtype}, seed {seed})")


@model_app.command("inspect")
def model_inspect(
    ctx: typer.Context,
    file: Annotated[Optional[Path], typer.Argument(help="A .safetensors checkpoint (only its header is read).")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Describe an architecture preset instead of a file (nothing is allocated): toy or sdxl.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON, including every key with its shape.")] = False,
    preset: Annotated[Optional[str], typer.Option("--preset", hidden=True)] = None,  # deprecated: --arch
) -> None:
    """Show a checkpoint's architecture, dtype, parameter counts per component and UNet block,
    metadata, and any missing or unexpected keys."""
    from tunelab.models.checkpoint import inspect_file, inspect_preset

    arch = _renamed(ctx, "--arch", arch, "--preset", preset)
    if (file is None) == (arch is None):
        raise TunelabError("give either a FILE or --arch toy|sdxl")
    report = inspect_file(file) if file is not None else inspect_preset(arch)
    if as_json:
        _print_json(report)
    else:
        typer.echo(_format_inspect(report))


def _format_inspect(r: dict) -> str:
    from tunelab.models.vocab import label as vocab_label

    lines = [f"{r.get('file') or 'preset ' + r['preset']}",
             f"  architecture  {r['arch'] or 'unknown'}" + (f"  ({r['problem']})" if r.get("problem") else ""),
             f"  dtype         {r['dtype']}",
             *([f"  prediction    {r['prediction']}"] if r.get("prediction") else []),
             f"  tensors       {r['tensors']:,}",
             f"  parameters    {r['parameters']:,}"]
    lines += [f"    {vocab_label(name):<13} {n:>15,}" for name, n in r["per_component"].items()]
    if r["per_unet_block"]:
        lines.append("  UNet blocks   " + "  ".join(f"{b} {n / 1e6:.1f}M" for b, n in r["per_unet_block"].items()))
    for label, key in (("missing (required)", "missing_required"), ("absent (optional)", "absent_optional"),
                       ("extra keys", "extra_keys")):
        if r.get(key):
            lines.append(f"  {label:<13} {len(r[key])}: {', '.join(r[key][:4])}{' ...' if len(r[key]) > 4 else ''}")
    lines += [f"  {'training' if i == 0 else '':<13} {line}" for i, line in enumerate(r.get("training") or [])]
    for k, v in sorted(r.get("metadata", {}).items()):
        lines.append(f"  meta {k} = {v if len(v) < 100 else v[:97] + '...'}")
    return "\n".join(lines)


@model_app.command("convert")
def model_convert(
    src: Annotated[Path, typer.Argument(help="A .safetensors SGM file, a diffusers folder, or (with --allow-pickle) a .ckpt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: a .safetensors file, or a folder with --to diffusers.")],
    to: Annotated[str, typer.Option(help="Output format: 'sgm' (single file) or 'diffusers' (folder).")] = "sgm",
    dtype: Annotated[str, DtypeOpt] = "fp16",
    allow_pickle: Annotated[bool, typer.Option(help="Read pickle checkpoints (.ckpt/.pt/.bin). Only for files you trust: unpickling can run code.")] = False,
    tokenizers: Annotated[Optional[str], typer.Option(help="With --to diffusers: a folder with tokenizer/ and tokenizer_2/ to put in the output (needed for sdxl .safetensors files, which carry none). Default: the model's own (toy: built in; a diffusers folder: its own).", show_default=False)] = None,
) -> None:
    """Convert between a single-file SGM checkpoint and a diffusers folder (either direction).

    The file's metadata (title, author, license, description, kohya's ss_* keys, ...) is kept;
    a diffusers folder gets everything `StableDiffusionXLPipeline.from_pretrained` needs."""
    from tunelab.models.checkpoint import export_diffusers, load_checkpoint, save_checkpoint
    from tunelab.models.text import own_tokenizers

    if to not in ("sgm", "diffusers"):
        raise TunelabError(f"--to must be 'sgm' or 'diffusers', got {to!r}")
    if tokenizers is not None and to != "diffusers":
        raise TunelabError("--tokenizers goes into a diffusers folder: add --to diffusers, or drop --tokenizers")
    comps = load_checkpoint(src, allow_pickle=allow_pickle)
    if to == "sgm":
        path = save_checkpoint(comps, out, dtype=dtype)
    else:
        path = export_diffusers(comps, out, dtype=dtype, tokenizers=tokenizers or own_tokenizers(src, comps.arch))
    typer.echo(f"wrote {path} ({comps.arch}, {dtype})")


def _n_keys(arch: str) -> int:
    from tunelab.models.keys import rules_for_arch

    return len(rules_for_arch(arch))


def _progress(desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=None, file=sys.stderr, leave=False)



# --- config --------------------------------------------------------------------------------------


@config_app.command("check")
def config_check(
    run_file: Annotated[Path, typer.Argument(help="The run file (TOML) to validate.")],
    world_size: Annotated[Optional[int], typer.Option(help="Number of training processes (GPUs) you will launch with; shows the effective batch.")] = None,
) -> None:
    """Validate a run file without loading any model: types, ranges, unknown keys (with a
    'did you mean'), impossible combinations; then print the derived numbers."""
    from tunelab.config import load_config

    from tunelab.models.prediction import conversion_note
    from tunelab.train.fused import check_launch
    from tunelab.train.trainer import check_prediction, check_tokenizers

    cfg = load_config(run_file)
    world = world_size or cfg.train.expect_world_size or 1
    if cfg.train.expect_world_size and world_size and world_size != cfg.train.expect_world_size:
        raise TunelabError(f"train.expect_world_size is {cfg.train.expect_world_size} but --world-size is {world_size}")
    mine, base = check_prediction(cfg, cfg.model.base)  # the base's header only: refuses a contradicting objective
    tokenizers = check_tokenizers(cfg, cfg.model.base)  # header only: refuses toy tokenizers with an sdxl base
    if tokenizers != cfg.model.tokenizers:
        tokenizers = f"{cfg.model.tokenizers} -> {tokenizers}"
    accum = cfg.accumulation_for(world)
    check_launch(cfg, world, accum)  # train.fused_backward: one process, one micro-batch per step
    data = _check_data(cfg)  # what training checks before its first step: buckets, latents vs the index
    t = cfg.train
    typer.echo(f"{run_file}: OK")
    typer.echo(f"  run            {cfg.run.name} -> {cfg.run.output_dir}")
    typer.echo(f"  base model     {cfg.model.base}   tokenizers: {tokenizers}   max {cfg.model.max_chunks} chunk(s) = {75 * cfg.model.max_chunks} tokens")
    typer.echo(f"  effective batch {world * t.batch_size * accum} = {world} process(es) x batch {t.batch_size} x accumulation {accum}")
    typer.echo(f"  trains         text encoders: {t.parts.text_encoder}   UNet: {t.parts.unet}   "
               f"LRs unet {cfg.optim.lr_unet:g} / te1 {cfg.optim.lr_text_encoder_1:g} / te2 {cfg.optim.lr_text_encoder_2:g}")
    typer.echo(f"  objective      {mine.describe()}{conversion_note(mine, base)}, loss {cfg.loss.type}")
    if data:
        typer.echo(f"  data           {data}")
    for label, value in (("model.base", cfg.model.base), ("data.index", cfg.data.index), ("data.latents", cfg.data.latents)):
        if value and value != "toy" and not Path(value).exists():
            typer.echo(f"  note: {label} = {value!r} does not exist yet")


def _check_data(cfg) -> str | None:
    """The index's buckets against the run file's [data.buckets], and the latent cache against the
    index (as `tunelab train` checks them); a line for `config check`, None before the index exists."""
    from tunelab.data.index import check_bucket_config
    from tunelab.data.latents import LatentStore, open_latents
    from tunelab.data.loader import open_index

    if not cfg.data.index or not Path(cfg.data.index).exists():
        return None
    index = open_index(cfg.data.index)
    check_bucket_config(index.footer, cfg.data.given_buckets(), cfg.data.index)
    c, used = index.footer.get("bucket_config") or {}, len(set(index.bucket_ids().tolist()))
    line = (f"{len(index):,} images in {used} of the index's {len(index.buckets)} buckets (resolution "
            f"{c.get('resolution')}, sides {c.get('min_side')}-{c.get('max_side')}, step {c.get('step')})")
    if cfg.probe.enabled and cfg.probe.learn in ("holdout", "train"):
        from tunelab.probe.sets import check_learn_rows

        check_learn_rows(cfg.probe, index.rows_in_split(cfg.probe.learn), cfg.data.index)
    if cfg.data.latents and Path(cfg.data.latents).exists():
        source = open_latents(cfg.data.latents, index, flip=cfg.data.flip_aug)
        kind = "tunelab shards" if isinstance(source, LatentStore) else "kohya .npz"
        line += f"; latents: {kind}{' with the mirrored images' if cfg.data.flip_aug else ''}, fit the index"
    return line


@config_app.command("from-kohya", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def config_from_kohya(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="The run file (TOML) to write.")],
    index: Annotated[Optional[Path], typer.Option(help="Where the run's dataset index goes (default: index.parquet beside --out).")] = None,
    build_index: Annotated[bool, typer.Option("--build-index", help="Also build that index now from the kohya dataset (train_data_dir, in_json or dataset_config).")] = False,
) -> None:
    """Convert a kohya-ss sd-scripts launch (sdxl_train.py) into a tunelab run file.

    Give the script (train.sh, train.bat, train.ps1), or the command line after `--`:

      tunelab config from-kohya train.sh --out run.toml

      tunelab config from-kohya --out run.toml -- accelerate launch --num_processes 4 sdxl_train.py --learning_rate=1.5e-6 ...

    Every flag tunelab supports becomes a setting (kohya's defaults written out where tunelab's
    differ); the others are listed with the reason. The run file passes `tunelab config check`."""
    from tunelab.config import parse_config
    from tunelab.kohya.convert import convert, derived, index_command, read_launch, table
    from tunelab.run import write_text_atomic

    index = index or out.with_name("index.parquet")
    result = convert(read_launch(list(ctx.args)), str(index))
    import tomllib

    parse_config(tomllib.loads(result.text), str(out))  # what `config check` reads must validate
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, result.text)
    c = result.conversion
    mapped = sum(r.status == "mapped" for r in c.rows)
    typer.echo(f"{result.launch.source}: {len(c.rows)} flags, {mapped} mapped -> {out}")
    for line in derived(c):
        typer.echo(f"  {line}")
    typer.echo("")
    for line in table(c):
        typer.echo(f"  {line}")
    for note in c.notes:
        typer.echo(f"  note: {note}")
    words = index_command(c)
    if build_index and words:
        from tunelab.data.buckets import BucketConfig
        from tunelab.data.index import IndexOptions, build_index as build

        buckets = BucketConfig(**c.settings.get("data.buckets", {}))
        summary = build(c.data_sources, index, IndexOptions(buckets=buckets, exif_transpose=False, min_image_side=0))  # kohya's: as stored, nothing too small
        typer.echo(f"index: {index}, {summary.rows:,} images, {summary.rejected:,} rejected")
    elif words:
        typer.echo("next: " + " ".join(shlex.quote(w) for w in words))
    typer.echo(f"then: tunelab config check {out}   and   tunelab train {out}")


@config_app.command("show")
def config_show(
    run_file: Annotated[Optional[Path], typer.Argument(help="A run file; prints it with every default filled in, as JSON.")] = None,
    fields: Annotated[bool, typer.Option("--fields", help="List every setting with its default and when to change it.")] = False,
) -> None:
    """Print a run file resolved with all defaults, or the reference of all settings (--fields)."""
    from tunelab.config import RunConfig, field_docs, load_config

    if fields:
        for name, default, doc in field_docs():
            typer.echo(f"{name:<36} {default:<24} {doc}")
        return
    cfg = load_config(run_file) if run_file else RunConfig()
    _print_json(cfg.model_dump(mode="json"))



# --- data ----------------------------------------------------------------------------------------

_SOURCE_HELP = (
    "A source, repeatable: KIND:PATH[,option=value...]. Kinds: "
    "folder:DIR (images + NAME.txt tags + NAME.caption, recursive; kohya's N_concept sub-folders repeat N times); "
    "kohya:META.json[,images=DIR] (kohya metadata JSON, streamed); "
    "table:FILE.parquet|.csv,template={id}.webp[,root=DIR] or ,tar={id % 1000:04d}.tar[,member={id}] "
    "(columns id, tags, optional caption/width/height; rename with id=COL, tags=COL, ...); "
    "tar:DIR_OR_TAR (shards read in place). Every kind takes prefix=NAME/ to keep keys unique."
)


@data_app.command("index", context_settings={"allow_extra_args": True})  # the old positional OUT
def data_index(
    ctx: typer.Context,
    source: Annotated[list[str], typer.Option("--source", "-s", help=_SOURCE_HELP)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The index file to write (Parquet), e.g. data/index.parquet.", show_default=False)] = None,
    where_tag: Annotated[
        Optional[list[str]], typer.Option("--where-tag", help="Keep only images having this tag (repeat for AND).")
    ] = None,
    holdout: Annotated[float, typer.Option(help="Fraction of images set aside as the 'holdout' split (by key hash).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the holdout choice.")] = 0,
    resolution: Annotated[int, typer.Option(help="Bucket max area is resolution^2 (1024 for SDXL).")] = 1024,
    min_side: Annotated[int, typer.Option(help="Shortest bucket side.")] = 256,
    max_side: Annotated[int, typer.Option(help="Longest bucket side (2048 gives extreme ratios their own buckets).")] = 1024,
    step: Annotated[int, typer.Option(help="Bucket sides are multiples of this.")] = 64,
    bucket_no_upscale: Annotated[bool, typer.Option(
        "--bucket-no-upscale", help="kohya's --bucket_no_upscale: each image gets a bucket of its own size (shrunk to "
        "the max area if larger), sides rounded down to --step; small images are never enlarged, and --min-side / "
        "--max-side are ignored.")] = False,
    exif_transpose: Annotated[bool, typer.Option(
        "--exif-transpose/--no-exif-transpose", help="Turn photos upright by their EXIF orientation (sizes, buckets "
        "and pixels). --no-exif-transpose is kohya's way (it ignores EXIF): use it when training from kohya's latent "
        "caches.")] = True,
    no_repeats: Annotated[bool, typer.Option(
        "--no-repeats", help="Read kohya N_concept folders (10_astolfo/) as plain folders: every image below a "
        "folder source once per epoch. Default: images in N_concept/ count N times per epoch, as in kohya.")] = False,
    min_image_side: Annotated[int, typer.Option(help="Reject images with a side shorter than this many pixels "
                                                "(icons, 1x1 tracking pixels); 0 keeps everything, as kohya does.")] = 16,
    workers: Annotated[int, typer.Option(help="Threads reading image headers.")] = 8,
) -> None:
    """Build the dataset index: one Parquet row per image with its size, tags, caption and bucket.

    Example: tunelab data index --out data/index.parquet -s folder:./images,prefix=mine/ -s
    'table:posts.parquet,tar={id % 1000:04d}.tar,root=./shards,prefix=danbooru/'
    Unreadable or missing images go to INDEX.rejects.jsonl; the bucket histogram to INDEX.buckets.txt.
    """
    from pydantic import ValidationError

    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index

    old_out = _old_positional(ctx)
    out = _renamed(ctx, "--out", out, "the positional OUT", Path(old_out) if old_out is not None else None,
                   missing="the index file to write, e.g. --out data/index.parquet")
    try:
        buckets = BucketConfig(resolution=resolution, min_side=min_side, max_side=max_side, step=step,
                               no_upscale=bucket_no_upscale)
    except ValidationError as err:
        raise TunelabError(f"bucket options: {err.errors()[0]['msg']}") from None
    opts = IndexOptions(buckets=buckets, where_tags=where_tag or [], holdout=holdout, seed=seed, workers=workers,
                        repeats=not no_repeats, exif_transpose=exif_transpose, min_image_side=min_image_side)
    summary = build_index(source, out, opts)
    typer.echo(f"wrote {out}: {summary.rows:,} images, {summary.rejected:,} rejected, {summary.holdout_rows:,} in holdout")
    typer.echo(f"samples per epoch (train split, images x repeats): {summary.train_samples:,}")
    typer.echo(summary.histogram())


@data_app.command("stats")
def data_stats(
    index: Annotated[Path, typer.Argument(help="An index built by `tunelab data index`.")],
    top: Annotated[int, typer.Option(help="How many of the most frequent tags to list.")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")] = False,
) -> None:
    """Counts per source and split, tag frequencies, caption coverage and the bucket histogram."""
    from tunelab.data.index import index_stats, stats_text

    stats = index_stats(index, top_tags=top)
    if as_json:
        _print_json(stats)
    else:
        typer.echo(stats_text(stats))


def _vae_for(model: str, device: str):
    """The VAE of a checkpoint, or of a fresh toy model for trying things out."""
    if model == "toy":
        from tunelab.models.arch import build_components

        vae = build_components("toy", seed=0).vae
    else:
        from tunelab.models.checkpoint import load_checkpoint

        vae = load_checkpoint(model).vae
    return vae.to(device).eval()


@data_app.command("cache")
def data_cache(
    index: Annotated[Path, typer.Argument(help="The index built by `tunelab data index`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of latent shards (created; rerun to resume).")],
    model: Annotated[str, typer.Option(help="Checkpoint whose VAE encodes (.safetensors or diffusers folder), or 'toy'.")],
    batch_size: Annotated[int, typer.Option(help="Images per VAE call (same bucket).")] = 4,
    shard_size: Annotated[int, typer.Option(help="Entries per shard file (about 1024: few, large files).")] = 1024,
    workers: Annotated[int, typer.Option(help="Threads decoding images.")] = 4,
    posterior: Annotated[Optional[str], typer.Option(help="mean: the VAE posterior's mean (deterministic; the default); sample: a draw from it, as kohya's sd-scripts caches, seeded by each image's key. Default: what the folder holds.")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Also encode every image mirrored left-right (kohya's --flip_aug caches latents_flipped), for runs with data.flip_aug = true. Default: what the folder holds (a new folder: no).")] = None,
) -> None:
    """VAE-encode every image into checksummed fp16 latent shards; resumes after a kill.

    Run under `accelerate launch` to split the work: each process takes its own share.
    Unreadable images go to OUT/rejects-rNNN.jsonl and the job goes on.
    """
    from accelerate import PartialState

    from tunelab.data.latents import cache_latents

    state = PartialState()
    vae = _vae_for(model, str(state.device))
    s = cache_latents(index, out, vae, rank=state.process_index, world_size=state.num_processes,
                      batch_size=batch_size, shard_size=shard_size, workers=workers, device=str(state.device),
                      posterior=posterior, flip=flip)
    typer.echo(f"rank {state.process_index}: encoded {s.encoded:,}, already cached {s.skipped_done:,}, "
               f"rejected {s.rejected:,}, {len(s.shards_written)} new shard(s) in {out}")


@data_app.command("verify")
def data_verify(
    ctx: typer.Context,
    index: Annotated[Path, typer.Argument(help="The index the cache was built from.")],
    latents: Annotated[Optional[Path], typer.Option("--latents", help="Folder of latent shards (what `tunelab data cache --out` wrote).", show_default=False)] = None,
    repair: Annotated[bool, typer.Option(help="Re-encode corrupt and missing entries (needs --model).")] = False,
    model: Annotated[Optional[str], typer.Option(help="Checkpoint (or 'toy') whose VAE re-encodes, for --repair.")] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", "-c", hidden=True)] = None,  # deprecated: --latents
) -> None:
    """Check every cached entry's checksum and find missing ones; --repair fixes them. A folder of
    kohya .npz caches is checked file by file (present, readable, its keys, the index's bucket) and
    the files to re-cache are named.

    Exit status 1 when problems remain.
    """
    from tunelab.data.latents import is_kohya_folder, repair_cache, verify_cache, verify_kohya

    latents = _renamed(ctx, "--latents", latents, "--cache", cache, missing="the folder of latent shards, e.g. --latents data/latents")
    if is_kohya_folder(latents):
        if repair:
            raise TunelabError("--repair writes tunelab shards; kohya's .npz files are re-cached with sd-scripts "
                               "(or cache the index with `tunelab data cache --out NEW_FOLDER`)")
        kohya = verify_kohya(index, latents)
        typer.echo(kohya.text())
        if not kohya.ok:
            raise typer.Exit(1)
        return
    report = verify_cache(index, latents)
    typer.echo(report.text())
    if repair and not report.ok:
        if model is None:
            raise TunelabError("--repair re-encodes images: give the same --model the cache was built with")
        report = repair_cache(index, latents, _vae_for(model, "cpu"), report)
        typer.echo("after repair: " + report.text())
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("preview")
def data_preview(
    ctx: typer.Context,
    index: Annotated[Path, typer.Argument(help="The index built by `tunelab data index`.")],
    n_prompts: Annotated[int, typer.Option(help="How many prompts to show.")] = 8,
    config: Annotated[Optional[Path], typer.Option(help="A run file: its [data.captions], tokenizers, max_chunks and seed are used.")] = None,
    epoch: Annotated[int, typer.Option(help="Which epoch's random choices to show.")] = 0,
    mode: Annotated[Optional[str], typer.Option(help="Override the caption mode: tags, caption, pick, concat.")] = None,
    tokenizers: Annotated[Optional[str], typer.Option(help="Folder with tokenizer/ and tokenizer_2/, 'toy', or 'hub'.")] = None,
    max_chunks: Annotated[Optional[int], typer.Option(help="75-token chunks the run allows (1 = 77 tokens).")] = None,
    allow_download: Annotated[bool, typer.Option(help="With --tokenizers hub: fetch SDXL's tokenizers from the Hugging Face hub once (cached).")] = False,
    n: Annotated[Optional[int], typer.Option("--n", hidden=True)] = None,  # deprecated: --n-prompts
) -> None:
    """Show prompts exactly as the model will see them, with token counts and truncation."""
    from tunelab.data.captions import CaptionConfig
    from tunelab.data.preview import preview_prompts, preview_text

    n_prompts = _renamed(ctx, "--n-prompts", n_prompts, "--n", n)
    captions, seed, tok, chunks = CaptionConfig(), 0, "toy", 3  # 3 = model.max_chunks' default
    if config is not None:
        from tunelab.config import load_config
        from tunelab.train.trainer import check_tokenizers

        cfg = load_config(config)
        tok = tokenizers or check_tokenizers(cfg, cfg.model.base)  # 'auto': the base's own
        captions, seed, chunks = cfg.data.captions, cfg.run.seed, cfg.model.max_chunks
    if mode is not None:
        captions = CaptionConfig(**{**captions.model_dump(), "mode": mode})
    chunks = max_chunks or chunks
    items = preview_prompts(index, captions, n=n_prompts, seed=seed, epoch=epoch, tokenizers=tokenizers or tok,
                            max_chunks=chunks, allow_download=allow_download)
    typer.echo(preview_text(items, chunks))


# --- train ---------------------------------------------------------------------------------------


@app.command("train")
def train(
    run_file: Annotated[Path, typer.Argument(help="The run file (TOML); see examples/ and `tunelab config show --fields`.")],
    dry_run: Annotated[bool, typer.Option(help="Print the start-up banner (effective batch, trainable parameters, ...) and stop; loads no weights.")] = False,
    init_from: Annotated[Optional[Path], typer.Option(help="Start a NEW run from this checkpoint instead of model.base (for continuing from weights without their optimizer state).")] = None,
    resume_from: Annotated[Optional[str], typer.Option(help="Resume from this training state (a folder under RUN/state/, e.g. step-00000040) instead of the newest usable one.")] = None,
    allow_config_change: Annotated[bool, typer.Option(help="Resume even though train/optim/objective/loss/data settings changed since the run's last state.")] = False,
    estimate_memory: Annotated[bool, typer.Option("--estimate-memory", help="Estimate the peak GPU memory of one optimizer step for this run file -- weights, gradients, optimizer states, EMA, activations at the largest bucket -- without a GPU and without loading any weight, say whether it fits (--gpu-memory) and what to change if not, and stop (docs/training.md, 'Will it fit?').")] = False,
    gpu_memory: Annotated[Optional[str], typer.Option(help="With --estimate-memory (or --dry-run): your card's memory, e.g. 24GB (read as GiB, as nvidia-smi counts: a '24 GB' RTX 3090 has 24 GiB). Gives a verdict and, when it does not fit, the cheapest changes that would make it fit.", show_default=False)] = None,
    accelerate_config: Annotated[Optional[Path], typer.Option(help="With --estimate-memory (or --dry-run): the accelerate config file you will launch with; its engine (DDP, DeepSpeed ZeRO-1/2/3, FSDP) and number of processes decide what each GPU holds.", show_default=False)] = None,
    world_size: Annotated[Optional[int], typer.Option(min=1, help="With --estimate-memory (or --dry-run): the number of GPUs you will launch on, with DDP (default: train.expect_world_size, else 1). Use --accelerate-config for DeepSpeed or FSDP.", show_default=False)] = None,
) -> None:
    """Train (full finetune) from a run file.

    Running it again on the same run directory resumes exactly where the last saved state left off
    (weights, optimizer, LR schedule, data position). Several GPUs:
    `accelerate launch --num_processes 4 -m tunelab train RUN.toml`. Before launching:
    `tunelab train RUN.toml --estimate-memory --gpu-memory 24GB` says whether a step fits.
    """
    from tunelab.train.trainer import train as run_training

    launch_options = gpu_memory is not None or accelerate_config is not None or world_size is not None
    if launch_options and not (estimate_memory or dry_run):
        raise TunelabError("--gpu-memory, --accelerate-config and --world-size go with --estimate-memory or --dry-run; "
                           "a training run takes its GPUs from `accelerate launch`")
    if estimate_memory:
        _echo_memory(run_file, gpu_memory, accelerate_config, world_size, quiet=False)
        return
    result = run_training(run_file, allow_config_change=allow_config_change, init_from=init_from, dry_run=dry_run,
                          resume_from=resume_from)
    if dry_run:
        _echo_memory(run_file, gpu_memory, accelerate_config, world_size, quiet=True)
    if result is not None:
        typer.echo(f"trained {result.steps} steps ({result.samples_seen:,} samples); last checkpoint: {result.last_checkpoint}")


def _echo_memory(run_file: Path, gpu_memory: str | None, accelerate_config: Path | None, world_size: int | None,
                 quiet: bool) -> None:
    """The memory estimate (train/memory.py); `quiet` (the dry run's banner): one line when it cannot be made."""
    from tunelab.config import load_config
    from tunelab.train.memory import launch_for, parse_size, report

    cfg = load_config(run_file)
    card = parse_size(gpu_memory) if gpu_memory else None
    launch = launch_for(cfg, accelerate_config, world_size)
    try:
        lines = report(cfg, launch, card)
    except Exception as err:  # the dry run's banner is printed already; a failed estimate must not hide it
        if not quiet:
            raise
        lines = [f"memory estimate: not made ({err}); `tunelab train {run_file} --estimate-memory` shows why"]
    for line in lines:
        typer.echo(line)


# --- grid / probe --------------------------------------------------------------------------------


_GRID_HELP = (
    "Render X/Y/Z image grids: checkpoints x prompts x seeds x any sampling setting, the way A1111's "
    "X/Y/Z plot does, without a web UI.\n\n"
    "Give checkpoints (several go on the X axis) and prompts (several go on the next free axis). Place any "
    "setting on an axis with --x/--y/--z 'NAME: VALUES'. Values: lists '3, 4.5, 6'; ranges '1-5' (1..5), "
    "'1-5 (+2)' (1,3,5), '1-10 [5]' (five evenly spaced values); text in \"double quotes\" if it holds a comma. "
    "Axis names: checkpoint, prompt, negative, seed, cfg, steps, sampler, schedule_type, clip_skip, pag_scale, seg_scale, "
    "seg_sigma, freeu, hires_scale, hires_denoise, hires_steps, width, height, guidance_rescale, uncond, "
    "comma_backtrack, pad_conds, clip_skip_te2.\n\n"
    "Prompts use A1111 syntax: (word:1.2), (word), \\[word], BREAK; longer than 75 tokens is fine (--max-chunks), "
    "cut into chunks as A1111 cuts them. Prompt editing [a:b:0.5], alternation [a|b] and AND are not applied "
    "(a warning names them; the text is used as written). "
    "Samplers (A1111's names, sampled as A1111 v1.10 does): Euler, Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ 2M, "
    "DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE, DPM++ 2M SDE Heun, DPM++ 3M SDE (the SDE ones need torchsde), DDIM, PLMS, "
    "UniPC, 'DDIM CFG++' (A1111's: the CFG scale is divided by 12.5) and 'Euler CFG++' "
    "(ComfyUI's: the CFG scale is the CFG++ lambda, about 0.5-1.5). --schedule-type picks A1111's Schedule type "
    "(Automatic = the sampler's own; Karras, Exponential, SGM Uniform, ...); 'DPM++ 2M Karras' still works.\n\n"
    "A training run: --run RUN_DIR takes the run's checkpoints (by step, last at the end) when none are given, "
    "and its tokenizers, max chunks, clip skip and caption settings (for --prompt-field training) unless given.\n\n"
    "Writes to --out: one sheet per Z value plus the combined sheet (grid-*.png), every image alone in cells/ "
    "(with A1111 'parameters' infotext; file names carry seed, size, CFG and steps), and grid.json, from which "
    "`tunelab grid --from grid.json` renders the same grid again.\n\n"
    "Example (the field's evaluation): tunelab grid base.safetensors step-10000.safetensors last.safetensors "
    "--tokenizers ./sdxl -p 'man with car' -p '(1boy:0), \\[astolfo]' --y 'seed: 460372993, 744089893' "
    "--sampler 'DDIM CFG++' --cfg 6 --steps 48 --width 1024 --height 1024 --pag-scale 1 --seg-scale 3 "
    "--hires-scale 1.5 --hires-denoise 0.7 --vae sdxl-vae-fp16-fix.safetensors --out grids/run1"
)


@app.command("grid", help=_GRID_HELP)
def grid(
    checkpoints: Annotated[Optional[list[Path]], typer.Argument(help="Checkpoints: .safetensors files or diffusers folders (default with --run: the run's).", show_default=False)] = None,
    run: Annotated[Optional[Path], typer.Option(help="A training run's directory (its run.output_dir): default checkpoints, tokenizers, max chunks, clip skip and caption settings.", show_default=False)] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="A text file with one prompt per line (# comments).")] = None,
    empty_prompt: Annotated[bool, typer.Option("--empty-prompt", help="Add the empty prompt (unconditional generation).")] = False,
    from_index: Annotated[Optional[Path], typer.Option(help="Draw prompts at random (seeded by --seed) from this dataset index.")] = None,
    n_prompts: Annotated[int, typer.Option(help="How many prompts to draw from --from-index.")] = 4,
    prompt_field: Annotated[str, typer.Option(help="What to draw from the index: tags, caption, or training (prompts as the trainer builds them: the run's [data.captions] with --run, else the defaults).")] = "tags",
    index_split: Annotated[Optional[str], typer.Option(help="Draw only from this split of the index, e.g. holdout.")] = None,
    negative: Annotated[str, typer.Option(help="Negative prompt (A1111 syntax).")] = "",
    uncond: Annotated[str, typer.Option(help="What an empty negative prompt means: 'zeros' (all-zero embeddings, as A1111 does for SDXL) or 'empty' (encode the empty string, as ComfyUI does).")] = "zeros",
    comma_backtrack: Annotated[int, typer.Option(help="When a prompt fills a 75-token chunk, move the words after a comma up to this many tokens back into the next chunk (A1111's 'Prompt word wrap length limit', default 20); 0 cuts at exactly 75 tokens, as training does.")] = 20,
    pad_conds: Annotated[bool, typer.Option(help="Pad the shorter of prompt and negative prompt with empty chunks (A1111's non-default 'Pad prompt/negative prompt'); off: they run as separate UNet calls, as A1111 does by default.")] = False,
    clip_skip_te2: Annotated[Optional[bool], typer.Option(help="Apply --clip-skip to the second text encoder too (ComfyUI's CLIP Set Last Layer; how tunelab trains). Default: off (A1111 keeps TE2 at its penultimate layer), on with --run.", show_default=False)] = None,
    x: Annotated[Optional[str], typer.Option("--x", help="X axis, e.g. 'seed: 1-4' (default: the checkpoints).")] = None,
    y: Annotated[Optional[str], typer.Option("--y", help="Y axis, e.g. 'cfg: 3, 4.5, 6'.")] = None,
    z: Annotated[Optional[str], typer.Option("--z", help="Z axis: one sheet per value, e.g. 'sampler: Euler, DDIM CFG++'.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every cell (unless seed is on an axis).")] = 460372993,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 28,
    cfg: Annotated[float, typer.Option(help="CFG scale. DDIM CFG++ divides it by 12.5 (A1111: 6 means lambda 0.48); Euler CFG++ takes it as lambda (ComfyUI: about 0.5-1.5).")] = 5.0,
    sampler: Annotated[str, typer.Option(help="A1111 sampler name, e.g. Euler, 'Euler a', 'DPM++ 2M', 'DDIM CFG++' (old names such as 'DPM++ 2M Karras' mean sampler + schedule type).")] = "Euler",
    schedule_type: Annotated[str, typer.Option(help="A1111's Schedule type: Automatic (the sampler's own: Karras for DPM++ 2M), Uniform, Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal, Align Your Steps, Simple, Normal, DDIM.")] = "Automatic",
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the model's resolution).")] = None,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the model's resolution).")] = None,
    clip_skip: Annotated[Optional[int], typer.Option(help="Text-encoder layer from the end (2 = SDXL's native penultimate layer). Default: the run's with --run, else 2.", show_default=False)] = None,
    pag_scale: Annotated[float, typer.Option(help="Perturbed-attention guidance scale (0 = off; the field uses 1).")] = 0.0,
    pag_layers: Annotated[str, typer.Option(help="Self-attention layers PAG perturbs: mid, down.N, up.N, up.N.M (comma-separated).")] = "mid",
    seg_scale: Annotated[float, typer.Option(help="Smoothed-energy guidance scale (0 = off; the paper uses 3).")] = 0.0,
    seg_sigma: Annotated[float, typer.Option(help="SEG blur sigma, in tokens of the blurred layer's grid (the middle block is 32x32 at 1024 px; the field uses 11). Above 9999, inf or -1 = uniform attention.")] = 11.0,
    freeu: Annotated[bool, typer.Option(help="FreeU with SDXL's values (b1 1.3, b2 1.4, s1 0.9, s2 0.2).")] = False,
    hires_scale: Annotated[float, typer.Option(help="Hires fix upscale (1 = off; the field uses 1.5).")] = 1.0,
    hires_denoise: Annotated[float, typer.Option(help="Hires fix denoising strength.")] = 0.7,
    hires_steps: Annotated[int, typer.Option(help="Steps of the hires pass (0 = --steps), run as A1111 does: the last ones of a schedule of steps / denoise steps.")] = 0,
    hires_upscaler: Annotated[str, typer.Option(help="latent (A1111's 'Latent', bilinear) or lanczos (decode, resize, re-encode).")] = "latent",
    guidance_rescale: Annotated[Optional[float], typer.Option(help="CFG rescale phi (default: 0.7 for zero-terminal-SNR models, else 0).")] = None,
    max_chunks: Annotated[Optional[int], typer.Option(help="75-token chunks a prompt may use (3 = 225 tokens). Default: the run's with --run, else 3.", show_default=False)] = None,
    vae: Annotated[Optional[Path], typer.Option(help="VAE override: a VAE .safetensors (e.g. sdxl-vae-fp16-fix), a checkpoint, or a diffusers VAE folder.")] = None,
    tokenizers: Annotated[Optional[str], typer.Option(help="Folder with tokenizer/ and tokenizer_2/ (needed for sdxl .safetensors files: see docs/text-conditioning.md), or 'toy'. Default: the run's with --run, else auto = each checkpoint's own (toy: built in; a diffusers folder: its own).", show_default=False)] = None,
    dtype: Annotated[str, typer.Option(help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    image_format: Annotated[str, typer.Option("--format", help="png (infotext in a text chunk) or jpg (in EXIF UserComment).")] = "png",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("grid"),
    from_json: Annotated[Optional[Path], typer.Option("--from", help="Render again from a grid.json sidecar (other options are ignored except --out/--device).")] = None,
) -> None:
    from tunelab.sample.grid import Axis, GridSpec, render_grid
    from tunelab.sample.pipeline import SampleSettings
    from tunelab.sample.prompts import gather_prompts

    if from_json is not None:
        spec = GridSpec.from_json(from_json)
        spec.device = device if device != "auto" else spec.device
    else:
        fallback = _grid_defaults(run, need_checkpoints=not checkpoints)  # explicit options override the run's
        clip_skip = fallback.clip_skip if clip_skip is None else clip_skip
        max_chunks = fallback.max_chunks if max_chunks is None else max_chunks
        clip_skip_te2 = fallback.clip_skip_te2 if clip_skip_te2 is None else clip_skip_te2
        prompts = gather_prompts(prompt or [], prompts_file, empty_prompt, from_index, n_prompts, prompt_field, seed,
                                 index_split, captions=fallback.captions)
        base = SampleSettings(
            prompt=prompts[0] if prompts else "", negative=negative, seed=seed, steps=steps, cfg=cfg, sampler=sampler,
            schedule_type=schedule_type,
            width=width, height=height, clip_skip=clip_skip, pag_scale=pag_scale, pag_layers=pag_layers,
            seg_scale=seg_scale, seg_sigma=seg_sigma, freeu=freeu, hires_scale=hires_scale, hires_denoise=hires_denoise,
            hires_steps=hires_steps, hires_upscaler=hires_upscaler, guidance_rescale=guidance_rescale, uncond=uncond,
            max_chunks=max_chunks, comma_backtrack=comma_backtrack, pad_conds=pad_conds, clip_skip_te2=clip_skip_te2)
        spec = GridSpec(base=base, checkpoints=[str(c) for c in checkpoints or fallback.checkpoints], prompts=prompts,
                        x=Axis.parse(x) if x else None, y=Axis.parse(y) if y else None, z=Axis.parse(z) if z else None,
                        vae=str(vae) if vae else None, dtype=dtype, device=device,
                        tokenizers=tokenizers or fallback.tokenizers, image_format=image_format)
    result = render_grid(spec, out, progress=True)
    typer.echo(f"wrote {len(result.cells)} images ({result.loads} checkpoint load(s)) to {result.out_dir}")
    for sheet in result.sheets:
        typer.echo(f"  sheet {sheet}")
    typer.echo(f"  sidecar {result.sidecar}")


@dataclass
class _GridDefaults:
    """What `tunelab grid` uses where the command line is silent: built in, or a training run's."""

    checkpoints: list[Path] = field(default_factory=list)
    tokenizers: str | None = None
    max_chunks: int = 3
    clip_skip: int = 2
    captions: Any = None  # a CaptionConfig: how --prompt-field training builds prompts (None = its defaults)
    clip_skip_te2: bool = False  # A1111's; a run's clip_skip applies to both encoders, as the trainer does


def _grid_defaults(run_dir: Path | None, need_checkpoints: bool) -> _GridDefaults:
    """A run's checkpoints in training order (`last` at the end) and the text settings of its
    resolved config, so the grid conditions prompts the way training did."""
    if run_dir is None:
        return _GridDefaults()
    from tunelab.config import parse_config
    from tunelab.run import RunDir

    run = RunDir(run_dir)
    if not run.config.is_file():
        raise TunelabError(f"--run {run_dir}: not a run directory (no {run.config.name}); "
                           "give the run.output_dir of a run that `tunelab train` started")
    try:
        cfg = parse_config(json.loads(run.config.read_text()), str(run.config))
    except json.JSONDecodeError as err:
        raise TunelabError(f"{run.config}: not valid JSON ({err}); `tunelab train` rewrites it on the next start") from None
    checkpoints = [c.path for c in run.checkpoint_files()]
    if need_checkpoints and not checkpoints:
        raise TunelabError(f"--run {run_dir}: no checkpoints in {run.checkpoints} yet; give checkpoints, or wait for the first save")
    m = cfg.model
    tokenizers = m.tokenizers
    if tokenizers == "auto":  # the base's own where it has a folder of them, else each checkpoint's own
        from tunelab.models.text import own_tokenizers

        tokenizers = own_tokenizers(m.base, None) or "auto"
    return _GridDefaults(checkpoints, tokenizers, m.max_chunks, m.clip_skip, cfg.data.captions, clip_skip_te2=True)


@app.command("probe")
def probe(
    targets: Annotated[list[Path], typer.Argument(
        help="A training run's directory (its checkpoints, settings and probe inputs), or .safetensors "
             "checkpoints with --base.", show_default=False)],
    base: Annotated[Optional[str], typer.Option(help="The model the checkpoints were trained from (default with a run: its model.base).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the probe inputs, checkpoints.{parquet,csv,png} (default: RUN/probes, or ./probe for files).", show_default=False)] = None,
    learn: Annotated[Optional[str], typer.Option(help="The learn set: an index path, 'holdout' or 'train' (rows of the run's index), or '' for none. Default: the run's [probe] learn; none for files.", show_default=False)] = None,
    learn_latents: Annotated[Optional[str], typer.Option(help="Latent cache of the --learn index (default: encode its images with the base's VAE).", show_default=False)] = None,
    samples: Annotated[Optional[int], typer.Option(help="Images of the learn set (default 8).", show_default=False)] = None,
    timesteps: Annotated[Optional[int], typer.Option(help="Fixed timesteps per sample: quantiles of the run's timestep distribution (default 8).", show_default=False)] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A preserve prompt (repeatable); default: the run's, else the architecture's ('car, wrc', 'man with car', ...; toy: its preserve looks).", show_default=False)] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Seeds per preserve prompt, comma-separated (default 0,1).", show_default=False)] = None,
    scorer: Annotated[Optional[str], typer.Option(help="Image scores: 'toy' (the toy world's concept reader) or 'module:function' taking (image, prompt) and returning {name: value}; '' for none.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, or bf16 / fp16 autocast on CUDA (numbers then depend on the kernels).")] = "fp32",
) -> None:
    """Measure what a finetune learned and what it forgot, one row of numbers per checkpoint.

    On fixed inputs (the same images, noise and timesteps for every checkpoint), for a learn set
    (held-out images of the finetune's data) and a preserve set (images the base draws from prompts
    the finetune never shows): the run's own denoising loss, and the prediction drift from the base
    (mean squared difference of the two models' predictions; 0 for the base itself), per noise band.
    With --scorer, image-level scores of renders from fixed seeds.

    Writes checkpoints.parquet / .csv (one row per checkpoint, set, metric and timestep) and
    checkpoints.png (the learned / forgot chart). The probe inputs are kept in the same folder, so a
    second call, or the in-training probe of the same run, measures on the same ones.

    Examples: tunelab probe runs/a      tunelab probe a.safetensors b.safetensors --base base.safetensors --learn data/index.parquet
    """
    from tunelab.probe.command import ProbeOptions, run_probe, summary

    seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    options = ProbeOptions(base=base, learn=learn, learn_latents=learn_latents, learn_samples=samples, prompts=prompt,
                           seeds=seed_list, timesteps=timesteps, scorer=scorer, device=device, precision=precision)
    rep = run_probe(targets, out, options, progress=sys.stderr.isatty())
    typer.echo("\n".join(summary(rep)))


# --- loss ----------------------------------------------------------------------------------------

_LOSS_HELP = (
    "Loss curves from training logs, with a verdict on where the loss is heading.\n\n"
    "PATH is a tensorboard event file (events.out.tfevents.*, from tunelab, kohya sd-scripts or any other "
    "trainer), a tunelab metrics.parquet, or a directory holding them (every folder with event files under it "
    "is one run). Several PATHs are overlaid in one plot.\n\n"
    "Values logged several times per optimizer step (micro-steps) are averaged per step. The curve is smoothed "
    "(rolling mean, or tensorboard's EMA with --smooth ema). After the first --warmup fraction of the run a "
    "straight line is fitted (Theil-Sen, with a 95% confidence interval of its slope). The verdict:\n\n"
    "converging: the loss is going down - the whole interval of the slope is below 0 and the line falls by at "
    "least --tolerance (default 2%) of the loss level.\n\n"
    "diverging: the same upwards - training is getting worse (check the learning rate).\n\n"
    "oscillating: no steady trend, but the loss swings up and down by at least --tolerance.\n\n"
    "flat: none of these - the loss has settled (normal late in a finetune).\n\n"
    "too short: too few steps after the warm-up to tell.\n\n"
    "Writes loss.png, loss.csv (per step: loss, ema, rolling, images seen) and summary.txt to --out, and "
    "prints the summary table. Example: tunelab loss runs/a runs/b --align images --batch 16 --log-y"
)


from enum import Enum  # noqa: E402 - kept inside this section; the file's header belongs to everyone


class _Smooth(str, Enum):
    rolling = "rolling"
    ema = "ema"


class _Align(str, Enum):
    step = "step"
    images = "images"


@app.command("loss", help=_LOSS_HELP)
def loss_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Event files, metrics.parquet files or run directories.", show_default=False)],
    tag: Annotated[Optional[str], typer.Option(help="Tag to analyse; default: `loss`, `loss/current`, `train/loss`, ... whichever exists.")] = None,
    smooth: Annotated[_Smooth, typer.Option(help="rolling: trailing mean over --window steps; ema: tensorboard's smoothing with --weight.")] = _Smooth.rolling,
    weight: Annotated[float, typer.Option(help="EMA weight in [0, 1), as tensorboard's slider; 0.6 barely smooths a noisy diffusion loss, try 0.99.")] = 0.6,
    window: Annotated[int, typer.Option(help="Rolling-mean window in steps (capped at a tenth of the run).")] = 2048,
    warmup: Annotated[float, typer.Option(help="Fraction of the run ignored by the trend (the early fast drop).")] = 0.1,
    tolerance: Annotated[float, typer.Option(help="Smallest relative change of the loss that counts as a trend (0.02 = 2%).")] = 0.02,
    align: Annotated[_Align, typer.Option(help="x axis: optimizer step, or images seen (= step x effective batch).")] = _Align.step,
    batch: Annotated[Optional[list[int]], typer.Option(help="Effective batch (per-GPU batch x GPUs x grad accumulation) for --align images; once, or once per run. Default: the run's `effective_batch` tag.")] = None,
    label: Annotated[Optional[list[str]], typer.Option(help="Legend name per run, in PATH order (default: the run's folder).")] = None,
    log_y: Annotated[bool, typer.Option("--log-y", help="Logarithmic loss axis.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for loss.png, loss.csv and summary.txt.")] = Path("loss-report"),
    list_tags: Annotated[bool, typer.Option("--list-tags", help="Only list each run's tags (value counts) and exit.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also verify every record's payload checksum (slower).")] = False,
) -> None:
    from tunelab.analyze import loss

    if list_tags:
        for name, scalars, chosen in loss.list_tags(paths, verify=verify, progress=True):
            typer.echo(f"{name}  ({len(scalars)} scalars)")
            for tag_name, series in scalars.series.items():
                mark = "  <- loss tag" if tag_name == chosen else ""
                typer.echo(f"  {tag_name:<32} {len(series):>10}{mark}")
        return
    report = loss.analyze_loss(
        paths, tag=tag, smooth=smooth.value, weight=weight, window=window, warmup=warmup, tolerance=tolerance,
        align=align.value, batch=batch, labels=label, log_y=log_y, out_dir=out, verify=verify, progress=True,
    )
    typer.echo(loss.format_summary(report))
    typer.echo("\nwrote " + ", ".join(str(p) for p in report.files.values()))


# --- drift ---------------------------------------------------------------------------------------


def _parse_pair(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise TunelabError(f"--pair wants two model indices like 0,3 (0 is the first file); got {text!r}") from None
    return a, b


@app.command("drift")
def drift(
    files: Annotated[list[Path], typer.Argument(
        help="Two or more .safetensors checkpoints (SGM single files), in the order to compare: "
             "the first is the reference. A run's checkpoints (RUN/checkpoints/*.safetensors, after an optional "
             "first file such as the base) are put in training order, by the step recorded in each file; "
             "other files keep the order given.",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for drift.json, the CSVs and the plots (created if needed).")] = Path("drift"),
    pair: Annotated[Optional[str], typer.Option(
        help="Two model indices 'I,J' for the per-block bar chart and the 'moved most' lists; "
             "0 is the first file, -1 the last. Default: first,last.")] = None,
    plots: Annotated[bool, typer.Option(help="Draw the PNG plots (--no-plots skips matplotlib).")] = True,
    signs: Annotated[bool, typer.Option(
        "--signs", help="Also measure sign agreement: of the weights two models both moved away from the first "
                        "file, the share they moved the same way (0.5 unrelated, 1 same direction; what TIES "
                        "merging elects on). About doubles the arithmetic: 4 full-size SDXL files took "
                        "1.9x the time of reading them instead of 1.5x on 2 cores.")] = False,
) -> None:
    """How far did the weights move? L2 distance between every pair of checkpoints, per component (te1 = CLIP-L, te2 = bigG, unet, vae, other), UNet block (EMB, IN00-IN08, M00, OUT00-OUT08, FINAL) and layer kind (self-/cross-attention, other).

    Reads each file once, one tensor at a time, so several full-size models fit in a few GB of RAM. Keys missing from some files, shape mismatches and NaN/Inf values are listed, not fatal.

    Writes to --out: drift.json (the field's {"ml": models, "dm": {component: NxN matrix}} plus blocks, kinds, relative change, cosines, sign agreement with --signs, and problems), drift.csv (one row per pair, one column per group), tensors.csv (every tensor and pair), trajectory.png (distance from the first file), heatmaps.png (a panel per component), map.png (the checkpoints placed on a plane by their distances), blocks_I_vs_J.png.

    Example: tunelab drift base.safetensors step-1000.safetensors step-2000.safetensors --out drift/
    """
    from tunelab.analyze.drift import run_drift, summary

    rep = run_drift(files, out, pair=_parse_pair(pair), plots=plots, progress=sys.stderr.isatty(), signs=signs)
    typer.echo("\n".join(summary(rep)))


# --- merge ---------------------------------------------------------------------------------------


_MapOpt = typer.Option("--map", help="OLD=NEW: a model path prefix as the recipe has it (Windows paths too) and where it is here; repeatable.")
_ModelsDirOpt = typer.Option("--models-dir", help="Folder that relative model paths of the recipe are in.")


@merge_app.command("run")
def merge_run(
    recipe: Annotated[Path, typer.Argument(help="An sd-mecha recipe (.mecha): the current format, or older ones without a version header (upgraded in memory).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged checkpoint (.safetensors); the recipe that made it goes beside it (.mecha) and into its metadata.")],
    models_dir: Annotated[Optional[Path], _ModelsDirOpt] = None,
    map_: Annotated[Optional[list[str]], _MapOpt] = None,
    dtype: Annotated[str, typer.Option(help="dtype of the output: fp16 (what UIs load), bf16, fp32.")] = "fp16",
    merge_dtype: Annotated[str, typer.Option(help="dtype the merge computes in (fp64: no accumulated rounding).")] = "fp64",
) -> None:
    """Merge checkpoints by an sd-mecha recipe, key by key with a progress bar.

    Model paths are found under --models-dir or rewritten with --map 'D:\\sd\\models=/models';
    a merge method the installed sd-mecha lacks is named with its recipe line."""
    from tunelab.merge.recipe import parse_maps
    from tunelab.merge.run import run_file

    merged = run_file(recipe, out, models_dir, parse_maps(map_ or []), dtype, merge_dtype)
    for note in merged.recipe.notes:
        typer.echo(f"  {note}")
    typer.echo(f"merged: {merged.path} ({dtype}); recipe: {merged.mecha}")


@merge_app.command("upgrade")
def merge_upgrade(
    recipe: Annotated[Path, typer.Argument(help="An older sd-mecha recipe (no `version 0.1.0` header: 2024-era `model ... \"sdxl\" \"base\"`, `call` lines, per-component dictionaries).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The upgraded recipe (.mecha).")],
    models_dir: Annotated[Optional[Path], _ModelsDirOpt] = None,
    map_: Annotated[Optional[list[str]], _MapOpt] = None,
) -> None:
    """Rewrite an older recipe in the current sd-mecha format (what `merge run` does in memory)."""
    from tunelab.merge.recipe import parse_maps, to_sd_mecha
    from tunelab.merge.run import read_recipe
    from tunelab.run import write_text_atomic

    r = read_recipe(recipe, models_dir, parse_maps(map_ or []))
    write_text_atomic(out, to_sd_mecha(r))
    for note in r.notes:
        typer.echo(f"  {note}")
    typer.echo(f"upgraded: {out}")


@merge_app.command("preset")
def merge_preset(
    method: Annotated[str, typer.Argument(help="weighted_sum, add_difference, ties, dare, della, geometric_median, model_stock, dgmla.")],
    models: Annotated[list[Path], typer.Argument(help="The models: A B (weighted_sum), A B C (add_difference: A + alpha (B - C)), or the finetunes to merge into --base.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged checkpoint (.safetensors); its recipe goes beside it (.mecha).")],
    base: Annotated[Optional[Path], typer.Option(help="The base the finetunes' differences are taken from (ties, dare, della, model_stock, dgmla).")] = None,
    alpha: Annotated[str, typer.Option(help="Ratio: one number, or per part: 'unet=0.5,te1=0.2,te2=0.2,vae=0,IN04=0.3,default=1'. Default: 0.5 for weighted_sum, else 1 (alpha > 1 amplifies a difference).")] = "",
    k: Annotated[float, typer.Option(help="TIES: share of each difference kept, by magnitude per tensor.")] = 0.2,
    p: Annotated[float, typer.Option(help="DARE / DELLA / DGMLA: drop probability.")] = 0.9,
    rescale: Annotated[bool, typer.Option(help="DARE / DELLA / DGMLA: scale kept differences by 1 / (1 - p).")] = True,
    eps: Annotated[float, typer.Option(help="DELLA / DGMLA: how much lower the drop probability of the largest differences is.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the random drops (the same seed, the same merge).")] = 0,
    vae: Annotated[Optional[Path], typer.Option(help="Bake this VAE in (a checkpoint or VAE-only file with first_stage_model.* keys).")] = None,
    dtype: Annotated[str, typer.Option(help="dtype of the output.")] = "fp16",
    merge_dtype: Annotated[str, typer.Option(help="dtype the merge computes in.")] = "fp64",
) -> None:
    """Merge with one of the field's methods, through sd-mecha; writes the equivalent recipe (.mecha)
    beside the output so it can be rerun or edited."""
    from tunelab.merge.presets import build, parse_ratio
    from tunelab.merge.run import merge_recipe

    ratio = parse_ratio(alpha, 0.5 if method == "weighted_sum" else 1.0) if alpha else None
    recipe = build(method, [str(m) for m in models], base=base, alpha=ratio, k=k, p=p, rescale=rescale, eps=eps,
                   seed=seed, vae=vae)
    merged = merge_recipe(recipe, out, dtype, merge_dtype)
    typer.echo(f"merged: {merged.path} ({method}, alpha {ratio.describe() if ratio else 'default'}); recipe: {merged.mecha}")


@merge_app.command("back")
def merge_back(
    base: Annotated[Optional[Path], typer.Option(help="The base the finetune was trained from (or the merged base it goes back into); default with --run: the run's model.base.")] = None,
    finetune: Annotated[Optional[Path], typer.Option(help="The finetune's checkpoint; default with --run: its last.safetensors.")] = None,
    ratios: Annotated[str, typer.Option(help="The finetune's share in each candidate, e.g. 0.25,0.5,0.75.")] = "0.25,0.5,0.75",
    parts: Annotated[str, typer.Option(help="Merge only these parts at the ratio (te1,te2,unet,vae); the others stay the base's. Default: all.")] = "",
    run: Annotated[Optional[Path], typer.Option(help="The finetune's run directory: probes use its inputs, and results go to RUN/merges/back unless --out.")] = None,
    probe: Annotated[bool, typer.Option("--probe", help="Measure every candidate with the run's probes (learn loss, preserve drift, scores).")] = False,
    drift: Annotated[bool, typer.Option("--drift", help="Add each candidate's weight distance from the base.")] = False,
    grid: Annotated[bool, typer.Option("--grid", help="Render the run's [grid] prompts and seeds for the base, every candidate and the finetune (grids/, in ratio order).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the candidates, merge-back.csv/.json/.png.")] = None,
    dtype: Annotated[str, typer.Option(help="dtype of the candidates.")] = "fp16",
) -> None:
    """Merge a finetune back into its base at several ratios, and (with --run --probe) show what
    each candidate learned and forgot in one table and one chart."""
    from tunelab.merge.back import merge_back as back, parse_ratios
    from tunelab.run import RunDir

    base, finetune = _from_run(run, base, finetune)
    folder = out or (RunDir(run).path / "merges" / "back" if run else Path("merge-back"))
    result = back(base, finetune, parse_ratios(ratios), folder, [p for p in parts.split(",") if p] or None, run,
                  probe, drift, dtype, grid=grid)
    cols = [c for c in ("probe/learn_loss", "probe/drift_preserve", "weights/distance_from_base")
            if any(r.get(c) is not None for r in result.rows)]
    typer.echo("  ".join([f"{'ratio':>6}", f"{'file':>24}", *(f"{c.split('/')[-1]:>20}" for c in cols)]))
    for r in result.rows:
        typer.echo("  ".join([f"{r['ratio']:>6.3g}", f"{r['file'][-24:]:>24}",
                              *(f"{r[c]:>20.5g}" if r.get(c) is not None else f"{'-':>20}" for c in cols)]))
    typer.echo(f"table and chart: {folder / 'merge-back.csv'}, {folder / 'merge-back.png'}")


def _from_run(run: Optional[Path], base: Optional[Path], finetune: Optional[Path]) -> tuple[Path, Path]:
    """--base and --finetune, defaulting to a run's model.base and last checkpoint."""
    if run is not None and (base is None or finetune is None):
        from tunelab.run import RunDir

        rd = RunDir(run)
        if not rd.config.is_file():
            raise TunelabError(f"--run {run}: not a run directory (no config.json)")
        if base is None:
            base = Path(json.loads(rd.config.read_text()).get("model", {}).get("base", ""))
        finetune = finetune or rd.checkpoint_path("last")
    if base is None or finetune is None:
        raise TunelabError("give --base and --finetune (or --run RUN to take the run's base and last checkpoint)")
    for what, p in (("--base", base), ("--finetune", finetune)):
        if not Path(p).is_file():
            raise TunelabError(f"{what} {p}: no such checkpoint file")
    return Path(base), Path(finetune)


@merge_app.command("evolve")
def merge_evolve(
    run: Annotated[Path, typer.Option(help="The run whose probe inputs measure each candidate (the finetune's run directory).")],
    base: Annotated[Optional[Path], typer.Option(help="The base the models' differences are taken from; default: the run's model.base.")] = None,
    finetune: Annotated[Optional[list[Path]], typer.Option(help="A model to merge into the base (repeat for several); default: the run's last.safetensors.")] = None,
    budget: Annotated[int, typer.Option(help="Evaluations of the search; the uniform-ratio baseline gets as many.")] = 60,
    space: Annotated[str, typer.Option(help="blocks: te1, te2 and the UNet's 21 blocks; components: te1, te2, unet.")] = "blocks",
    fitness: Annotated[str, typer.Option(help="Weighted probe numbers to minimise, e.g. learn_loss=1,drift_preserve=1 (a score with a negative weight rewards it).")] = "learn_loss=1,drift_preserve=1",
    popsize: Annotated[int, typer.Option(help="Candidates per generation; 0 = CMA-ES's default.")] = 0,
    seed: Annotated[int, typer.Option(help="Seeds the search.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the state, history.csv, summary.json, evolve.png and best.safetensors (default RUN/merges/evolve).")] = None,
    dtype: Annotated[str, typer.Option(help="dtype of best.safetensors.")] = "fp16",
) -> None:
    """Search per-part merge ratios with CMA-ES, each candidate mixed in memory and measured with
    the run's probes; beats (or not) the best uniform ratio at the same budget, and says by how
    much. Killed? Run the same command again: it resumes after the last finished generation."""
    from tunelab.merge.evolve import EvolveSettings, evolve, parse_fitness
    from tunelab.run import RunDir

    base, first = _from_run(run, base, finetune[0] if finetune else None)
    finetune = list(finetune) if finetune else [first]
    settings = EvolveSettings(budget=budget, space=space, fitness=parse_fitness(fitness), popsize=popsize, seed=seed)
    folder = out or RunDir(run).path / "merges" / "evolve"
    r = evolve(base, list(finetune), run, folder, settings, dtype)
    rel = 100 * r.improvement / abs(r.uniform_fitness) if r.uniform_fitness else float("nan")
    typer.echo(f"best uniform ratio {r.uniform_ratio:.3g}: fitness {r.uniform_fitness:.6g}")
    typer.echo(f"CMA-ES ({budget} evaluations): fitness {r.best_fitness:.6g}  "
               f"({'better' if r.improvement > 0 else 'not better'} by {r.improvement:.3g}, {rel:.2f} %)")
    typer.echo("ratios: " + ", ".join(f"{p} {w:.2f}" for p, w in zip(r.parts * len(finetune), r.best_weights)))
    typer.echo(f"written: {folder / 'best.safetensors'}, {folder / 'best.mecha'}, {folder / 'history.csv'}, "
               f"{folder / 'evolve.png'}")


# --- toy / demo / report -------------------------------------------------------------------------


@toy_app.command("world")
def toy_world(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write images with .txt tags and .caption captions (kohya layout).")],
    n_images: Annotated[int, typer.Option(min=1, help="Number of images.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives identical files.")] = 0,
    concept_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of images showing the concept to learn ('astolfo', a striped pink star); split 'mixed' only.")] = 0.25,
    split: Annotated[str, typer.Option(help="Which part of the world: base (what the shipped toy base knows), concept (astolfo only), style (base subjects outlined), preserve (base subjects a concept finetune never shows), mixed (base + a share of concept), any (every look, stripes and outlines at random: what the toy VAE learns from).")] = "mixed",
    stripe_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of looks with cyan stripes, tagged 'stripes' (never a pink star); split 'base' only (the shipped base was pretrained with 0.2).")] = 0.0,
    n: Annotated[Optional[int], typer.Option("--n", min=1, hidden=True)] = None,  # deprecated: --n-images
) -> None:
    """Write the toy world's synthetic dataset: coloured shapes on backgrounds, with tags, captions
    and the ground truth of each image (looks.jsonl)."""
    from tunelab.toy.world import SPLITS, make_world

    n_images = _renamed(ctx, "--n-images", n_images, "--n", n)
    if split not in SPLITS:
        raise TunelabError(f"--split {split!r} is not a split of the toy world; choose one of: {', '.join(SPLITS)}")
    if stripe_share and split != "base":
        raise TunelabError(f"--stripe-share is for --split base only (got --split {split}); leave it out or use --split base")
    samples = make_world(out, n=n_images, seed=seed, concept_share=concept_share, split=split, stripe_share=stripe_share)
    typer.echo(f"wrote {len(samples)} images ({split}) with tags and captions to {out}")


@toy_app.command("pretrain")
def toy_pretrain(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the base split, its index and latents, the run, and toy-base.safetensors.")],
    seed: Annotated[int, typer.Option(help="Seeds the world, the initial weights and the training.")] = 0,
    tiny: Annotated[bool, typer.Option("--tiny", help="A few steps of every stage: checks the pipeline in seconds; the model draws nothing.")] = False,
) -> None:
    """Pretrain the toy base model from nothing on the toy world's base split: VAE, then UNet and
    both text encoders with tunelab's own index, cache and trainer (about 25 minutes on 2 CPU
    cores). Before the UNet trains, the VAE is read back (vae.json, vae-loss.png): a codec that
    loses colours is named then. The package ships the result of the defaults (seed 0)."""
    from tunelab.toy.pretrain import PretrainSettings, pretrain

    settings = PretrainSettings.tiny(seed) if tiny else PretrainSettings(seed=seed)
    result = pretrain(out, settings)
    typer.echo(f"toy base: {result.base}")


@toy_app.command("score")
def toy_score(
    checkpoint: Annotated[Path, typer.Argument(help="A toy checkpoint (.safetensors); default: the shipped toy base.")] = None,  # type: ignore[assignment]
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write a sheet of every rendered image (PNG; wrong readings framed red).")] = None,
    sets: Annotated[str, typer.Option(help="Comma-separated: concept (astolfo), preserve (cars and other base shapes), base (a sample of the base split), striped (base looks asked for with stripes).")] = "concept,preserve,base",
) -> None:
    """Render fixed prompts with fixed seeds and read each image back with the concept reader:
    the share drawn right per set (what a toy model knows, learned or forgot)."""
    from tunelab.toy.evaluate import SETS, evaluate_file, sheet
    from tunelab.toy.pretrain import shipped_base

    names = [n.strip() for n in sets.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown:
        raise TunelabError(f"--sets: unknown {', '.join(unknown)}; choose from {', '.join(SETS)}")
    path = checkpoint or shipped_base()
    scores = evaluate_file(str(path), names)
    for name, s in scores.items():
        attrs = ", ".join(f"{k} {v:.0%}" for k, v in s.per_attribute.items())
        typer.echo(f"{name:9s} {s.accuracy:6.1%} all right  ({attrs}; n = {s.n})")
    if out is not None:
        typer.echo(f"sheet: {sheet(scores, str(out))}")


@toy_app.command("experiment")
def toy_experiment(
    name: Annotated[str, typer.Argument(help="tte (text encoders off/on/only), unet-parts (full/71/63 %), lr (x0.3/x1/x3), bf16 (fp32 master vs full_bf16 nearest / stochastic / exact), accumulation (effective batch 16 vs 4).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the data, the runs, results.csv, summary.md and summary.png.")] = Path("toy-experiments"),
    seeds: Annotated[int, typer.Option(min=1, help="Finetunes per arm, one per seed (mean ± spread over them).")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of each finetune.")] = 120,
    eval_steps: Annotated[int, typer.Option(min=1, help="Sampler steps of every scored image.")] = 30,
    probes: Annotated[bool, typer.Option(help="Probe every finetune (learn loss on held-out images, preserve drift from the base) and correlate drift with what was forgotten; --no-probes is ~25 % faster.")] = True,
) -> None:
    """Run one of the seed's comparisons in miniature on the shipped toy base: each arm finetuned
    once per seed, then scored by what it draws (concept learned, preserve kept) and probed."""
    from tunelab.toy.experiments import run_experiment
    from tunelab.toy.finetune import FinetuneSettings

    result = run_experiment(name, out / name, seeds=seeds, settings=FinetuneSettings(steps=steps, probe=probes),
                            eval_steps=eval_steps)
    typer.echo(", ".join(f"{k}: {v}" for k, v in result.files.items()))


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything the demo writes.")] = Path("demo-out"),
    n_images: Annotated[int, typer.Option(min=4, help="Number of images in the toy dataset.")] = 48,
    steps: Annotated[int, typer.Option(min=2, help="Optimizer steps of the finetune.")] = 120,
) -> None:
    """Run the whole flow on the built-in toy world on a CPU in about two minutes: the shipped toy
    base finetuned on a new concept (data, index, latent cache, training with grids), what it
    learned and kept (concept and preserve accuracy, read from rendered images), loss curve and
    weight drift."""
    from tunelab.demo import run_demo

    run_demo(out, n_images=n_images, steps=steps)


@app.command("report")
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="A run directory, or several runs to compare side by side.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The HTML file to write (default: RUN/report.html for one run, ./report.html for several).")] = None,
    drift: Annotated[bool, typer.Option(help="Compute the weight drift over the base and every checkpoint into RUN/drift when it is missing or out of date (streams each file once); --no-drift shows only what is there.")] = True,
    title: Annotated[str, typer.Option(help="Page title (default: the runs' names).")] = "",
) -> None:
    """Write one self-contained HTML page about a finetune: derived numbers and the resolved run
    file, loss with its trend verdict, what it learned and forgot (probes), each grid prompt across
    the checkpoints, weight drift, the dataset; for several runs, a comparison with the settings
    that differ highlighted. No network needed to view it; the trainer refreshes RUN/report.html at
    every checkpoint."""
    from tunelab.report import write_report

    path = write_report(run_dirs, out, drift=drift, title=title)
    typer.echo(f"report: {path} (open it in a browser)")


def main() -> None:
    try:
        app()
    except TunelabError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
