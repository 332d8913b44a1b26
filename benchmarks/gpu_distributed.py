"""tunelab's training under each distributed engine on CUDA GPUs: pass/fail, img/s, peak memory
against the memory estimate.

Run on a machine with NVIDIA GPUs (one H200, or several GPUs; nothing here trains on the CPU):

    .venv/bin/python benchmarks/gpu_distributed.py --out gpu-dist [--gpus 8] [--json results.json] [--steps 20]
    .venv/bin/python benchmarks/gpu_distributed.py --out gpu-dist --dry-run    # the plan only; no GPU needed
    .venv/bin/python benchmarks/gpu_distributed.py --out gpu-dist --cpu --steps 4  # rehearse this script on the CPU

The ZeRO rows need DeepSpeed (`pip install deepspeed`); without it they are reported as skipped.

What it does, in --out (default: a new temporary folder):
  1. builds the toy world with tunelab's own CLI: `tunelab toy world` (64 images), `tunelab data
     index`, `tunelab data cache --model toy` (world/);
  2. per engine, writes ENGINE/accelerate.yaml and ENGINE/run.toml (the toy model, batch 2,
     accumulation 2, --steps optimizer steps, bf16 autocast, text encoders trained, a checkpoint and
     a state every steps/2, fp32 checkpoints) and runs
         accelerate launch --config_file ENGINE/accelerate.yaml --num_processes N -m tunelab train ENGINE/run.toml
     with N = --gpus (default: every visible GPU; with one GPU the sharded engines run on one rank):
         ddp    distributed_type MULTI_GPU
         zero2  distributed_type DEEPSPEED, zero_stage 2 (no gradient_accumulation_steps: tunelab sets it)
         zero3  distributed_type DEEPSPEED, zero_stage 3
         fsdp   distributed_type FSDP, FSDP2, reshard after forward, sharded state dict
  3. an engine passes when the launch exits 0, checkpoints/last.safetensors exists with finite
     tensors, its UNet's update (last minus the base, world/base.safetensors from `tunelab model
     new --arch toy`) agrees with the reference run's (the first engine that passed, DDP if it did):
     |update - reference update| / |reference update| < 0.5 over all UNet tensors together, and
     its size within 0.75-1.33 of the reference's (bf16 autocast against DeepSpeed's bf16 module:
     Adam's first steps follow the gradients' signs, so elements whose gradients are mostly
     rounding differ; on the CPU rehearsal, 4 steps: ZeRO-2 0.37, FSDP2 0.11; an engine run at
     another micro-batch shape (SHAPES) draws other noise, so only its update's size is held),
     and a resume reproduces it:
     last.safetensors and the newest state are deleted, the same command resumes from the state
     of step steps/2, and the new last.safetensors must equal the first within 1e-3 (relative);
  4. figures of the first run: img/s = the median of the logged `img_per_s`, the measured peak =
     the max of `gpu/max_allocated_gib` (rank 0's torch.cuda.max_memory_allocated; "n/a" when the
     trainer did not log it), beside `tunelab.train.memory.estimate(...).allocated` for the same
     run file and accelerate config;
  5. prints a table (and --json FILE); exit 0 when every engine that ran passed, 1 otherwise,
     2 when the machine lacks the GPUs (nothing is run or written then).
Each launch's output goes to ENGINE/train.log (ENGINE/resume.log for the resume).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ENGINES = ("ddp", "zero2", "zero3", "fsdp")
UPDATE_TOLERANCE = 0.5  # |update - reference update| / |reference update|, all UNet tensors together
UPDATE_SIZE = (0.75, 1.33)  # |update| / |reference update|
SHAPES: dict[str, tuple[int, int]] = {}  # (batch, accumulation) by engine; default (2, 2)
RESUME_TOLERANCE = 1e-3
GIB = 2**30


# --- what is written: accelerate configs and run files ---------------------------------------------------------


def accelerate_yaml(engine: str, n: int, port: int) -> str:
    head = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}[engine]
    lines = ["compute_environment: LOCAL_MACHINE", f"distributed_type: {head}"]
    if engine.startswith("zero"):
        lines += ["deepspeed_config:", f"  zero_stage: {engine[-1]}", "  offload_optimizer_device: none",
                  "  offload_param_device: none", "  zero3_init_flag: false"]
    if engine == "fsdp":
        lines += ["fsdp_config:", "  fsdp_version: 2", "  fsdp_reshard_after_forward: true",
                  "  fsdp_state_dict_type: SHARDED_STATE_DICT", "  fsdp_offload_params: false"]
    lines += ["num_machines: 1", f"num_processes: {n}", "machine_rank: 0", f"main_process_port: {port}",
              "mixed_precision: bf16", "gpu_ids: all", "rdzv_backend: static", "same_network: true", "use_cpu: false"]
    return "\n".join(lines) + "\n"


def run_toml(world: Path, out: Path, steps: int, batch: int = 2, accumulation: int = 2) -> str:
    return f"""[run]
