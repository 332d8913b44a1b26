"""FSDP2 for tunelab's trained modules: shard, accumulate, clip, gather, save and resume.

Every function here is collective: all processes call it, in the same order (the trainer does).

    shard          fully_shard each unit (transformer / ResNet / CLIP layer), then the module;
                   frozen parameters inside a trained module are sharded too (no gradients);
                   modules that do not train stay whole on every process
    rebind         the trainable plan's parameter lists, pointed at the sharded parameters
                   (fully_shard replaces every parameter by a DTensor one)
    gradient_sync  FSDP's reduce-scatter on the last micro-batch of a step only
    clip           the global gradient norm over the shards, and clipping to it
    full_state     the whole weights, gathered on rank 0 (in CPU memory): the SGM checkpoint
    save / load    the sharded weights and optimizer states, each process its own shard
                   (torch.distributed.checkpoint): a state that resumes exactly
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import torch

if TYPE_CHECKING:
    from tunelab.train.engines import FsdpSettings
    from tunelab.train.parts import TrainablePlan

SHARDED = "sharded"  # the folder of a training state that holds the shards


def shard(modules: Mapping[str, torch.nn.Module], settings: "FsdpSettings",
          compute_dtype: torch.dtype | None = None) -> None:
    """`compute_dtype` (bf16 under mixed_precision = "bf16"): weights are gathered in it for the
    forward and backward, gradients reduced in fp32; the sharded weights and the optimizer stay fp32."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kw = dict(reshard_after_forward=settings.reshard_after_forward,
              offload_policy=CPUOffloadPolicy() if settings.offload_params else OffloadPolicy(),
              mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32
                                             if compute_dtype is not None else None))
    for module in modules.values():
        # innermost units first: a unit sharded after one inside it would take that one's parameters
        # too (Transformer2DModel around its BasicTransformerBlocks), and FSDP2 refuses a parameter twice
        units = [m for m in module.modules() if type(m).__name__ in settings.units and m is not module]
        for unit in reversed(units):
            fully_shard(unit, **kw)
        with _keeps_output_recording(module):
            fully_shard(module, **kw)


@contextlib.contextmanager
def _keeps_output_recording(module: torch.nn.Module) -> Iterator[None]:
    """fully_shard gives a module a new class (FSDP<Name>); transformers finds what a model may
    record (the text encoders' hidden states) by its class name, so the new class is registered
    with the old one's entry."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
    except ImportError:  # other transformers versions keep it on the class itself
        yield
        return
    entry = registry.get(module)
    yield
    if entry:
        registry[module] = entry


def parameter_names(modules: Mapping[str, torch.nn.Module]) -> dict[int, tuple[str, str]]:
    """id(parameter) -> (module name, parameter name): taken before sharding, for `rebind`."""
    return {id(p): (name, n) for name, m in modules.items() for n, p in m.named_parameters()}


def rebind(plan: "TrainablePlan", modules: Mapping[str, torch.nn.Module], names: dict[int, tuple[str, str]]) -> None:
    def new(p: torch.nn.Parameter) -> torch.nn.Parameter:
        module, name = names[id(p)]
        return modules[module].get_parameter(name)

    plan.param_groups = {c: [new(p) for p in ps] for c, ps in plan.param_groups.items()}
    plan.unet_blocks = {b: [new(p) for p in ps] for b, ps in plan.unet_blocks.items()}


def gradient_sync(modules: Iterable[torch.nn.Module], enabled: bool) -> None:
    for m in modules:
        m.set_requires_gradient_sync(enabled)


def clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The total gradient norm (before clipping) over every shard; clips to `max_norm` when > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # a DTensor: the shards' partial norms, reduced
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return float(norm)


def full_state(modules: Mapping[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: whole state dict} on rank 0 ({} elsewhere), gathered shard by shard into CPU memory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {name: get_model_state_dict(m, options=options) for name, m in modules.items()}


def _states(modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": {name: get_model_state_dict(m) for name, m in modules.items()},
            "optim": get_optimizer_state_dict(_together(modules), optimizer)}


def _together(modules: Mapping[str, torch.nn.Module]) -> torch.nn.Module:
    """One module over all the trained ones (the optimizer spans them): its parameter names key the states."""
    return torch.nn.ModuleDict(dict(modules))


def save(folder: Path, modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(modules, optimizer), checkpoint_id=str(folder / SHARDED))


def load(folder: Path, modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    states = _states(modules, optimizer)
    dcp.load(states, checkpoint_id=str(folder / SHARDED))
    for name, m in modules.items():
        set_model_state_dict(m, states["model"][name])
    set_optimizer_state_dict(_together(modules), optimizer, states["optim"])
