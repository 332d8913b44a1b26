"""`tunelab demo`: the flow as far as it exists, on the toy world, on a CPU, in a few minutes.

Every stage runs the real library code on real files (no stage is simulated): it grows as the
trainer, grids, probes and merges land. Each stage logs what it produced so a newcomer can follow.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tunelab.run import RunDir

log = logging.getLogger(__name__)


def _stage(title: str) -> float:
    log.info("\n== %s", title)
    return time.perf_counter()


def run_demo(out: str | Path, n_images: int = 48, seed: int = 0, steps: int = 120) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = {"world": _world(out, n_images, seed)}
    paths["index"] = _index(out, paths["world"])
    paths["base"] = _model(out)
    before = _score(out, paths["base"], "3b. what the shipped base draws (rendered, then read back by the concept reader)",
                    "before")
    paths["latents"] = _cache(out, paths["index"], paths["base"])
    _prompts(paths["index"], seed)
    _conditioning(paths["base"], paths["index"], seed)
    paths["run"] = _train(out, paths, steps)
    after = _score(out, RunDir(paths["run"]).checkpoint_path("last"),
                   "7b. what the finetune draws: learned (concept) and kept (preserve)", "after")
    _learned(before, after)
    paths["loss"] = _loss(out, paths["run"])
    paths["drift"] = _drift(out, paths)
    _config()
    paths["merge"] = _merge_back(paths)
    paths["report"] = _report(paths["run"])
    log.info("\n== done in %.0f s; everything is in %s", time.perf_counter() - t0, out)
    log.info("open %s in a browser: the whole run on one page", paths["report"])
    log.info("or look at: %s (the data), %s (grid over the checkpoints), %s / %s (what the base and the finetune "
             "draw), %s (learned / forgot probes), %s (loss curve), %s (weight drift)", out / "toy-world.png",
             paths.get("grid", "-"), out / "scores-before.png", out / "scores-after.png",
             RunDir(paths["run"]).probes / "training.png", paths["loss"], paths["drift"] / "trajectory.png")
    log.info("next: `tunelab toy score %s`, `tunelab model inspect %s`, `tunelab config show --fields`",
             RunDir(paths["run"]).checkpoint_path("last"), paths["base"])
    return paths


def _world(out: Path, n: int, seed: int) -> Path:
    from tunelab.toy.world import CONCEPT, contact_sheet, make_world

    _stage(f"1. toy world: the new concept {CONCEPT!r} (a pink star with cyan stripes; kohya folder layout)")
    world = out / "toy-world"
    samples = make_world(world, n=n, seed=seed, split="concept")
    log.info("%d images in %s, named by a word the base never saw; e.g. %s.png", len(samples), world, samples[0].name)
    log.info("  tags:    %s\n  caption: %s", samples[0].tags, samples[0].caption)
    log.info("overview picture: %s", contact_sheet(world, out / "toy-world.png"))
    return world


def _index(out: Path, world: Path) -> Path:
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index, index_stats, stats_text

    _stage("2. dataset index (Parquet): sizes from image headers, tags, captions, buckets")
    index = out / "index.parquet"
    opts = IndexOptions(buckets=BucketConfig(resolution=80, min_side=32, max_side=128, step=32), holdout=0.1, seed=0)
    summary = build_index([f"folder:{world},prefix=toy/"], index, opts)
    log.info("%s: %d images, %d rejected, %d held out", index, summary.rows, summary.rejected, summary.holdout_rows)
    log.info("%s", stats_text(index_stats(index, top_tags=8, progress=False)))
    return index


def _model(out: Path) -> Path:
    from tunelab.models.checkpoint import inspect_file, load_checkpoint, save_checkpoint
    from tunelab.models.vocab import label
    from tunelab.toy.pretrain import shipped_base

    t = _stage("3. base model: the shipped toy base (SDXL topology, pretrained on the toy world; SGM .safetensors)")
    base = shipped_base()
    report = inspect_file(base)
    log.info("%s: %s, %s, %d tensors, %s parameters", base.name, report["arch"], report["dtype"], report["tensors"],
             f"{report['parameters']:,}")
    for comp, n in report["per_component"].items():  # te1 (CLIP-L), te2 (bigG), unet, vae, other
        log.info("  %-13s %12s", label(comp), f"{n:,}")
    comps = load_checkpoint(base)
    again = save_checkpoint(comps, out / "base-copy.safetensors", dtype="fp16")
    same = all(torch.equal(a, b) for a, b in zip(comps.unet.state_dict().values(),
                                                 load_checkpoint(again).unet.state_dict().values()))
    log.info("load -> save fp16 -> %s (%.1f MiB); reloaded identical: %s  [%.1f s]", again.name,
             again.stat().st_size / 2**20, same, time.perf_counter() - t)
    return base


def _score(out: Path, checkpoint: Path, title: str, name: str):
    from tunelab.toy.evaluate import evaluate_file, sheet

    t = _stage(title)
    scores = evaluate_file(str(checkpoint), ("concept", "preserve"))
    for s in scores.values():
        log.info("  %-9s %5.1f %% drawn right (n = %d)", s.name, 100 * s.accuracy, s.n)
    log.info("  every image, wrong readings framed red: %s  [%.0f s]", sheet(scores, str(out / f"scores-{name}.png")),
             time.perf_counter() - t)
    return scores


def _learned(before, after) -> None:
    b, a = before["concept"], after["concept"]
    log.info("  concept  %5.1f %% -> %5.1f %%   (learned: all of it; a pink star, stripes or not: %.1f %% -> %.1f %%)",
             100 * b.accuracy, 100 * a.accuracy, 100 * b.subject, 100 * a.subject)
    log.info("  preserve %5.1f %% -> %5.1f %%   (kept; the finetune data never shows these)",
             100 * before["preserve"].accuracy, 100 * after["preserve"].accuracy)


def _cache(out: Path, index: Path, base: Path) -> Path:
    from tunelab.data.latents import cache_latents, verify_cache
    from tunelab.models.checkpoint import load_checkpoint

    t = _stage("4. latent cache: VAE-encoded, checksummed shards (what training reads)")
    latents = out / "latents"
    summary = cache_latents(index, latents, load_checkpoint(base, dtype=torch.float32).vae, progress=False)
    report = verify_cache(index, latents, progress=False)
    log.info("%d latents in %d shard(s); verify: %s  [%.1f s]", summary.encoded, len(summary.shards_written),
             "all entries present and intact" if report.ok else report.text(), time.perf_counter() - t)
    return latents


def _prompts(index: Path, seed: int) -> None:
    import pyarrow.parquet as pq

    from tunelab.data.captions import CaptionConfig, prompt_for
    from tunelab.models.text import CHUNK_TOKENS, count_tokens, load_tokenizers

    _stage("5. prompts as the model sees them (dual captions 'concat', 75-token chunks)")
    rows = pq.read_table(index, columns=["key", "tags", "caption"]).slice(0, 3).to_pylist()
    tok1, _ = load_tokenizers("toy")
    cfg = CaptionConfig(mode="concat", shuffle_tags=True, keep_tags=1)
    for i, row in enumerate(rows):
        prompt = prompt_for(row["tags"], row["caption"], cfg, seed=seed, epoch=0, index=i)
        n = count_tokens(tok1, [prompt])[0]
        log.info("  %-14s %3d tokens -> %d chunk(s): %s", row["key"], n, max(1, -(-n // CHUNK_TOKENS)), prompt)


def _conditioning(base: Path, index: Path, seed: int) -> None:
    from tunelab.config import ObjectiveSection
    from tunelab.models.arch import scheduler_config
    from tunelab.models.checkpoint import load_checkpoint
    from tunelab.models.text import load_tokenizers
    from tunelab.train.objectives import Objective
    from tunelab.train.step import StepModels, TextSettings, conditioning, micro_conditioning, predict

    t = _stage("6. SDXL conditioning and one UNet noise prediction (train/step.py: what training runs)")
    models = StepModels.of(load_checkpoint(base, dtype=torch.float32), load_tokenizers("toy"))
    long = ", ".join(["pink star with cyan stripes on a sky background"] * 12)
    prompts = ["astolfo, pink, star, solo", "car, wrc", "", long]
    with torch.no_grad():
        for max_chunks in (1, 3):
            cond = conditioning(models, prompts, TextSettings(max_chunks=max_chunks))
            log.info("  max_chunks=%d: context %s, pooled %s, truncated tokens per prompt %s", max_chunks,
                     tuple(cond.context.shape), tuple(cond.pooled.shape), cond.truncated)
        sizes = {"original_size_hw": torch.tensor([(64, 64)] * 4), "crop_top_left": torch.tensor([(0, 0)] * 4),
                 "target_size_hw": torch.tensor([(64, 64)] * 4)}
        ids = micro_conditioning(sizes, "cpu")
        gen = torch.Generator().manual_seed(seed)
        latents, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)  # (B, 4, H/8, W/8)
        objective = Objective.from_config(ObjectiveSection(), scheduler_config("toy"))
        noised = objective.make(latents, noise, torch.tensor([999, 500, 250, 1]))  # fixed noise and timesteps
        eps = predict(models.unet, noised, cond, ids)
    log.info("  time ids %s; UNet(x_t %s at t = 999, 500, 250, 1) -> noise prediction %s  [%.1f s]",
             tuple(ids.shape), tuple(noised.noisy.shape), tuple(eps.shape), time.perf_counter() - t)


def _train(out: Path, paths: dict[str, Path], steps: int) -> Path:
    from tunelab.toy.finetune import FinetuneSettings, ToyData, write_run_file
    from tunelab.train.trainer import train

    t = _stage("7. train: finetune the base on the concept, text encoders on + 71 % of the UNet; grids and probes "
               "at checkpoints")
    data = ToyData(paths["world"], paths["index"], paths["latents"])  # probes learn on the index's holdout split
    settings = FinetuneSettings(steps=steps, save_every=max(1, steps // 4), grid=True, probe=True)
    run_file = write_run_file(out / "run.toml", out / "run", paths["base"], data, settings, name="demo")
    result = train(run_file)
    run = RunDir(out / "run")
    grids = sorted(run.samples.glob("step-*/grid*.png"))
    if grids:
        paths["grid"] = _timeline(grids, out / "grid-timeline.png")
    log.info("%d steps, %d samples; checkpoints: %s  [%.0f s]", result.steps, result.samples_seen,
             ", ".join(c.path.name for c in run.checkpoint_files()), time.perf_counter() - t)
    _probes(run)
    log.info("run it again (`tunelab train %s`) and it resumes from the saved state", run_file)
    return run.path


def _probes(run: RunDir) -> None:
    """The probe's headline: learn loss on held-out concept images, drift from the base on preserve looks."""
    from tunelab.probe.plots import series
    from tunelab.probe.suite import TRAINING, read_table

    rows = read_table(run.probes / f"{TRAINING}.parquet")
    steps, loss = series(rows, "learn", "loss")
    _, drift = series(rows, "preserve", "drift")
    log.info("  probes (same noise and timesteps every time; docs/probes.md), steps %s:", ", ".join(map(str, steps)))
    log.info("    learn loss on 8 held-out concept images (the index's holdout split)  %s", " -> ".join(f"{v:.4f}" for v in loss))
    log.info("    preserve drift from the base                                           %s", " -> ".join(f"{v:.4f}" for v in drift))
    log.info("    chart: %s", run.probes / f"{TRAINING}.png")


