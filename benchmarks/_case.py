"""The sampling case the sampler benchmarks share: a random prompt, a centred square noise mask, CFG 7.5."""
from __future__ import annotations

import torch


def inpaint_case(model, side: int, steps: int, context_dim: int = 768):
    """``sample(model, sampler)`` running SamplerCustom's code path on a ``side`` x ``side`` latent whose centre
    quarter is regenerated, with ddim_uniform sigmas for ``steps`` steps, inside inference mode (as ComfyUI's
    executor runs every node)."""
    import comfy.sample
    import comfy.samplers

    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 77, context_dim, generator=g)
    positive, negative = [[ctx, {}]], [[torch.zeros_like(ctx), {}]]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)
    latent = torch.randn(1, 4, side, side, generator=g)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, side, side)
    mask[..., side // 4:3 * side // 4, side // 4:3 * side // 4] = 1

    def sample(m, sampler):
        with torch.inference_mode():
            comfy.sample.sample_custom(m, noise, 7.5, sampler, sigmas, positive, negative, latent,
                                       noise_mask=mask, seed=1, disable_pbar=True)

    return sample
