"""torch-optimi's Kahan summation on bf16 weights, against fp32 and tunelab's own `kahan`.

The isolated stream of benchmarks/bf16_updates.py (a constant signal plus noise, N(1, 1) per
element, so Adam's update is ~lr; |w| log-uniform over 1e-4 .. 0.3), 300 steps of AdamW with
tunelab's betas (0.9, 0.999) and eps 1e-8, no weight decay, at lr 1.5e-6 / 1e-5 / 1e-4. Arms:
fp32 weights (tunelab's AdamW math), tunelab's `kahan` (fp32 moments, bf16 compensation),
`optimi.AdamW(kahan_sum=True)` (bf16 moments and compensation: what `optim.name = "optimi_adamw"`
with `bf16_update = "kahan"` runs) and `kahan_sum=False` (`"nearest"`). Progress = summed
displacement / fp32's, overall and in bands of |w|; the Kahan arms count their compensation.

    .venv/bin/python benchmarks/optimi_bf16.py [--n 200000] [--steps 300]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

BANDS = ((1e-4, 3e-3), (3e-3, 3e-2), (3e-2, 0.3))
ARMS = ("fp32", "tunelab-kahan", "optimi-kahan", "optimi-nearest")


def weights(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    lo, hi = torch.log(torch.tensor(1e-4)).item(), torch.log(torch.tensor(0.3)).item()
    w = torch.exp(torch.empty(n).uniform_(lo, hi, generator=gen))
    return (w * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)).to(torch.bfloat16).float()  # bf16 values


def run(arm: str, w0: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """The weights' displacement after `steps` (float64), compensation included."""
    import optimi

    from tunelab.train.lowprec import LowPrecisionAdamW

    p = w0.clone().to(torch.float32 if arm == "fp32" else torch.bfloat16).requires_grad_()
    if arm.startswith("optimi"):
        opt = optimi.AdamW([p], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, kahan_sum=arm == "optimi-kahan")
    else:
        opt = LowPrecisionAdamW([p], lr=lr, weight_decay=0.0, update="kahan" if arm == "tunelab-kahan" else "nearest")
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        p.grad = (1 + torch.randn(w0.numel(), generator=gen)).to(p.dtype)  # optimi's Kahan path overwrites it
        opt.step()
    held = p.detach().float()
    comp = {"tunelab-kahan": "compensation", "optimi-kahan": "kahan_comp"}.get(arm)
    if comp:
        held = held + opt.state[p][comp].float()
    return (w0 - held).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    w0 = weights(args.n)
    print("| lr | arm | progress | " + " | ".join(f"{a:g} to {b:g}" for a, b in BANDS) + " |")
    print("| ---: | --- | ---: | " + " | ".join("---:" for _ in BANDS) + " |")
    for lr in (1.5e-6, 1e-5, 1e-4):
        moved = {arm: run(arm, w0, lr, args.steps) for arm in ARMS}
        ref = moved["fp32"]
        for arm, d in moved.items():
            bands = []
            for a, b in BANDS:
                sel = (w0.abs() >= a) & (w0.abs() < b)
                bands.append(float(d[sel].sum() / ref[sel].sum()))
            print(f"| {lr:g} | {arm} | {float(d.sum() / ref.sum()):.3f} | " + " | ".join(f"{x:.3f}" for x in bands) + " |")


if __name__ == "__main__":
    main()
