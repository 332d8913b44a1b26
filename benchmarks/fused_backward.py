"""What `train.fused_backward` saves: the peak tensor memory of one optimizer step, fused against
unfused, through tunelab's own trainer (`setup`, then `optimizer_step`) on the toy model.

Measured by torch.profiler with `profile_memory=True`: it records every allocation and free of the
CPU tensor allocator with its time, so the running sum in time order is the live tensor memory
above what existed when the step began (weights and the optimizer's states, which are counted apart
from the module and optimizer). Each arm sets up both sides in one process; each side takes one
warm-up step (the optimizer's states are created by it) and one profiled step; then `--steps`
timed steps in alternating rounds (median).

    .venv/bin/python benchmarks/fused_backward.py [--batch 4] [--steps 9]

Arms: AdamW fp32, without and with gradient checkpointing; AdamW on bf16 weights with stochastic
rounding (full_bf16) and Adafactor fp32, both with checkpointing. The text encoders train too (every
arm the same parameters). Frees of blocks allocated before the step (the previous step's outputs)
are not in the profiler's events, so both arms' peaks are upper bounds alike.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

CKPT = {"gradient_checkpointing": True}
ARMS = {
    "adamw fp32": {},
    "adamw fp32, checkpointing": {"train": CKPT},
    "adamw full_bf16 stochastic, checkpointing": {"train": {"mixed_precision": "bf16", "full_bf16": True, **CKPT}},
    "adafactor fp32, checkpointing": {"optim": {"name": "adafactor"}, "train": CKPT},
}


def build_world(root: Path) -> Path:
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.toy.world import make_world

    make_world(root / "images", n=32, seed=0)
    opts = IndexOptions(buckets=BucketConfig(resolution=64, min_side=64, max_side=64, step=32))  # one bucket
    build_index([f"folder:{root / 'images'}"], root / "index.parquet", opts, progress=False)
    return root / "index.parquet"


def config(root: Path, index: Path, name: str, extra: dict, fused: bool, batch: int):
    from tunelab.config import parse_config

    sections = {
        "run": {"name": "bench", "output_dir": str(root / f"{name}-{fused}".replace(" ", "_").replace(",", "")), "seed": 0},
        "model": {"base": "toy", "max_chunks": 1},
        "data": {"index": str(index)},
        "train": {"batch_size": batch, "grad_accumulation": 1, "max_steps": 1000, "mixed_precision": "no",
                  "gradient_checkpointing": False, "fused_backward": fused, "parts": {"text_encoder": "on"}},
        "optim": {"lr_unet": 1e-5, "lr_text_encoder_1": 1e-5, "lr_text_encoder_2": 1e-5},
        "save": {"every_n_steps": 0, "every_n_epochs": 0}, "report": {"enabled": False},
    }
    for key, values in extra.items():
        sections[key] = {**sections[key], **values}
    if extra.get("optim", {}).get("name") == "adafactor":
        sections["train"]["bf16_update"] = "nearest"
    return parse_config(sections)


def peak_above_start(fn) -> tuple[int, int]:
    """(peak live tensor bytes above the start of `fn`, bytes still live at its end) from the
    allocator events torch.profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = list(itertools.accumulate(n for _, n in events))
    return max(live, default=0), live[-1] if live else 0


def measure(cfgs: dict[bool, object], steps: int) -> dict[bool, dict]:
    """Both sides of one arm (unfused, fused) set up in this process; peaks one after the other,
    then `steps` timed steps in alternating rounds, so machine noise hits both alike."""
    from accelerate.state import AcceleratorState

    from tunelab.train.trainer import batches, optimizer_step, setup

    AcceleratorState._reset_state(reset_partial_state=True)  # each arm picks its own precision
    runs = {fused: setup(cfg) for fused, cfg in cfgs.items()}
    try:
        out = {}
        for fused, s in runs.items():
            t, data = s.training, batches(s, 0, 0)
            optimizer_step(s, data)  # warm-up: creates the optimizer's states
            inner = getattr(t.optimizer, "optimizer", t.optimizer)
            states = sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values()
                         if torch.is_tensor(v))
            peak, _ = peak_above_start(lambda: optimizer_step(s, data))
            out[fused] = {"n": sum(p.numel() for p in t.params), "tensors": len(t.params), "states": states,
                          "weights": sum(p.numel() * p.element_size() for p in t.params), "peak": peak,
                          "data": data, "times": []}
        for _ in range(steps):
            for fused, s in runs.items():
                t0 = time.perf_counter()
                optimizer_step(s, out[fused]["data"])
                out[fused]["times"].append(time.perf_counter() - t0)
        for o in out.values():
            o["step_s"] = statistics.median(o.pop("times"))
        return out
    finally:
        for s in runs.values():
            if s.lock is not None:
                s.lock.release()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=9, help="timed steps per side (median)")
    args = ap.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = build_world(root)
        print(f"torch {torch.__version__}, batch {args.batch} at 64x64 px, toy model, UNet + both text encoders trained")
        print("| arm | trained parameters | weights + states | step peak unfused | fused | saved | saved / parameter "
              "| step unfused | fused |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, extra in ARMS.items():
            both = measure({fused: config(root, index, name, extra, fused, args.batch) for fused in (False, True)},
                           args.steps)
            off, on = both[False], both[True]
            saved = off["peak"] - on["peak"]
            print(f"| {name} | {off['n']:,} | {(off['weights'] + off['states']) / mib:.1f} MiB | "
                  f"{off['peak'] / mib:.1f} MiB | {on['peak'] / mib:.1f} MiB | {saved / mib:.1f} MiB "
                  f"({100 * saved / off['peak']:.0f} %) | {saved / off['n']:.2f} B | {off['step_s'] * 1e3:.0f} ms | "
                  f"{on['step_s'] * 1e3:.0f} ms ({(on['step_s'] - off['step_s']) / off['tensors'] * 1e6:+.0f} us x "
                  f"{off['tensors']} tensors) |", flush=True)


if __name__ == "__main__":
    main()
