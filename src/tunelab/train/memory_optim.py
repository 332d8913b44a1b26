"""Optimizer states and step temporaries, from each trained parameter's shape (`train/memory.py`).

`optimizer_kind` builds the run's optimizer over meta parameters (train/optim.py's choice: full_bf16's
low-precision twins, optim.args) and reads what it keeps; `optimizer_memory` counts it over the
tensors the optimizer holds -- the trained parameters, or under ZeRO / FSDP1 the flat partitions
(where Adafactor and CAME cannot factor). The per-element temporaries were measured on the CPU with
torch.profiler; tests/train/test_memory.py checks states and temporaries against every optimizer
installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunelab.config import RunConfig
from tunelab.errors import TunelabError


@dataclass(frozen=True)
class OptimizerKind:
    """The optimizer train/optim.py builds for the run file, as its memory sees it."""

    kind: str  # adamw, lowprec_adamw, lion, adafactor, came, prodigy, schedulefree, adamw8bit, optimi_*, other
    label: str
    foreach: bool = False  # one temporary the size of a whole parameter group (torch's foreach AdamW)
    fused: bool = False  # torch's fused kernel: no temporaries
    extra: str = ""  # 2 more bytes per bf16 weight: "Kahan compensation" (kahan) or "low 16 bits" (exact)
    update: str = "nearest"  # tunelab's twins: how bf16 weights take the step (its temporaries differ)
    beta1: bool = True  # Adafactor / Prodigy keep a first moment only with beta1
    slice_p: int = 1  # Prodigy's slice_p


def optimizer_kind(cfg: RunConfig, plan) -> OptimizerKind:
    """Build the run's optimizer over meta parameters (nothing is allocated) and read what it keeps:
    the class and flags train/optim.py chose (full_bf16's low-precision twins, optim.args)."""
    import contextlib
    import io

    from tunelab.train.optim import build_optimizer

    o, t = cfg.optim, cfg.train
    if o.name == "adamw8bit":  # bitsandbytes needs CUDA to construct; its layout is fixed
        return OptimizerKind("adamw8bit", "bitsandbytes AdamW8bit")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # prodigy prints its settings
            opt = build_optimizer(plan, o, t.bf16_update if t.full_bf16 else "nearest", cfg.run.seed)
    except TunelabError:
        if o.name not in _WITHOUT_PACKAGE:  # a setting the run would be refused for: say so here too
            raise
        return _WITHOUT_PACKAGE[o.name]  # not installed on this machine: their defaults
    cls, d = type(opt), opt.defaults
    module, name = cls.__module__, cls.__name__
    label = f"{module.split('.')[0]} {name}"
    extra = {"kahan": "Kahan compensation", "exact": "the fp32 weights' low 16 bits"}.get(t.bf16_update, "")
    extra = extra if t.full_bf16 else ""  # tunelab's twins (and optimi's kahan_sum) keep them beside bf16 weights
    if module.startswith("torch.optim") and name == "AdamW":
        return OptimizerKind("adamw", label + (" (fused)" if d.get("fused") else " (foreach)" if d.get("foreach") else ""),
                             foreach=bool(d.get("foreach")) and not d.get("fused"), fused=bool(d.get("fused")))
    if name == "LowPrecisionAdamW":
        return OptimizerKind("lowprec_adamw", f"tunelab AdamW ({opt.update} bf16 update)", extra=extra, update=opt.update)
    if module.startswith("tunelab") and name in ("Lion", "LowPrecisionLion"):
        return OptimizerKind("lion", "tunelab Lion" + (f" ({opt.update} bf16 update)" if t.full_bf16 else ""), extra=extra,
                             update=opt.update)
    known = {"Adafactor": "adafactor", "CAME": "came", "Prodigy": "prodigy", "AdamWScheduleFree": "schedulefree"}
    if name in known:
        beta1 = d.get("beta1") is not None if name == "Adafactor" else (d.get("betas") or (0.9,))[0] > 0
        return OptimizerKind(known[name], label, foreach=bool(d.get("foreach")), beta1=beta1,
                             slice_p=int(d.get("slice_p", 1) or 1))
    if module.startswith("optimi"):
        return OptimizerKind(f"optimi_{name.lower()}", f"torch-optimi {name}", extra=extra)
    return OptimizerKind("other", f"{module}.{name} (assumed two states per weight, as AdamW)")


# Optimizers whose package may be missing where the estimate runs (the run itself checks at launch)
_WITHOUT_PACKAGE = {"prodigy": OptimizerKind("prodigy", "prodigyopt Prodigy"),
                    "came": OptimizerKind("came", "came_pytorch CAME")}


@dataclass(frozen=True)
class OptimizerMemory:
    states: int  # bytes kept from step to step
    temporaries: int  # bytes the step allocates and frees again
    note: str


def _factored(shape: tuple[int, ...]) -> int:
    """Elements of Adafactor's / CAME's row and column statistics of a >= 2-D parameter: the
    averages over its last and its second-to-last dimension (transformers' `_get_options`)."""
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


def _state_elements(k: OptimizerKind, shape: tuple[int, ...]) -> tuple[int, int]:
    """(elements in fp32, elements in the weights' dtype) one parameter's state holds."""
    n = math.prod(shape)
    fp32 = {"lowprec_adamw": 2 * n, "lion": n}
    weights = {"adamw": 2 * n, "schedulefree": 2 * n, "optimi_adamw": 2 * n, "optimi_stableadamw": 2 * n,
               "optimi_lion": n, "optimi_adan": 4 * n, "other": 2 * n}
    if k.kind == "adafactor":  # beta1 None (the default): no first moment
        return (_factored(shape) if len(shape) >= 2 else n) + (n if k.beta1 else 0), 0
    if k.kind == "came":  # first moment, plus row / column statistics of the second moment and the residual
        return n + (2 * _factored(shape) if len(shape) >= 2 else n), 0
    if k.kind == "prodigy":  # exp_avg, exp_avg_sq, and s, p0 over every slice_p-th element
        return 0, (n if k.beta1 else 0) + n + 2 * math.ceil(n / k.slice_p)
    return fp32.get(k.kind, 0), weights.get(k.kind, 0)


def optimizer_memory(k: OptimizerKind, shapes: list[tuple[int, ...]], groups: list[int], weight_bytes: int,
                     one_at_a_time: bool = False) -> OptimizerMemory:
    """States and step temporaries over `shapes` (the tensors the optimizer holds: the trained
    parameters, or DeepSpeed's flat fp32 partitions) in `weight_bytes` per element.
    `one_at_a_time`: the fused backward pass steps each parameter alone (a foreach step then
    covers one tensor)."""
    largest = max((math.prod(s) for s in shapes), default=0)
    if k.kind == "adamw8bit":  # 1-byte moments + an fp32 absmax per 256 elements; small tensors keep fp32 moments
        states = sum(2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in map(math.prod, shapes))
        return OptimizerMemory(states, 0, "two 8-bit moments (+ block scales), updated in place")
    fp32, same = (sum(x) for x in zip(*(_state_elements(k, s) for s in shapes))) if shapes else (0, 0)
    states = 4 * fp32 + weight_bytes * same
    extra = 2 * sum(map(math.prod, shapes)) if k.extra and weight_bytes == 2 else 0
    temps, how = _temporaries(k, [largest] if one_at_a_time else groups, largest, weight_bytes)
    what = {"adamw": "two moments in the weights' dtype", "lowprec_adamw": "two fp32 moments", "lion": "an fp32 momentum",
            "adafactor": "factored second moments (rows + columns), fp32", "came": "first moment + factored statistics, fp32",
            "prodigy": "two moments + s + p0", "schedulefree": "z and the second moment",
            "optimi_adamw": "two moments in the weights' dtype", "optimi_stableadamw": "two moments in the weights' dtype",
            "optimi_lion": "a momentum in the weights' dtype", "optimi_adan": "four states in the weights' dtype",
            "other": "two states in the weights' dtype (assumed)"}.get(k.kind, "states")
    note = f"{what}{' + ' + k.extra if extra else ''}; step: {how}"
    return OptimizerMemory(states + extra, temps, note)


def _temporaries(k: OptimizerKind, groups: list[int], largest: int, w: int) -> tuple[int, str]:
    """What the optimizer's step allocates on top of its states."""
    if k.fused or k.kind == "adamw8bit":
        return 0, "in place"
    if k.foreach:  # torch's _multi_tensor_adam: sqrt(exp_avg_sq) for the whole group at once
        return max(groups, default=0) * w, "one temporary the size of the largest parameter group (foreach)"
    per_element = _PER_PARAMETER.get((k.kind, w, k.update if w == 2 else "")) or _PER_PARAMETER.get((k.kind, w), w)
    return largest * per_element, f"one parameter at a time: {per_element} B x its largest"


# Bytes the step of one parameter allocates per element of it, by (kind, weight bytes[, bf16 update]):
# measured on the CPU with torch.profiler (tests/train/test_memory.py checks them against the real
# optimizers). tunelab's twins upcast a bf16 weight and its gradient to fp32; `exact` splits and
# joins the fp32 weight through int32 temporaries.
_PER_PARAMETER: dict[tuple, int] = {
    ("adamw", 4): 8, ("adamw", 2): 4,
    ("lowprec_adamw", 4): 8, ("lowprec_adamw", 2, "exact"): 16, ("lowprec_adamw", 2, "stochastic"): 19,
    ("lowprec_adamw", 2, "kahan"): 16, ("lion", 4): 12, ("lion", 2, "exact"): 20, ("lion", 2): 20,
    ("lion", 2, "stochastic"): 20, ("lion", 2, "kahan"): 20, ("lion", 2, "nearest"): 20,
    ("adafactor", 4): 8, ("adafactor", 2): 16, ("came", 4): 12, ("came", 2): 24, ("prodigy", 4): 4,
}


