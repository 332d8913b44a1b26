"""The guided UNet as the samplers call it (samplers.py).

`Denoiser` wraps a `GuidedUNet` (guidance.py: CFG, PAG and SEG branches in one batch) twice over,
as A1111 wraps its model:

- `denoiser(x, sigma)` is k-diffusion's `CompVisDenoiser` / `CompVisVDenoiser`
  (`k_diffusion/external.py`): the UNet sees x * c_in at the timestep of sigma and the denoised
  estimate is x * c_skip + output * c_out (epsilon: c_skip 1, c_out -sigma; v: c_skip 1/(sigma^2+1),
  c_out -sigma/sqrt(sigma^2+1); c_in 1/sqrt(sigma^2+1)). Rectified flow is ComfyUI's CONST: the UNet
  sees x itself at sigma * 1000 and denoised = x - sigma * output. v on continuous EDM sigmas is
  ComfyUI's V_PREDICTION on ModelSamplingContinuousEDM: the same c_in / c_skip / c_out (its
  sigma_data is 1), the UNet at timestep ln(sigma) / 4 (`NoiseSchedule.timestep`).
- `denoiser.eps(x, t)` is A1111's `CompVisTimestepsDenoiser` / `...VDenoiser`
  (`sd_samplers_timesteps.py`) for DDIM, PLMS and UniPC: the UNet sees x at timestep t and v is
  turned into noise with the alphas of int(t).

The branches' outputs are turned into the sampler's quantity (denoised, or noise) before CFG, PAG
and SEG combine them, which is where A1111 combines (`GuidedUNet.branch_map`; with CFG rescale,
defined on the UNet's outputs, they combine first). Both keep the unconditional branch's estimate
of the last call (`uncond`, `eps_uncond`) for CFG++. The sampler state stays in float32 (as
A1111's); the UNet runs in its own dtype.
"""

from __future__ import annotations

import torch

from tunelab.errors import TunelabError
from tunelab.sample.guidance import GuidedUNet
from tunelab.sample.schedules import NoiseSchedule


class Denoiser:
    def __init__(self, unet: GuidedUNet, ns: NoiseSchedule, context: torch.Tensor, pooled: torch.Tensor,
                 time_ids: torch.Tensor):
        self.unet, self.ns = unet, ns
        dtype = unet.dtype
        self.context, self.pooled, self.time_ids = context.to(dtype), pooled.to(dtype), time_ids.to(dtype)
        self.uncond: torch.Tensor | None = None
        self.eps_uncond: torch.Tensor | None = None
        self.calls = 0  # UNet calls (tests count them)

    def _unet(self, x_in: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided output, unconditional output) in float32 for (B, 4, h, w) inputs at timesteps t (B,)."""
        self.calls += 1
        out = self.unet(x_in.to(self.unet.dtype), t.float(), encoder_hidden_states=self.context,
                        added_cond_kwargs={"text_embeds": self.pooled, "time_ids": self.time_ids})[0]
        return out.float(), self.unet.last_uncond.float()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided denoised estimate of x at noise level sigma (a scalar tensor or one per image)."""
        sigma = sigma.to(x.device, torch.float32) * x.new_ones([x.shape[0]])  # k-diffusion's sigma * s_in
        s = sigma[:, None, None, None]
        if self.ns.prediction == "flow":
            x_in, to_denoised = x, lambda o: x - o.float() * s
        else:
            c_in = 1 / (s**2 + 1.0) ** 0.5
            x_in = x * c_in
            if self.ns.prediction == "v":
                c_skip, c_out = 1.0 / (s**2 + 1.0), -s * 1.0 / (s**2 + 1.0) ** 0.5
                to_denoised = lambda o: o.float() * c_out + x * c_skip  # noqa: E731
            else:
                to_denoised = lambda o: x + o.float() * -s  # noqa: E731
        mapped = not self.unet.g.rescale  # the branches combine as denoised (see GuidedUNet.branch_map)
        self.unet.branch_map = to_denoised if mapped else None
        try:
            out, uncond = self._unet(x_in, self.ns.timestep(sigma))
        finally:
            self.unet.branch_map = None
        if mapped:
            self.uncond = uncond
            return out
        self.uncond = to_denoised(uncond)
        return to_denoised(out)

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided noise prediction at timesteps t (B,), for the timestep samplers."""
        if self.ns.prediction == "flow":
            raise TunelabError("DDIM, PLMS and UniPC cannot sample a rectified-flow model; use Euler")
        if self.ns.continuous:
            raise TunelabError("DDIM, PLMS and UniPC cannot sample a model on continuous EDM sigmas; use Euler or DPM++ 2M")
        if self.ns.prediction != "v":
            out, self.eps_uncond = self._unet(x, t)
            return out
        a = self.ns.alphas_cumprod[t.to(torch.int).cpu()].to(x.device)[:, None, None, None]
        sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
        to_eps = lambda o: sqrt_a * o.float() + sqrt_1ma * x  # noqa: E731  (predict_eps_from_z_and_v)
        mapped = not self.unet.g.rescale
        self.unet.branch_map = to_eps if mapped else None
        try:
            out, uncond = self._unet(x, t)
        finally:
            self.unet.branch_map = None
        if mapped:
            self.eps_uncond = uncond
            return out
        self.eps_uncond = to_eps(uncond)
        return to_eps(out)
