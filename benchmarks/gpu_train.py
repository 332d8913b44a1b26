"""Full-size SDXL training step on a CUDA GPU: img/s, peak memory, model FLOP utilisation, and
whether the field's 24 GB recipe fits.

Run on a machine with an NVIDIA GPU (prepared for the lent H200; nothing here runs on the CPU):

    .venv/bin/python benchmarks/gpu_train.py --out gpu-results.json [--peak-tflops 989]

What it does, each case in a fresh model state:
  1. builds SDXL from a random checkpoint written by `tunelab model new --arch sdxl` (no download);
  2. trains the UNet (+ both text encoders where stated) on random 1024x1024 latents (128x128),
     bf16 autocast, bf16 weights ("full bf16") or fp32 master weights, gradient checkpointing, SDPA;
  3. measures img/s over timed steps after warm-up, peak allocated memory, and FLOPs of one step
     counted by torch.utils.flop_counter -> MFU = FLOPs/s / peak bf16 FLOPs/s of the GPU;
  4. the 24 GB question: 100 % UNet + both encoders, AdamW8bit, batch 1, under
     torch.cuda.set_per_process_memory_fraction(24 GiB / total) — fits or OOM.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch


def make_checkpoint(path: Path) -> Path:
    from tunelab.models.checkpoint import new_checkpoint

    if not path.exists():
        new_checkpoint("sdxl", path, seed=0, dtype="bf16")
    return path


def load(path: Path, weights: torch.dtype):
    from tunelab.models.checkpoint import load_checkpoint

    comps = load_checkpoint(path, dtype=weights)
    for m in comps.modules().values():
        m.to("cuda")
    return comps


def step_fn(comps, batch: int, train_te: bool):
    """One training step's forward/backward on random inputs (shapes of SDXL at 1024^2), through
    the trainer's own forward (train/step.py), with token ids drawn at random (no tokenizer)."""
    from tunelab.models.text import Conditioning, encode_chunked
    from tunelab.train.objectives import NoisedBatch
    from tunelab.train.step import predict

    ids = torch.randint(0, 49407, (batch, 1, 77), device="cuda")  # (B, chunks, 77)
    latents = torch.randn(batch, 4, 128, 128, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device="cuda", dtype=torch.float32)
    noised = NoisedBatch(latents, t, latents, t.float())

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(True):
            with torch.set_grad_enabled(train_te):
                h1, h2, pooled = encode_chunked((comps.text_encoder_1, comps.text_encoder_2), ids, ids)
                cond = Conditioning(torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled, 1, [0] * batch)
            pred = predict(comps.unet, noised, cond, time_ids)
            loss = torch.nn.functional.mse_loss(pred.float(), latents)
        loss.backward()
    return run


def measure(ckpt: Path, batch: int, full_bf16: bool, train_te: bool, optim: str, steps: int,
            peak_tflops: float, memory_gib: float | None = None) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if memory_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib * 2**30 / total))
    case = {"batch": batch, "full_bf16": full_bf16, "train_text_encoders": train_te, "optimizer": optim,
            "memory_limit_gib": memory_gib}
    try:
        comps = load(ckpt, torch.bfloat16 if full_bf16 else torch.float32)
        comps.unet.enable_gradient_checkpointing()
        params = list(comps.unet.parameters())
        if train_te:
            for te in (comps.text_encoder_1, comps.text_encoder_2):
                te.gradient_checkpointing_enable()
                params += list(te.parameters())
        else:
            for te in (comps.text_encoder_1, comps.text_encoder_2):
                te.requires_grad_(False)
        comps.vae.to("cpu")
        opt = _optimizer(optim, params)
        run = step_fn(comps, batch, train_te)
        flops = _count_flops(run)
        opt.step(); opt.zero_grad(set_to_none=True)
        for _ in range(2):  # warm-up
            run(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            run(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        case |= {"fits": True, "img_per_s": batch / dt, "s_per_step": dt, "flops_per_step": flops,
                 "mfu": flops / dt / (peak_tflops * 1e12), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    except torch.OutOfMemoryError as err:
        case |= {"fits": False, "error": str(err).splitlines()[0]}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()
    print(json.dumps(case), flush=True)
    return case


def _optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-6, weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-2, fused=True)


def _count_flops(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-results.json"))
    ap.add_argument("--ckpt", type=Path, default=Path(tempfile.gettempdir()) / "tunelab-sdxl-random.safetensors")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_train.py needs a CUDA GPU")
    ckpt = make_checkpoint(args.ckpt)
    cases = [measure(ckpt, b, True, False, "adamw", args.steps, args.peak_tflops) for b in (1, 4)]
    cases.append(measure(ckpt, 1, True, True, "adamw", args.steps, args.peak_tflops))
    cases.append(measure(ckpt, 1, True, True, "adamw8bit", args.steps, args.peak_tflops, memory_gib=24.0))
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": cases}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
