"""Optimizer steps for bf16 weights that do not lose their updates (`train.bf16_update`).

bf16 keeps 8 mantissa bits: a weight w moves only when the update exceeds half its spacing,
|Δ| > ulp(w) / 2 ≈ |w| · 2^-9. AdamW's update is about lr per element, so at the field's
UNet LR 1.5e-6 every weight with |w| > ~7.7e-4 — nearly all of them — stays where it is when the
new value is rounded to the nearest bf16 ("nearest", what `full_bf16` with torch's optimizers
does). Three remedies, with the optimizer's own math in fp32 (fp32 moment states, so a second
moment decays by β2 = 0.999 as it should):

- **exact** (the default): keep the 16 bits of the fp32 weight that bf16 drops in an int16 tensor
  beside it. bf16 high half + int16 low half = the fp32 weight, bit for bit, so every update lands
  exactly as with fp32 master weights; the forward pass uses the bf16 half (the nearest bf16).
  2 more bytes per weight: the weights take fp32's 4, while gradients stay bf16. Checkpoints are
  written from the whole fp32 weight (`master_weight`).
- **stochastic**: round the fp32 result up or down at random, with the probability of its
  distance to the two neighbours: the expected weight is the fp32 one, so updates far below
  ulp / 2 still move the weight on average (OneTrainer's default). No extra memory; a weight
  moves by whole bf16 steps now and then, so few elements change over a short run although the
  sum of the moves is right.
- **kahan**: keep the rounding error of every write-back in a bf16 compensation buffer and add
  it back on the next step (Kahan summation; the `torch-optimi` package's `kahan_sum`):
  deterministic, 2 more bytes per weight. The buffer is bf16 too, so weight + buffer hold ~16
  bits: an update below ~2^-16 |w| (lr 1.5e-6 on |w| > ~0.1) is still lost. `exact` costs the
  same memory and loses nothing.

`LowPrecisionAdamW` and `LowPrecisionLion` follow torch's AdamW and tunelab's Lion step for step
(the same formulas in the same order: with fp32 weights and "nearest" they give torch's numbers).
The random bits of stochastic rounding come from a generator seeded by (seed, step, tensor
index), so a resumed run draws the same ones.
"""

from __future__ import annotations

import abc
import contextlib
import math
from typing import Callable, Iterable, Iterator

import torch

UPDATES = ("exact", "stochastic", "kahan", "nearest")
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


def split_fp32(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (bf16 `high`, int16 `low`) with high's bits * 2^16 + low = w's bits, exactly.

    `high` is w rounded to the nearest bf16 (ties away from zero), so the forward pass sees what
    plain rounding gives; `low` is the signed remainder in fp32 units (|low| <= 2^15). Together they
    are the fp32 weight, bit for bit, in the same 4 bytes. Int32 arithmetic on the bit patterns
    (two's complement: the same bits as unsigned arithmetic; no finite weight overflows), a few
    bytes of temporaries per element."""
    bits = w.float().contiguous().view(torch.int32)
    high = (bits + 0x8000).bitwise_and_(_HIGH16)  # round the magnitude half up, keep the top 16 bits
    low = (bits - high).to(torch.int16)
    return high.view(torch.float32).to(torch.bfloat16), low  # exact: high's low 16 bits are 0


def join_fp32(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The fp32 weight `split_fp32` split: (high's bits << 16) + low."""
    return high.float().view(torch.int32).add_(low).view(torch.float32)


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
        elif self.update == "exact" and p.dtype == torch.bfloat16:
            high, low = split_fp32(w)
            p.copy_(high)
            state["low_bits"].copy_(low)  # the fp32 weight's other 16 bits: nothing is rounded away
        elif self.update == "kahan":
            p.copy_(w)  # nearest
            state["compensation"].copy_(w - p.float())  # what rounding lost, added back next step
        else:
            p.copy_(w)

    def _weight(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        w = p.detach().float()
        if self.update == "exact" and p.dtype == torch.bfloat16:
            return join_fp32(p.detach(), state.setdefault("low_bits", torch.zeros_like(p, dtype=torch.int16)))
        if self.update == "kahan" and p.dtype != torch.float32:
            comp = state.setdefault("compensation", torch.zeros_like(p))
            w = w + comp.float()
        return w

    def master_weight(self, p: torch.Tensor) -> torch.Tensor | None:
        """The fp32 weight `exact` keeps for a bf16 parameter (None where the parameter itself is
        the whole weight): what a checkpoint should hold."""
        if self.update != "exact" or p.dtype != torch.bfloat16 or "low_bits" not in self.state.get(p, {}):
            return None
        return join_fp32(p.detach(), self.state[p]["low_bits"])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts states to the weights' dtype on load; these keep theirs (fp32 moments, int16 low bits)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[int(index)]
            for key, value in saved.items():
                if torch.is_tensor(value) and key != "step":
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
                self.step_one(group, p, index)
        return loss

    @torch.no_grad()
    def step_one(self, group: dict, p: torch.Tensor, index: int) -> None:
        """One parameter's step: what `step` does for each parameter in turn (the fused backward
        pass calls it from the parameter's gradient hook). `index` is the parameter's position in
        the whole optimizer, counting every group: it seeds stochastic rounding, so a parameter
        stepped alone draws the bits the whole step would have."""
        if p.grad is None:
            return
        state = self.state[p]
        if not state:
            state.update(step=0, **self._new(p))
        state["step"] += 1
        w = self._weight(p, state)
        self._apply(group, p.grad.float(), w, state)  # the optimizer's math, in fp32, on w
        self._write(p, w, state, index, state["step"])

    @abc.abstractmethod
    def _new(self, p: torch.Tensor) -> dict:
        """The fresh state of a weight (its fp32 moments)."""

    @abc.abstractmethod
    def _apply(self, group: dict, g: torch.Tensor, w: torch.Tensor, state: dict) -> None:
        """One step of the optimizer's math on the fp32 weight `w`, in place."""


def _unwrapped(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def whole_weight(optimizer: torch.optim.Optimizer | None, p: torch.Tensor) -> torch.Tensor:
    """p's whole weight: the fp32 one `exact` keeps for a bf16 parameter, else p itself."""
    inner = _unwrapped(optimizer)
    master = inner.master_weight(p) if isinstance(inner, _LowPrecision) else None
    return p.detach() if master is None else master


@contextlib.contextmanager
def master_weights(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Inside: each bf16 parameter that `exact` keeps low bits for holds its whole fp32 weight (the
    parameter's data swapped, and put back after): a checkpoint written inside loses nothing of
    what training learned. No-op for other optimizers and write-backs."""
    inner = _unwrapped(optimizer)
    swapped = []
    if isinstance(inner, _LowPrecision):
        for group in inner.param_groups:
            for p in group["params"]:
                master = inner.master_weight(p)
                if master is not None:
                    swapped.append((p, p.data))
                    p.data = master
    try:
        yield
    finally:
        for p, data in swapped:
            p.data = data


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
