"""One training micro-step run on fake tensors, its memory counted op by op (for `train/memory.py`).

The modules are the real ones (diffusers' UNet and VAE, transformers' CLIP encoders) built on the
meta device, their parameters swapped for PyTorch fake tensors (`torch._subclasses.fake_tensor`):
tensors with a shape, a dtype and a device but no storage. The step then runs for real -- VAE
encode when there is no latent cache, the trained text encoders, the UNet under the run's autocast
and gradient checkpointing, the loss, backward -- and every operator's outputs are counted by a
dispatch mode (`_Tracker`) while a weak reference per storage subtracts them when autograd or
Python frees them. What it sees is what the eager step allocates: activations saved for backward,
autocast's cached 16-bit copies of fp32 weights, checkpointing's recomputation, temporaries, and
gradients as they arrive. No weight is ever allocated, so SDXL traces on a laptop in ~15 s.

The trace is, after every operator, the activations + temporaries, the share of them that is
autocast's 16-bit copies of fp32 weights, and the gradients so far; `Trace.peak` combines them for
an engine that keeps the gradients (DDP) or hands them off as they come (ZeRO-2/3, the fused
backward pass), and for weights already in 16 bits (no copies; gradients half the size), so one
trace of fp32 weights serves full_bf16, DeepSpeed and FSDP too.

Target "cuda" applies CUDA's autocast rules where they differ from the CPU's: CUDA runs group norm
and layer norm in fp32 (their outputs, saved for backward, are 4 B per element), the CPU in the
16-bit type. The CPU trace ("cpu") is what the CPU validation measures against.

Frozen text encoders are not run: their outputs (the conditioning, B x 77k x 2048) are made in the
frozen dtype directly; their no-grad forward frees everything but those outputs.

The fake tensors live on the CPU device: fake CUDA tensors need a CUDA build of torch for autograd
(a CPU-only build aborts). Hand-written because torch's MemTracker (torch.distributed._tools)
registers gradient hooks on every parameter of a module and fails on frozen ones, which every run
has (the VAE, a partial UNet).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

Target = Literal["cuda", "cpu"]
TRAINABLE = ("unet", "text_encoder_1", "text_encoder_2")


@dataclass(frozen=True)
class StepShape:
    """What one micro-batch looks like."""

    batch: int
    width: int  # pixels (the largest bucket)
    height: int
    chunks: int = 1  # 75-token windows per prompt (model.max_chunks: the longest prompt)
    encode_images: bool = False  # no latent cache: the VAE encodes the pixels inside the step


@dataclass(frozen=True)
class TraceSettings:
    """The settings that change what a step allocates."""

    trained_dtype: torch.dtype  # weights of modules that train (fp32; bf16 under full_bf16, DeepSpeed, FSDP)
    frozen_dtype: torch.dtype  # weights of frozen modules (the autocast dtype, fp32 without mixed precision)
    autocast: torch.dtype | None  # None: train.mixed_precision = 'no'
    checkpointing: bool
    fused: bool  # train.fused_backward: each gradient is freed as soon as it is complete
    target: Target = "cuda"
    accumulation: int = 1  # the loss is divided by it (a scalar: no memory), kept for the record


@dataclass
class Trace:
    """What the fake step allocated: static weights per component, the gradients' total, and after
    every operator the activations + temporaries, the part of them that is autocast's 16-bit copies
    of fp32 weights, and the gradients so far."""

    weights: dict[str, int]  # component -> bytes of its parameters and buffers
    gradients: int  # bytes of every trained parameter's gradient (all at once)
    largest_gradient: int  # bytes of the largest one
    act: list[int] = field(default_factory=list)
    cast: list[int] = field(default_factory=list)
    grad: list[int] = field(default_factory=list)
    phases: list[tuple[int, str]] = field(default_factory=list)  # (first point, name): encode, forward, backward

    def activations(self, casts: bool = True) -> int:
        """The most activations + temporaries alive at once (`casts` False: without autocast's weight
        copies, which weights already in the 16-bit dtype do not need)."""
        if casts:
            return max(self.act, default=0)
        return max((a - c for a, c in zip(self.act, self.cast)), default=0)

    def peak(self, grad_share: float = 1.0, casts: bool = True) -> tuple[int, int, str]:
        """(bytes above the weights, of which gradients, phase) at the step's peak when a share
        `grad_share` of the gradients' bytes stays on the device: 1 = all, as traced (DDP keeps
        them); 0.5 = the same gradients in a 16-bit dtype; 0 = handed off as they arrive (ZeRO-2/3
        and FSDP reduce-scatter them; the fused backward pass frees them)."""
        best, grads, at = 0, 0, 0
        for i, (a, c, g) in enumerate(zip(self.act, self.cast, self.grad)):
            kept = int(g * grad_share)
            total = a - (0 if casts else c) + kept
            if total > best:
                best, grads, at = total, kept, i
        return best, grads, self.phase_at(at)

    def phase_at(self, point: int) -> str:
        return next((name for start, name in reversed(self.phases) if start <= point), "forward")


class _Tracker(TorchDispatchMode):
    """Counts the bytes of every storage alive, by kind ('act' unless relabelled), and records the
    (activations, gradients) pair after each operator."""

    def __init__(self) -> None:
        super().__init__()
        self._cells = WeakIdKeyDictionary()  # storage -> [kind, bytes, weakref whose callback frees it]
        self.now: dict[str, int] = {}
        self.act: list[int] = []
        self.cast: list[int] = []
        self.grad: list[int] = []

    def add(self, t: torch.Tensor, kind: str) -> None:
        st = t.untyped_storage()
        if st in self._cells:
            return
        cell = [kind, st.nbytes()]
        cell.append(weakref.ref(st, lambda _ref, c=cell: self._free(c)))
        self._cells[st] = cell
        self.now[kind] = self.now.get(kind, 0) + cell[1]

    def relabel(self, t: torch.Tensor, kind: str) -> None:
        """Count `t`'s storage as `kind` from now on (a gradient was an activation until autograd
        handed it to its parameter)."""
        self.add(t, kind)
        cell = self._cells[t.untyped_storage()]
        if cell[0] != kind:
            self.now[cell[0]] -= cell[1]
            self.now[kind] = self.now.get(kind, 0) + cell[1]
            cell[0] = kind

    def _free(self, cell: list) -> None:
        self.now[cell[0]] -= cell[1]

    def kind_of(self, t: torch.Tensor) -> str | None:
        cell = self._cells.get(t.untyped_storage())
        return cell[0] if cell else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # autocast's cast of a weight (kept in its cache and saved for backward) is counted apart
        weight = func is torch.ops.aten._to_copy.default and (self.kind_of(args[0]) or "").startswith("w:")
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t, "cast" if weight else "act")
        cast = self.now.get("cast", 0)
        self.act.append(self.now.get("act", 0) + cast)
        self.cast.append(cast)
        self.grad.append(self.now.get("grad", 0))
        return out


def trace_step(comps, shape: StepShape, settings: TraceSettings, objective, loss_cfg, clip_skip: int = 2) -> Trace:
    """Run one micro-step of `comps` (built on the meta device, `requires_grad` set by
    `parts.select_trainable`) on fake tensors and return its trace. The modules' parameters are
    replaced by fake ones: build them again (meta: seconds) for anything else."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = _Tracker()
    # allow_non_fake_inputs: the objective's noise-schedule tables are small real tensors
    with FakeTensorMode(allow_non_fake_inputs=True), _cuda_autocast_rules(settings):
        trained = _fake_weights(comps, settings)
        for name, module in comps.modules().items():
            for t in (*module.parameters(), *module.buffers()):
                tracker.add(t, f"w:{name}")
        _grad_hooks(trained, tracker, settings.fused)
        phases = []
        with tracker:
            mark = lambda name: phases.append((len(tracker.act), name))  # noqa: E731
            loss = _forward(comps, shape, settings, objective, loss_cfg, clip_skip, mark)
            mark("backward")
            loss.backward()
        weights = {k[2:]: v for k, v in tracker.now.items() if k.startswith("w:")}
    sizes = [p.numel() * p.element_size() for p in trained] or [0]
    return Trace(weights, sum(sizes), max(sizes), tracker.act, tracker.cast, tracker.grad, phases)


