"""`--estimate-memory` against measured peaks on the CPU, against the field's reports, and the
"fits on your card" table of the field's recipes (docs/training.md "Will it fit?").

    .venv/bin/python benchmarks/memory_estimate.py validate [--cases toy-fp32,mid-bf16]   # CPU measured vs estimate
    .venv/bin/python benchmarks/memory_estimate.py field      # kohya's DeepSpeed and fused-backward reports
    .venv/bin/python benchmarks/memory_estimate.py table      # full SDXL recipes on 24 / 48 / 80 / 141 GB
    .venv/bin/python benchmarks/memory_estimate.py gpu [--cases sdxl-bf16,...] [--json F]  # CUDA measured vs estimate

Measured: each case runs in a fresh process (`measure CASE`, glibc told to map every block of 64 KiB
or more on its own, MALLOC_MMAP_THRESHOLD_, so a freed tensor leaves the resident set at once).
The process builds the model with real weights, sets dtypes, checkpointing and the optimizer as the
trainer's `_prepare` does, and takes one optimizer step (the optimizer's states are created). Then
the kernel's peak-RSS counter is reset (/proc/self/clear_refs) and a second step runs: the peak is
the tensors alive before it (weights, buffers, optimizer states: summed storage by storage) + the
resident-set growth during it (freed heap pages are handed back first, malloc_trim, so blocks
the second step reuses count as growth). Each step is the trainer's micro-step (train/step.py training_loss:
VAE encode of the pixels, prompts of `max_chunks` windows through the tokenizers and encoders, the
UNet, the loss) under the run's autocast, backward outside it, then the optimizer's step and
zero_grad(set_to_none) -- or the fused backward pass. The estimate is `estimate(..., target="cpu")`:
the same code the command runs, without the CUDA allowance.

`gpu` runs the same step on a CUDA GPU, the full SDXL topology included (random weights built on
the GPU, no download): the measured peak is torch.cuda.max_memory_allocated() over the second
step, the estimate `estimate(..., target="cuda").allocated` (the tensors alone; the allowance for
the CUDA context and the caching allocator's slack is what nvidia-smi adds on top).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

MIB = 2**20
LONG_PROMPT = ", ".join(f"tag{i} word{i}" for i in range(60))  # fills model.max_chunks windows

# name -> (arch, batch, side in px, run-file sections)
CASES: dict[str, tuple[str, int, int, dict]] = {
    "toy-fp32": ("toy", 4, 64, {"train": {"mixed_precision": "no", "gradient_checkpointing": False}}),
    "toy-bf16-te": ("toy", 4, 64, {"train": {"mixed_precision": "bf16", "gradient_checkpointing": True,
                                               "parts": {"text_encoder": "on"}},
                                     "optim": {"lr_text_encoder_1": 1e-5, "lr_text_encoder_2": 1e-5}}),
    "toy-fused-adafactor": ("toy", 4, 64, {"train": {"mixed_precision": "no", "gradient_checkpointing": True,
                                                       "fused_backward": True}, "optim": {"name": "adafactor"}}),
    "mid-fp32": ("mid", 1, 512, {"train": {"mixed_precision": "no", "gradient_checkpointing": True}}),
    "mid-bf16": ("mid", 2, 256, {"train": {"mixed_precision": "bf16", "gradient_checkpointing": False}}),
    "mid-bf16-weights": ("mid", 2, 256, {"train": {"mixed_precision": "bf16", "full_bf16": True,
                                                     "gradient_checkpointing": True}}),
    "mid-adafactor-activations": ("mid", 2, 512, {"train": {"mixed_precision": "no", "gradient_checkpointing": False},
                                                  "optim": {"name": "adafactor"}}),
    "mid-fused-bf16": ("mid", 2, 384, {"train": {"mixed_precision": "bf16", "gradient_checkpointing": False,
                                                 "fused_backward": True}}),
    "mid-unet63-lion": ("mid", 1, 384, {"train": {"mixed_precision": "no", "gradient_checkpointing": False,
                                                    "parts": {"unet": "unet63"}}, "optim": {"name": "lion"}}),
}
# Full SDXL at 1024x1024, gradient checkpointing (the field's recipes); measured on a GPU only.
_BF16W = {"mixed_precision": "bf16", "full_bf16": True, "gradient_checkpointing": True}
GPU_CASES: dict[str, tuple[str, int, int, dict]] = {
    "sdxl-bf16": ("sdxl", 1, 1024, {"train": _BF16W}),
    "sdxl-bf16-b4": ("sdxl", 4, 1024, {"train": _BF16W}),
    "sdxl-fp32-master": ("sdxl", 1, 1024, {"train": {"mixed_precision": "bf16", "gradient_checkpointing": True}}),
    "sdxl-bf16-te": ("sdxl", 1, 1024, {"train": _BF16W | {"parts": {"text_encoder": "on"}},
                                      "optim": {"lr_text_encoder_1": 1e-5, "lr_text_encoder_2": 1e-5}}),
    "sdxl-fused-adafactor-bf16": ("sdxl", 1, 1024, {"train": _BF16W | {"fused_backward": True, "bf16_update": "nearest"},
                                                   "optim": {"name": "adafactor"}}),
    "sdxl-unet71-fp32-master": ("sdxl", 1, 1024, {"train": {"mixed_precision": "bf16", "gradient_checkpointing": True,
                                                            "parts": {"unet": "unet71"}}}),
}
ALL_CASES = CASES | GPU_CASES


def mid_spec():
    """A mid-size SDXL topology: the toy's text encoders and VAE, a UNet 3/10 of SDXL's width
    (96 / 192 / 384 channels, transformer depths 1 / 2 / 3, 64-wide heads): 90.4 M parameters."""
    from tunelab.models.arch import load_arch

    toy = load_arch("toy")
    unet = dict(toy.unet, block_out_channels=[96, 192, 384], transformer_layers_per_block=[1, 2, 3],
                attention_head_dim=[3, 6, 12], norm_num_groups=32)
    return dataclasses.replace(toy, unet=unet)


def case_config(name: str):
    from tunelab.config import parse_config

    arch, batch, _, extra = ALL_CASES[name]
    model = {"base": "toy"} if arch != "sdxl" else {"base": "sdxl.safetensors", "arch": "sdxl"}
    sections = {"model": model | {"max_chunks": 2}, "train": {"batch_size": batch, "grad_accumulation": 1},
                "optim": {"lr_unet": 1e-5}}
    for key, values in extra.items():
        sections[key] = {**sections.get(key, {}), **values}
    return parse_config(sections)


def case_shape(name: str):
    from tunelab.train.memory_trace import StepShape

    _, batch, side, _ = ALL_CASES[name]
    return StepShape(batch, side, side, chunks=2, encode_images=True)


# --- measuring, in a fresh process ------------------------------------------------------------------------------


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _live_bytes(*groups) -> int:
    """Bytes of the distinct storages of the given tensors."""
    import torch

    seen = {}
    for tensors in groups:
        for t in tensors:
            if torch.is_tensor(t):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def prepare(name: str, device: str = "cpu"):
    """The case's modules, optimizer and step function, set up as the trainer's `_prepare` does."""
    import torch

    from tunelab.models.arch import build_components, load_arch
    from tunelab.models.text import load_tokenizers
    from tunelab.train.objectives import Objective
    from tunelab.train.optim import build_optimizer
    from tunelab.train.parts import select_trainable
    from tunelab.train.step import StepModels, TextSettings, training_loss
    from tunelab.train.trainer import _enable_checkpointing

    cfg, shape = case_config(name), case_shape(name)
    kind = ALL_CASES[name][0]
    arch = mid_spec() if kind == "mid" else kind
    comps = build_components(arch, device=device, seed=0)
    plan = select_trainable(comps, cfg.train.parts, cfg.optim, cfg.model.clip_skip)
    t = cfg.train
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
    for module in comps.modules().values():
        trains = any(p.requires_grad for p in module.parameters())
        dtype = (torch.bfloat16 if t.full_bf16 else torch.float32) if trains or half is None else half
        if next(module.parameters()).dtype != dtype:  # (diffusers warns on every dtype cast)
            module.to(dtype=dtype)
        module.train(trains)
        if trains and t.gradient_checkpointing:
            _enable_checkpointing(module)
    optimizer = build_optimizer(plan, cfg.optim, t.bf16_update if t.full_bf16 else "nearest", cfg.run.seed)
    params = [p for m in comps.modules().values() for p in m.parameters() if p.requires_grad]
    fused = None
    if t.fused_backward:
        from tunelab.train.fused import FusedBackward

        fused = FusedBackward(optimizer, params, t.max_grad_norm)
    models = StepModels.of(comps, load_tokenizers("toy"))
    objective = Objective.from_config(cfg.objective, load_arch("toy").scheduler, cfg.loss.noise_offset, cfg.loss)
    text = TextSettings(cfg.model.max_chunks, cfg.model.clip_skip, trains=t.parts.text_encoder != "off")

    def step(seed: int) -> None:
        b, side = shape.batch, shape.width
        batch = {"pixels": torch.rand(b, 3, side, side) * 2 - 1, "prompt": [LONG_PROMPT] * b,
                 "original_size_hw": torch.full((b, 2), side), "crop_top_left": torch.zeros(b, 2, dtype=torch.long),
                 "target_size_hw": torch.full((b, 2), side)}
        gen = torch.Generator().manual_seed(seed)
        autocast = torch.autocast(device, dtype=half) if half else torch.autocast(device, enabled=False)
        with autocast:
            loss = training_loss(models, batch, objective, cfg.loss, text, gen, device).loss
        if fused is None:
            loss.backward()
            optimizer.step()
        else:
            with fused.stepping():
                loss.backward()
        optimizer.zero_grad(set_to_none=True)

    return comps, optimizer, step


def measure(name: str) -> dict:
    import torch

    comps, optimizer, step = prepare(name)
    step(0)  # creates the optimizer's states; later steps are alike
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed small blocks leave the resident set too: reusing them counts
    live = _live_bytes(*(list(m.parameters()) + list(m.buffers()) for m in comps.modules().values()),
                       [v for st in optimizer.state.values() for v in st.values()])
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    base = _status("VmRSS")
    t0 = time.perf_counter()
    step(1)
    seconds = time.perf_counter() - t0
    grown = _status("VmHWM") - base
    return {"case": name, "live_before": live, "grown": grown, "peak": live + grown, "step_s": round(seconds, 2),
            "torch": torch.__version__}


def measure_cuda(name: str) -> dict:
    """The CUDA twin of `measure`: torch's own count of the tensors allocated during the second step."""
    import torch

    comps, optimizer, step = prepare(name, "cuda")
    step(0)
    torch.cuda.synchronize()
    gc.collect()
    live = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step(1)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    return {"case": name, "live_before": live, "grown": peak - live, "peak": peak, "step_s": round(seconds, 2),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}