name = "gpu-dist"
output_dir = {json.dumps(str(out))}
seed = 3

[model]
base = {json.dumps(str(world / "base.safetensors"))}
max_chunks = 2

[data]
index = {json.dumps(str(world / "index.parquet"))}
latents = {json.dumps(str(world / "latents"))}

[train]
batch_size = {batch}
grad_accumulation = {accumulation}
max_steps = {steps}
mixed_precision = "bf16"

[train.parts]
text_encoder = "on"

[optim]
lr_unet = 1e-4
lr_text_encoder_1 = 1e-5
lr_text_encoder_2 = 1e-5

[save]
every_n_steps = {steps // 2}
every_n_epochs = 0
dtype = "fp32"
"""


def write_engine_files(out: Path, engine: str, n: int, steps: int) -> tuple[Path, Path]:
    folder = out / engine
    folder.mkdir(parents=True, exist_ok=True)
    cfg, run = folder / "accelerate.yaml", folder / "run.toml"
    cfg.write_text(accelerate_yaml(engine, n, 29500 + ENGINES.index(engine)))
    run.write_text(run_toml(out / "world", folder / "run", steps, *SHAPES.get(engine, (2, 2))))
    return cfg, run


# --- commands ----------------------------------------------------------------------------------------------------


def tunelab_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("tunelab")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tunelab"]


def launch_cmd(cfg: Path, run: Path, n: int) -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    head = [str(exe), "launch"] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    return [*head, "--config_file", str(cfg), "--num_processes", str(n), "-m", "tunelab", "train", str(run)]


def world_cmds(world: Path) -> list[list[str]]:
    """The toy world as test_the_toy_example_trains_as_documented prepares it (64 images here)."""
    t = tunelab_cmd()
    return [[*t, "toy", "world", "--out", str(world), "--n-images", "64"],
            [*t, "model", "new", "--arch", "toy", "--out", str(world / "base.safetensors"), "--seed", "3"],
            [*t, "data", "index", "--out", str(world / "index.parquet"), "-s", f"folder:{world}", "--resolution", "80",
             "--min-side", "32", "--max-side", "128", "--step", "32"],
            [*t, "data", "cache", str(world / "index.parquet"), "--out", str(world / "latents"), "--model", "toy"]]


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Runs `cmd` with its output in `log`; (exit code or None on timeout, seconds). On timeout the
    whole process group (accelerate and its workers) is killed, so no rank keeps a GPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - t0


def log_tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def root_cause(log: Path) -> str:
    """The failing process's own error line (tunelab's `error: ...` or the exception of a rank's
    traceback), not torchrun's ChildFailedError that ends every failed launch's log."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        line = re.sub(r"^\[rank\d+\]:\s*", "", line).strip()
        if "ChildFailedError" in line:
            continue
        if line.startswith("error: ") or re.match(r"^[\w.]*(Error|Exception)\b.*:", line):
            return line[:400]
    return ""


def failed(rc: int | None, log: Path) -> str:
    if rc is None:
        return "timed out"
    cause = root_cause(log)
    return f"exit {rc}" + (f": {cause}" if cause else "")


def deepspeed_installed() -> bool:
    # in a fresh interpreter: importing DeepSpeed here would set up CUDA in this process for nothing
    return subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode == 0


# --- checks and figures ----------------------------------------------------------------------------------------


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def rel_diff(a: dict, b: dict, prefix: str = "") -> tuple[float, str]:
    """The worst max|a - b| / max|a| over the tensors whose keys start with `prefix`, and its key."""
    keys = sorted(k for k in a if k.startswith(prefix))
    if keys != sorted(k for k in b if k.startswith(prefix)):
        return float("inf"), "(different keys)"
    worst, name = 0.0, ""
    for k in keys:
        x, y = a[k].float(), b[k].float()
        d = (x - y).abs().max().item() / max(x.abs().max().item(), 1e-12) if x.numel() else 0.0
        if d > worst:
            worst, name = d, k
    return worst, name


def update_diff(base: dict, a: dict, ref: dict, prefix: str) -> tuple[float, float]:
    """(|a - ref| / |ref - base|, |a - base| / |ref - base|) over the tensors whose keys start with
    `prefix`, all together: how far an engine's update is from the reference's, and its size."""
    keys = [k for k in ref if k.startswith(prefix)]
    if sorted(keys) != sorted(k for k in a if k.startswith(prefix)):
        return float("inf"), float("nan")
    num = sum(float((a[k].float() - ref[k].float()).pow(2).sum()) for k in keys)
    own = sum(float((a[k].float() - base[k].float()).pow(2).sum()) for k in keys)
    den = sum(float((ref[k].float() - base[k].float()).pow(2).sum()) for k in keys)
    return (num / den) ** 0.5 if den else float("inf"), (own / den) ** 0.5 if den else float("nan")