def _fake_weights(comps, settings: TraceSettings) -> list[torch.nn.Parameter]:
    """Swap every parameter and buffer for a fake tensor in the dtype the trainer gives it (a module
    that trains: `trained_dtype`, frozen parts of it included; a frozen one: `frozen_dtype`), keep
    requires_grad, set train / eval mode and gradient checkpointing as the trainer does. Returns
    the trained parameters."""
    trained = []
    for name, module in comps.modules().items():
        trains = any(p.requires_grad for p in module.parameters())
        dtype = settings.trained_dtype if trains else settings.frozen_dtype
        for sub in module.modules():
            for key, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[key] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype),
                                                              requires_grad=p.requires_grad)
            for key, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[key] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype)
        module.train(trains)
        if trains and settings.checkpointing:
            import warnings

            from tunelab.train.trainer import _enable_checkpointing

            with warnings.catch_warnings():  # transformers 5 renames gradient_checkpointing_enable (the trainer's call)
                warnings.simplefilter("ignore", FutureWarning)
                _enable_checkpointing(module)
        trained += [p for p in module.parameters() if p.requires_grad]
    return trained


def _grad_hooks(params: list[torch.nn.Parameter], tracker: _Tracker, fused: bool) -> None:
    """Count each gradient as a gradient once autograd hands it to its parameter; under the fused
    backward pass free it right there (the optimizer has stepped the parameter)."""
    def done(p: torch.nn.Parameter) -> None:
        tracker.relabel(p.grad, "grad")
        if fused:
            p.grad = None

    for p in params:
        p.register_post_accumulate_grad_hook(done)


