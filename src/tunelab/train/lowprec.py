"""Optimizer steps for bf16 weights that do not lose their updates (`train.bf16_update`).

bf16 keeps 8 mantissa bits: a weight w moves only when the update exceeds half its spacing,
|Δ| > ulp(w) / 2 ≈ |w| · 2^-9. AdamW's update is about lr per element, so at the field's
UNet LR 1.5e-6 every weight with |w| > ~7.7e-4 — nearly all of them — stays where it is when the
new value is rounded to the nearest bf16 ("nearest", what `full_bf16` with torch's optimizers
does). Two remedies, with the optimizer's own math in fp32 (fp32 moment states, so a second
moment decays by β2 = 0.999 as it should):

- **stochastic**: round the fp32 result up or down at random, with the probability of its
  distance to the two neighbours: the expected weight is the fp32 one, so updates far below
  ulp / 2 still move the weight on average (OneTrainer's default). No extra memory.
- **kahan**: keep the rounding error of every write-back in a bf16 compensation buffer and add
  it back on the next step (Kahan summation; the `torch-optimi` package's `kahan_sum`):
  deterministic, 2 more bytes per weight. The buffer is bf16 too, so weight + buffer hold ~16
  bits: an update below ~2^-16 |w| (lr 1.5e-6 on |w| > ~0.1) is still lost, where stochastic
  rounding has no such floor. Hence "stochastic" is the default.

`LowPrecisionAdamW` and `LowPrecisionLion` follow torch's AdamW and tunelab's Lion step for step
(the same formulas in the same order: with fp32 weights and "nearest" they give torch's numbers).
The random bits of stochastic rounding come from a generator seeded by (seed, step, tensor
index), so a resumed run draws the same ones.
"""

from __future__ import annotations

import abc
import math
from typing import Callable, Iterable

import torch

UPDATES = ("stochastic", "kahan", "nearest")
_HIGH16 = -65536  # 0xFFFF0000 as int32: the bits a bf16 keeps of an fp32


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability (x - down) / (up - down): unbiased, E[result] = x.

    Adds 16 random bits to the fp32 bit pattern below the bits bf16 keeps and truncates: a carry
    into the kept bits happens exactly with that probability (magnitude bits; the sign is apart)."""
    x = x.float().contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    bits = (x.view(torch.int32) + noise) & _HIGH16
    out = bits.view(torch.float32)
    out = torch.where(torch.isfinite(x), out, x)  # inf / nan stay as they are
    return out.to(torch.bfloat16)  # exact: the low 16 bits are zero


def fraction_vanishing(params: Iterable[torch.Tensor], lr: float) -> float:
    """The share of weights whose round-to-nearest bf16 update would vanish at `lr`: an AdamW-like
    step moves each element by about lr, which is lost when lr < ulp(w) / 2 (banner estimate)."""
    total = lost = 0
    for p in params:
        w = p.detach().float().abs()
        ulp_half = torch.ldexp(torch.ones_like(w), torch.frexp(w).exponent - 9)  # 2^(e - 1 - 8): half a bf16 ulp
        lost += int((ulp_half > lr).logical_and(w > 0).sum())
        total += w.numel()
    return lost / max(1, total)


class _LowPrecision(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """fp32 math on any weight dtype; the write-back of bf16 (and fp16) weights by `update`."""

    def __init__(self, params: Iterable, defaults: dict, update: str = "stochastic", seed: int = 0) -> None:
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, not {update!r}")
        self.update, self.seed = update, seed
        super().__init__(params, defaults)

    def _write(self, p: torch.Tensor, w: torch.Tensor, state: dict, index: int, step: int) -> None:
        """Store the fp32 result `w` into `p` (its dtype), by the update method."""
        if p.dtype == torch.float32:
            p.copy_(w)
        elif self.update == "stochastic" and p.dtype == torch.bfloat16:
            gen = torch.Generator(device=p.device).manual_seed(_seed(self.seed, step, index))
            p.copy_(stochastic_round_bf16(w, gen))
        elif self.update == "kahan":
            p.copy_(w)  # nearest
            state["compensation"].copy_(w - p.float())  # what rounding lost, added back next step
        else:
            p.copy_(w)

    def _weight(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        w = p.detach().float()
        if self.update == "kahan" and p.dtype != torch.float32:
            comp = state.setdefault("compensation", torch.zeros_like(p))
            w = w + comp.float()
        return w

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts floating states to the weights' dtype on load; these keep theirs (fp32 moments)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[int(index)]
            for key, value in saved.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, **self._new(p))
                state["step"] += 1
                w = self._weight(p, state)
                self._apply(group, p.grad.float(), w, state)  # the optimizer's math, in fp32, on w
                self._write(p, w, state, index, state["step"])
        return loss

    @abc.abstractmethod
    def _new(self, p: torch.Tensor) -> dict:
        """The fresh state of a weight (its fp32 moments)."""

    @abc.abstractmethod
    def _apply(self, group: dict, g: torch.Tensor, w: torch.Tensor, state: dict) -> None:
        """One step of the optimizer's math on the fp32 weight `w`, in place."""


def _seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step * 8191 + index) % (2**63 - 1)


class LowPrecisionAdamW(_LowPrecision):
    """torch's AdamW (decoupled weight decay, bias correction), fp32 states and math; bf16 weights
    written back by `update` (module docstring)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, update: str = "stochastic", seed: int = 0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, update, seed)

    def _new(self, p: torch.Tensor) -> dict:
        return {"exp_avg": torch.zeros_like(p, dtype=torch.float32), "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}

    def _apply(self, group: dict, g: torch.Tensor, w: torch.Tensor, state: dict) -> None:
        t, (beta1, beta2), lr = state["step"], group["betas"], group["lr"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        w.mul_(1 - lr * group["weight_decay"])
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


class LowPrecisionLion(_LowPrecision):
    """tunelab's Lion (train/optim.py) with an fp32 momentum and fp32 math; bf16 write-back by `update`."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, update: str = "stochastic", seed: int = 0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay}, update, seed)

    def _new(self, p: torch.Tensor) -> dict:
        return {"exp_avg": torch.zeros_like(p, dtype=torch.float32)}

    def _apply(self, group: dict, g: torch.Tensor, w: torch.Tensor, state: dict) -> None:
        (beta1, beta2), m = group["betas"], state["exp_avg"]
        update = (beta1 * m + (1 - beta1) * g).sign_()
        w.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
        m.mul_(beta2).add_(g, alpha=1 - beta2)