def _timeline(grids: list[Path], out: Path) -> Path:
    """The grids of every checkpoint side by side, in training order (step folders sort by step)."""
    from PIL import Image

    images = [Image.open(g).convert("RGB") for g in grids]
    page = Image.new("RGB", (sum(i.width for i in images) + 8 * (len(images) - 1), max(i.height for i in images)),
                     (255, 255, 255))
    x = 0
    for image in images:
        page.paste(image, (x, 0))
        x += image.width + 8
    page.save(out)
    return out


def _loss(out: Path, run: Path) -> Path:
    from tunelab.analyze.loss import analyze_loss, format_summary

    _stage("8. loss curve from the run's tensorboard events, with a trend verdict")
    report = analyze_loss([RunDir(run).events], out_dir=out / "loss", window=4, warmup=0.2)
    log.info("%s", format_summary(report))
    return report.files.get("png", out / "loss" / "loss.png")


def _drift(out: Path, paths: dict[str, Path]) -> Path:
    from tunelab.analyze.drift import run_drift, summary
    from tunelab.report.collect import DRIFT

    _stage("9. weight drift: base -> mid-run -> last, streamed key by key")
    ckpts = [c.path for c in RunDir(paths["run"]).checkpoint_files()]  # training order, `last` at the end
    folder = RunDir(paths["run"]).path / DRIFT  # where the report looks for it
    report = run_drift([paths["base"], *ckpts], folder, progress=False, signs=True)
    lines = summary(report)
    for line in lines[:8] + [line for line in lines if line.startswith("sign agreement")]:
        log.info("%s", line)
    return folder