def _forward(comps, shape: StepShape, settings: TraceSettings, objective, loss_cfg, clip_skip: int, mark) -> torch.Tensor:
    """The trainer's micro-step (train/step.py training_loss) on fake inputs: latents (VAE encode
    without a cache), conditioning, noised batch, UNet, per-sample loss; the loss to backpropagate."""
    from tunelab.train.losses import compute_loss
    from tunelab.train.step import predict

    b, h, w = shape.batch, shape.height // 8, shape.width // 8
    autocast = (torch.autocast("cpu", dtype=settings.autocast) if settings.autocast
                else contextlib.nullcontext())
    with autocast:
        if shape.encode_images:
            mark("VAE encode (no latent cache)")
        latents = _latents(comps.vae, shape, settings)  # (B, 4, H/8, W/8) float32
        mark("forward")
        cond = _conditioning(comps, shape, settings, clip_skip)
        noise = torch.empty(b, 4, h, w)
        timesteps = torch.zeros(b, dtype=torch.long if objective.prediction != "flow" else torch.float32)
        noised = objective.make(latents, noise, timesteps)
        ids = torch.zeros(b, 6)  # (B, 6) size and crop conditioning
        pred = predict(comps.unet, noised, cond, ids)
        per_sample = compute_loss(pred.float(), noised.target.float(), loss_cfg, objective.prediction,
                                  noised.timesteps, noised.snr, objective.num_train_timesteps)
        loss = per_sample.mean() / settings.accumulation
    return loss


def _latents(vae, shape: StepShape, settings: TraceSettings) -> torch.Tensor:
    b, h, w = shape.batch, shape.height // 8, shape.width // 8
    if not shape.encode_images:
        return torch.empty(b, 4, h, w)
    with torch.no_grad():
        pixels = torch.empty(b, 3, shape.height, shape.width, dtype=settings.frozen_dtype)  # (B, 3, H, W)
        return vae.encode(pixels).latent_dist.mean.float()


def _conditioning(comps, shape: StepShape, settings: TraceSettings, clip_skip: int):
    """Context (B, 77 x chunks, D1 + D2) and pooled (B, P): from the text encoders when one trains,
    else made directly in the frozen encoders' dtype (their no-grad forward keeps only these)."""
    from tunelab.models.text import Conditioning, encode_chunked

    te1, te2 = comps.text_encoder_1, comps.text_encoder_2
    b, tokens = shape.batch, 77 * shape.chunks
    if any(p.requires_grad for m in (te1, te2) for p in m.parameters()):
        ids = torch.zeros(b, shape.chunks, 77, dtype=torch.long)
        h1, h2, pooled = encode_chunked((te1, te2), ids, ids, clip_skip)
        return Conditioning(torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled, shape.chunks, [0] * b)
    dims = te1.config.hidden_size + te2.config.hidden_size
    dtype = settings.frozen_dtype
    context = torch.empty(b, tokens, dims, dtype=dtype)
    pooled = torch.empty(b, te2.config.projection_dim, dtype=dtype)
    return Conditioning(context, pooled, shape.chunks, [0] * b)


@contextlib.contextmanager
def _cuda_autocast_rules(settings: TraceSettings) -> Iterator[None]:
    """Under a CUDA target, CPU autocast runs group_norm and layer_norm in fp32, as CUDA's autocast
    does (its fp32 list); the CPU's runs them in the 16-bit type. Registered for the trace only."""
    if settings.target != "cuda" or settings.autocast is None:
        yield
        return
    lib = torch.library.Library("aten", "IMPL")
    try:
        for op in ("group_norm", "layer_norm"):
            lib.impl(op, _in_fp32(getattr(torch.ops.aten, op).default), "AutocastCPU")
        yield
    finally:
        lib._destroy()


def _in_fp32(op):
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(keys):
            cast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            return op(*cast, **kwargs)

    return kernel