def measure_in_subprocess(name: str, device: str = "cpu") -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    if device == "cuda":
        env.pop("OMP_NUM_THREADS")
    proc = subprocess.run([sys.executable, __file__, "measure", name, "--device", device], capture_output=True,
                          text=True, env=env, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"measuring {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimated(name: str, target: str = "cpu"):
    from tunelab.train.memory import estimate

    spec = mid_spec() if ALL_CASES[name][0] == "mid" else None
    return estimate(case_config(name), spec=spec, shape=case_shape(name), target=target)


def validate(names: list[str], as_json: bool = False, device: str = "cpu", save: Path | None = None) -> list[dict]:
    """Measured vs estimated, case by case; `save`: the rows so far are written there after each case."""
    rows = []
    if not as_json:
        print("| case | trained parameters | measured peak | estimate | error | estimate's peak phase | step |")
        print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for name in names:
        try:
            m = measure_in_subprocess(name, device)
        except RuntimeError as err:  # one case out of memory or broken: the others still run
            rows.append({"case": name, "error_text": str(err)[-1500:]})
            if save is not None:
                save.write_text(json.dumps(rows, indent=2))
            print(f"| {name} | failed: {str(err).splitlines()[-1][:200]} |", flush=True)
            continue
        e = estimated(name, "cuda" if device == "cuda" else "cpu")
        err = (e.allocated - m["peak"]) / m["peak"]
        n = e.trained
        rows.append({**m, "estimate": e.allocated, "error": err, "phase": e.transient.name})
        if save is not None:
            save.write_text(json.dumps(rows, indent=2))
        if as_json:
            continue
        print(f"| {name} | {n:,} | {m['peak'] / MIB:.1f} MiB | {e.allocated / MIB:.1f} MiB | {100 * err:+.1f} % | "
              f"{e.transient.name} | {m['step_s']:.1f} s |", flush=True)
    return rows


# --- the field's reports ------------------------------------------------------------------------------------------

# kohya-ss/sd-scripts PR #1101 (DeepSpeed), the author's report of 2024-02-19: SDXL 1.0, sdxl_train.py
# (full finetune), 24 GB RTX 3090s, 1024x1024 with buckets, batch 4, gradient accumulation 16,
# AdamW8bit; full_fp16 under DDP (DeepSpeed's own fp16 under ZeRO). nvidia-smi MB; None = OOM.
DEEPSPEED_PR = {("ddp", 2): None, ("ddp", 4): None, ("ddp", 6): None, ("ddp", 8): None,
                ("zero1", 2): None, ("zero1", 4): None, ("zero1", 6): None, ("zero1", 8): None,
                ("zero2", 2): None, ("zero2", 4): None, ("zero2", 6): None, ("zero2", 8): 23400,
                ("zero3", 2): None, ("zero3", 4): 21539, ("zero3", 6): 21569}
# kohya-ss/sd-scripts PR #1259 (fused backward pass for Adafactor), its title and description:
# "SDXL VRAM used to BF16 (10GB) / FP32 (16.4GB)"; sd-scripts' README for it: "about 17GB with a
# batch size of 1 and fp32".
FUSED_PR = {"bf16": 10.0, "fp32": 16.4}


def _sdxl(sections: dict):
    from tunelab.config import parse_config

    base = {"model": {"base": "sdxl.safetensors", "arch": "sdxl", "max_chunks": 1},
            "data": {"latents": "cached"}, "train": {"gradient_checkpointing": True, "grad_accumulation": 1}}
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return parse_config(base)


def field() -> None:
    """tunelab's estimate for the settings of kohya's two reports. kohya caches latents (the VAE
    leaves the GPU) and, in its 24 GB recipe, the text encoders' outputs; tunelab keeps both on the
    GPU (their row is shown apart: 'without frozen modules')."""
    from tunelab.train.memory import GiB, Launch, estimate

    traces: dict = {}
    print("| report | setting | reported | tunelab estimate | without frozen modules |")
    print("| --- | --- | ---: | ---: | ---: |")
    fp16_ddp = _sdxl({"train": {"batch_size": 4, "grad_accumulation": 16, "full_bf16": True, "bf16_update": "nearest"},
                      "optim": {"name": "adamw8bit"}})
    zero = _sdxl({"train": {"batch_size": 4, "grad_accumulation": 16}, "optim": {"name": "adamw8bit"}})
    for (engine, n), mb in DEEPSPEED_PR.items():
        launch = Launch(engine, n, overlap_comm=engine == "zero3")
        e = estimate(fp16_ddp if engine == "ddp" else zero, launch, traces=traces)
        frozen = sum(r.bytes for r in e.static if r.name == "frozen modules")
        reported = "OOM" if mb is None else f"{mb / 1024:.1f} GB"
        print(f"| #1101 DeepSpeed | {launch.label} | {reported} | {e.peak / GiB:.1f} GB | "
              f"{(e.peak - frozen) / GiB:.1f} GB |", flush=True)
    for precision, gb in FUSED_PR.items():
        train = {"fused_backward": True, "mixed_precision": "no"} if precision == "fp32" else \
            {"fused_backward": True, "mixed_precision": "bf16", "full_bf16": True, "bf16_update": "nearest"}
        e = estimate(_sdxl({"train": train, "optim": {"name": "adafactor"}}), traces=traces)
        frozen = sum(r.bytes for r in e.static if r.name == "frozen modules")
        print(f"| #1259 fused backward | Adafactor, {precision}, batch 1 | {gb:.1f} GB | {e.peak / GiB:.1f} GB | "
              f"{(e.peak - frozen) / GiB:.1f} GB |", flush=True)


# --- the field's recipes on the common cards -----------------------------------------------------------------------

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


def table() -> None:
    """One GPU, batch 1 at 1024x1024, gradient checkpointing, latents cached, prompts of 3 windows:
    the estimate (peak, with the CUDA allowance) for the field's recipes, and the cards it fits."""
    from tunelab.train.memory import CARDS, GiB, estimate

    traces: dict = {}
    print("| UNet | text encoders | optimizer | weights | peak | " + " | ".join(f"{c} GB" for c in CARDS) + " |")
    print("| --- | --- | --- | --- | ---: | " + " | ".join(":---:" for _ in CARDS) + " |")
    for unet, te, name, bf16 in itertools.product(("full", "unet71", "unet63"), ("off", "on"), OPTIMIZERS, (False, True)):
        train = {"parts": {"unet": unet, "text_encoder": te}, "max_steps": 1}
        if bf16:  # tunelab's stochastic rounding is built for AdamW (and Lion); the others round to nearest
            train |= {"full_bf16": True, "bf16_update": "stochastic" if name == "adamw" else "nearest"}
        optim = {"name": name} | ({"lr_text_encoder_1": 1.2e-5, "lr_text_encoder_2": 1.2e-5} if te == "on" else {})
        cfg = _sdxl({"train": train, "optim": optim, "model": {"max_chunks": 3}})
        e = estimate(cfg, traces=traces)
        weights = f"bf16 ({cfg.train.bf16_update})" if bf16 else "fp32"
        marks = " | ".join("yes" if e.peak <= c * GiB else "--" for c in CARDS)
        print(f"| {unet} | {te} | {name} | {weights} | {e.peak / GiB:.1f} GB | {marks} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="CPU: measured peak vs estimate, case by case")
    v.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    v.add_argument("--json", action="store_true", help="one JSON list instead of the table (the tests read it)")
    sub.add_parser("field", help="the estimate for the settings of kohya's DeepSpeed and fused-backward reports")
    sub.add_parser("table", help="the field's SDXL recipes on 24 / 48 / 80 / 141 GB cards (one GPU)")
    g = sub.add_parser("gpu", help="CUDA: measured peak (torch.cuda.max_memory_allocated) vs estimate, SDXL included")
    g.add_argument("--cases", default=",".join(["toy-bf16-te", "mid-bf16", *GPU_CASES]),
                   help=f"comma-separated, of: {', '.join(ALL_CASES)}")
    g.add_argument("--json", type=Path, default=None, help="also write the rows here")
    m = sub.add_parser("measure", help="(internal) measure one case in this process; prints JSON")
    m.add_argument("case", choices=list(ALL_CASES))
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    if args.cmd == "measure":
        print(json.dumps(measure_cuda(args.case) if args.device == "cuda" else measure(args.case)))
    elif args.cmd == "validate":
        rows = validate(args.cases.split(","), args.json)
        if args.json:
            print(json.dumps(rows))
    elif args.cmd == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("memory_estimate.py gpu needs a CUDA GPU; nothing was run", file=sys.stderr)
            sys.exit(2)
        validate(args.cases.split(","), device="cuda", save=args.json)
    elif args.cmd == "field":
        field()
    elif args.cmd == "table":
        table()


if __name__ == "__main__":
    main()