def _merge_back(paths: dict[str, Path]) -> Path:
    from tunelab.merge.back import merge_back

    t = _stage("11. merge back: the finetune into its base at 0.5 (sd-mecha), measured with the run's probes")
    run = RunDir(paths["run"])
    result = merge_back(paths["base"], run.checkpoint_path("last"), [0.5], run.path / "merges" / "back", run=run.path,
                        probe=True, progress=False)
    for r in result.rows:
        log.info("  ratio %-4g %-26s learn loss %.4f   preserve drift %.4f", r["ratio"], r["file"],
                 r["probe/learn_loss"], r["probe/drift_preserve"])
    log.info("  chart: %s  [%.0f s]", result.out / "merge-back.png", time.perf_counter() - t)
    return result.out


def _report(run: Path) -> Path:
    from tunelab.report import write_report

    t = _stage("12. the run report: one HTML page (numbers, loss, probes, grids over training, drift, merges, data, "
               "settings)")
    path = write_report([run], progress=False)  # the trainer rewrote it at every checkpoint; now with drift
    log.info("%s (%.0f kB)  [%.2f s]", path, path.stat().st_size / 1e3, time.perf_counter() - t)
    return path


def _config() -> None:
    from tunelab.config import parse_config
    from tunelab.errors import TunelabError

    _stage("10. run files: validated before anything loads")
    try:
        parse_config({"optim": {"lr_unt": 1e-5}, "train": {"parts": {"text_encoder": "onyl"}}}, "example.toml")
    except TunelabError as err:  # the demo shows the message a user would get
        log.info("%s", err)