def figures(metrics: Path) -> dict:
    """img/s (median) and rank 0's peak allocated GiB (max) from the long-format metrics.parquet
    (one row per step and tag: step, tag, value, wall_time)."""
    import pyarrow.parquet as pq

    if not metrics.is_file():
        return {"img_per_s": None, "peak_gib": None}
    rows = pq.read_table(metrics, columns=["tag", "value"]).to_pylist()
    rates = [r["value"] for r in rows if r["tag"] == "img_per_s"]
    peaks = [r["value"] for r in rows if r["tag"] == "gpu/max_allocated_gib"]
    return {"img_per_s": statistics.median(rates) if rates else None, "peak_gib": max(peaks) if peaks else None}


def estimated_gib(run: Path, cfg_file: Path) -> float | None:
    from tunelab.config import load_config
    from tunelab.train.memory import estimate, launch_for

    cfg = load_config(run)
    return estimate(cfg, launch_for(cfg, accelerate_config=cfg_file)).allocated / GIB


def check_engine(out: Path, engine: str, n: int, reference: dict | None, timeout: float) -> tuple[dict, dict | None]:
    """Train, check, measure, resume; (the row, the UNet-bearing tensors of the last checkpoint or None)."""
    cfg, run = out / engine / "accelerate.yaml", out / engine / "run.toml"
    rundir = out / engine / "run"
    last = rundir / "checkpoints" / "last.safetensors"
    row = {"engine": engine, "result": "FAIL", "log": str(out / engine / "train.log")}
    try:
        row["estimate_gib"] = estimated_gib(run, cfg)
    except Exception as err:  # noqa: BLE001 - a refused estimate is a figure, not a failed engine
        row["estimate_gib"], row["estimate_error"] = None, f"{type(err).__name__}: {err}"
    rc, seconds = run_logged(launch_cmd(cfg, run, n), out / engine / "train.log", timeout)
    row["seconds"] = round(seconds, 1)
    if rc != 0:
        row["detail"] = failed(rc, out / engine / "train.log")
        if "the launch config asks for" in row["detail"]:  # tunelab refuses the engine by design
            row["result"] = "refused"
        return row, None
    if not last.is_file():
        row["detail"] = "no checkpoints/last.safetensors"
        return row, None
    first = load(last)
    if not all(torch.isfinite(t).all() for t in first.values()):
        row["detail"] = "non-finite tensors in last.safetensors"
        return row, None
    row |= figures(rundir / "metrics.parquet")
    problems = []
    if reference is not None:
        from tunelab.models.keys import UNET

        base = load(out / "world" / "base.safetensors")
        row["update_diff_vs_ref"], row["update_size_vs_ref"] = update_diff(base, first, reference["tensors"], UNET)
        row["reference"] = reference["engine"]
        lo, hi = UPDATE_SIZE
        # another micro-batch shape draws other noise: at the first steps of a random model that
        # alone makes the updates unlike (CPU rehearsal: 1.22 for 4 x 1 against 2 x 2), so only the size counts
        same = SHAPES.get(engine, (2, 2)) == SHAPES.get(reference["engine"], (2, 2))
        row["update_compared"] = same
        if not ((row["update_diff_vs_ref"] < UPDATE_TOLERANCE or not same) and lo <= row["update_size_vs_ref"] <= hi):
            problems.append(f"UNet update differs from {reference['engine']}'s by {row['update_diff_vs_ref']:.2f} "
                            f"of its size (own size {row['update_size_vs_ref']:.2f})")
    # resume: drop the final checkpoint and the newest state; the rerun resumes from the one before
    shutil.copy2(last, out / engine / "first-last.safetensors")
    states = sorted(p for p in (rundir / "state").glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
    if len(states) < 2:
        row["detail"] = "; ".join([*problems, f"{len(states)} training state(s) under state/; 2 needed to resume"])
        return row, {"engine": engine, "tensors": first}
    last.unlink()
    shutil.rmtree(states[-1])
    row["resumed_from"] = states[-2].name
    rc, _ = run_logged(launch_cmd(cfg, run, n), out / engine / "resume.log", timeout)
    if rc != 0 or not last.is_file():
        problems.append("resume: " + (failed(rc, out / engine / "resume.log") if rc != 0 else "no last.safetensors"))
    else:
        row["resume_diff"], _ = rel_diff(first, load(last))
        if not row["resume_diff"] < RESUME_TOLERANCE:
            problems.append(f"resumed run differs by {row['resume_diff']:.2e}")
    row["result"] = "pass" if not problems else "FAIL"
    row["detail"] = "; ".join(problems)
    return row, {"engine": engine, "tensors": first}


# --- the report ----------------------------------------------------------------------------------------------------


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: list[dict], reference: str | None) -> str:
    head = ["engine", "result", "img/s", "peak GiB measured", "estimated", "est/measured", "update vs reference",
            "resume diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peak, est = r.get("peak_gib"), r.get("estimate_gib")
        ratio = est / peak if peak and est is not None else None
        result = r["result"] + (f" ({r['detail']})" if r["result"] in ("FAIL", "refused") and r.get("detail") else "")
        vs = "(reference)" if r["engine"] == reference else fmt(r.get("update_diff_vs_ref"), ".3f")
        if r.get("update_compared") is False:
            vs += f" (other batch shape; size {fmt(r.get('update_size_vs_ref'), '.2f')})"
        lines.append("| " + " | ".join([r["engine"], result, fmt(r.get("img_per_s"), ".1f"), fmt(peak, ".3f"),
                                        fmt(est, ".3f"), fmt(ratio, ".2f"), vs,
                                        fmt(r.get("resume_diff"), ".2e")]) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--gpus", type=int, default=None, help="processes per launch (default: every visible GPU)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run (even, >= 4)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of: {', '.join(ENGINES)}")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--dry-run", action="store_true", help="write the configs and run files, print the plan, stop")
    ap.add_argument("--cpu", action="store_true",
                    help="rehearse on the CPU (the same configs; one process unless --gpus; no memory figures): "
                         "checks this script, not the engines' GPU paths")
    args = ap.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    if unknown := [e for e in engines if e not in ENGINES]:
        ap.error(f"--engines: unknown {', '.join(unknown)}; choose of {', '.join(ENGINES)}")
    if args.steps < 4 or args.steps % 2:
        ap.error("--steps must be even and at least 4 (a state at steps/2 to resume from)")
    if args.gpus is not None and args.gpus < 1:
        ap.error("--gpus must be at least 1")
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not (args.dry_run or args.cpu) and (found == 0 or (args.gpus or 1) > found):
        need = f"{args.gpus} CUDA GPUs" if args.gpus and args.gpus > 1 else "CUDA GPUs"
        print(f"gpu_distributed.py needs {need} (found {found or 'none'}): run it on a machine with NVIDIA GPUs; "
              "nothing was run", file=sys.stderr)
        return 2
    n = args.gpus or max(found, 1)
    out = (args.out or Path(tempfile.mkdtemp(prefix="tunelab-gpu-dist-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = {e: write_engine_files(out, e, n, args.steps) for e in engines}
    has_ds = deepspeed_installed() if any(e.startswith("zero") for e in engines) else True
    if args.dry_run:
        print(f"plan: {len(engines)} engine(s) on {n} process(es), {args.steps} steps each, in {out}")
        for cmd in world_cmds(out / "world"):
            print("  $ " + " ".join(cmd))
        for e, (cfg, run) in files.items():
            skip = "  (would be skipped: deepspeed not installed)" if e.startswith("zero") and not has_ds else ""
            print(f"{e}: {cfg}{skip}\n  $ " + " ".join(launch_cmd(cfg, run, n)) + "   (then again, to resume)")
        return 0
    for i, cmd in enumerate(world_cmds(out / "world")):
        rc, _ = run_logged(cmd, out / f"world-{i}.log", args.timeout)
        if rc != 0:
            print(f"building the toy world failed ({' '.join(cmd[-6:])}):\n{log_tail(out / f'world-{i}.log')}",
                  file=sys.stderr)
            return 1
    rows, reference = [], None

    def write_json() -> None:  # after every engine: a run cut short keeps the rows it finished
        if args.json:
            report = {"gpu": "cpu rehearsal" if args.cpu else torch.cuda.get_device_name(0), "gpus": n,
                      "torch": torch.__version__, "steps": args.steps,
                      "out": str(out), "reference": reference and reference["engine"], "engines": rows}
            args.json.write_text(json.dumps(report, indent=2, default=str))

    for e in engines:
        if e.startswith("zero") and not has_ds:
            rows.append({"engine": e, "result": "skipped (deepspeed not installed)"})
            continue
        print(f"{e}: training on {n} process(es) ...", file=sys.stderr, flush=True)
        row, tensors = check_engine(out, e, n, reference, args.timeout)
        rows.append(row)
        if row["result"] == "pass" and reference is None:
            reference = tensors
        if row["result"] != "pass":
            print(f"{e}: {row.get('detail')}; the log's end:\n{log_tail(Path(row['log']))}", file=sys.stderr)
        write_json()
    print(table(rows, reference and reference["engine"]))
    if args.json:
        print(f"wrote {args.json}")
    ran = [r for r in rows if not r["result"].startswith(("skipped", "refused"))]
    return 0 if all(r["result"] == "pass" for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
