"""RASG inside ComfyUI: the model patch that records the attention it needs, and the sampler function.

``install(model, ...)`` returns a clone whose UNet can take part in autograd (``gradients.enable_gradients``) and
which records, while RASG asks for it, the pre-softmax cross-attention logits of the conditional rows at one
resolution (H/32 by default), averaged over heads, with their graph. The guide object is kept in the clone's
``model_options`` so the sampler, which only sees the model through ComfyUI's sampling wrappers, finds it.

``sample_rasg`` is a k-diffusion-style sampler function for ``comfy.samplers.KSAMPLER``, so it works in
SamplerCustom / SamplerCustomAdvanced with any guider, scheduler and model patch. Each step (eq. 8):
one model call under autograd -> denoised x0 (CFG combined) and the recorded maps -> the eq. (10) loss -> its
gradient w.r.t. x_t, standardised over the region it lives in (the latent noise mask if there is one, else the
whole latent) -> x_prev = x0 + sigma_down * eps + sigma_up * z. The graph is freed every step. The last step
(sigma_next = 0) has no noise term, so it is not guided.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from faithful_inpaint.kernels import masks as mask_ops
from faithful_inpaint.kernels import rasg as rasg_math
from faithful_inpaint.patching.attention_capture import AttentionRecorder
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.gradients import enable_gradients, for_autograd, gradient_pass

GUIDE_KEY = "faithful_inpaint_rasg"
SAMPLER_NODE = "RASGSampler"
GUIDANCE_NODE = "RASGGuidance"


@dataclass(eq=False)
class RASGGuide:
    recorder: AttentionRecorder
    token_indices: list[int]
    mask: torch.Tensor | None = None      # explicit [B, 1, H, W] mask, 1 = regenerate; None: the latent's noise mask
    layer_rule: str = "area"              # kernels.masks.at_resolution rule for the mask at the attention layer

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; every clone must reach the recorder its patches fill.
        return self

    def loss(self, latent_mask: torch.Tensor) -> torch.Tensor:
        """Eq. (10) on the maps recorded by the last model call, per sample: [B]."""
        maps = [c.maps for c in self.recorder.captures]
        if not maps:
            raise NodeInputError(SAMPLER_NODE, "model", "no cross-attention was recorded at the chosen resolution "
                                 "(no conditional rows, or the image is too small for that level).")
        cap = self.recorder.captures[0]
        averaged = torch.stack(maps).mean(0)                          # eq. (9): mean over layers -> [b, N, L]
        target = mask_ops.match_batch(mask_ops.at_resolution(latent_mask, cap.height, cap.width,
                                                             rule=self.layer_rule), averaged.shape[0])
        return rasg_math.segmentation_loss(averaged, target.to(averaged.device), self.token_indices)


def install(model, token_indices, downsamples=(4,), mask=None, layer_rule="area"):
    """A clone of ``model`` prepared for RASG (gradients enabled, attention recorder, guide in model_options).
    ``layer_rule``: how the latent mask becomes the binary target at the attention layer (kernels.masks)."""
    import comfy.patcher_extension

    if layer_rule not in mask_ops.LAYER_MASK_RULES:
        raise ValueError(f"unknown layer-mask rule {layer_rule!r}; expected one of {mask_ops.LAYER_MASK_RULES}")
    recorder = AttentionRecorder(attention=("attn2",), downsamples=tuple(downsamples), probabilities=False,
                                 with_grad=True, cond_only=True, average_heads=True, enabled=False)
    clone = recorder.install(enable_gradients(model))
    clone.model_options[GUIDE_KEY] = RASGGuide(recorder, list(token_indices), mask, layer_rule)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, GUIDE_KEY, _conditional_grad_only)
    return clone


def _conditional_grad_only(executor, model, conds, x_in, timestep, model_options):
    """During a guided call, run the positive conditioning with autograd and the others without it.

    Only the conditional rows' attention enters the objective, so the backward pass needs the conditional half
    only: this halves its cost and the memory the graph holds, for the price of two half-batch forwards instead of
    one batched forward. conds[0] is the positive conditioning (the None entries keep every cond at its index, so
    cond_or_uncond stays right).
    """
    guide = model_options.get(GUIDE_KEY)
    if guide is None or not guide.recorder.enabled or not torch.is_grad_enabled() or len(conds) < 2:
        return executor(model, conds, x_in, timestep, model_options)
    out = executor(model, [conds[0]] + [None] * (len(conds) - 1), x_in, timestep, model_options)
    with torch.no_grad():
        rest = executor(model, [None] + list(conds[1:]), x_in.detach(), timestep, model_options)
    return out[:1] + rest[1:]


def _guide(extra_args) -> RASGGuide:
    guide = extra_args.get("model_options", {}).get(GUIDE_KEY)
    if guide is None:
        raise NodeInputError(SAMPLER_NODE, "model", "the model was not prepared for RASG: pass it through the "
                             "'RASG guidance' (RASGGuidance) node before the sampler.")
    return guide


def _latent_mask(guide: RASGGuide, extra_args, x) -> torch.Tensor:
    if guide.mask is not None:
        b = guide.mask.shape[0]
        if b != 1 and x.shape[0] % b:
            raise NodeInputError(GUIDANCE_NODE, "mask", f"{b} masks for a latent batch of {x.shape[0]}: give one mask, "
                                 "or one per image (a batch that divides the latent batch is repeated).")
        return mask_ops.resize(mask_ops.as_batch(guide.mask), x.shape[-2], x.shape[-1])
    denoise_mask = extra_args.get("denoise_mask")
    if denoise_mask is None:
        raise NodeInputError(SAMPLER_NODE, "latent", "RASG needs the region to inpaint: use a latent with a noise "
                             "mask (InpaintModelConditioning, SetLatentNoiseMask) or give RASGGuidance a mask.")
    return mask_ops.as_batch(denoise_mask[:, :1])


def _split(sigma_rule, model, sigma, sigma_next, eta):
    if sigma_rule == "paper":
        return rasg_math.ddim_split(sigma, sigma_next, eta)
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    ms = model.inner_model.inner_model.model_sampling
    if not hasattr(ms, "sigmas"):
        raise NodeInputError(SAMPLER_NODE, "sigma_rule", "the reference rule needs a discrete-timestep model.")

    def step_alpha(s):  # per-step alpha a_t / a_{t-1} at the timestep of sigma s
        t = int(round(float(ms.timestep(torch.tensor(s)))))
        abar = 1.0 / (1.0 + ms.sigmas[max(t, 1) - torch.arange(2)].double() ** 2)
        return float(abar[0] / abar[1])

    return rasg_math.reference_split(sigma_next, step_alpha(sigma), step_alpha(sigma_next), eta)


@torch.no_grad()
def sample_rasg(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.15, sigma_rule="paper",
                guide_start=0.0, guide_end=1.0):
    """RASG sampling (eq. 8). Steps whose position i / n lies in [guide_start, guide_end) use the standardised
    gradient as the noise term; the others draw it from N(0, 1) like plain DDIM with this eta (eta 0: DDIM)."""
    import comfy.model_management
    from comfy.k_diffusion.sampling import default_noise_sampler, trange

    extra_args = {} if extra_args is None else extra_args
    guide = _guide(extra_args)
    latent_mask = _latent_mask(guide, extra_args, x)
    region = _gradient_region(extra_args, x)
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    for i in trange(steps, disable=disable):
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        sigma_down, sigma_up = _split(sigma_rule, model, sigma, sigma_next, eta)
        if sigma_up > 0 and guide_start <= i / steps < guide_end:
            denoised, z = _guided_call(model, guide, x, sigmas[i], s_in, extra_args, latent_mask, region)
        else:
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            z = noise_sampler(sigmas[i], sigmas[i + 1]) if sigma_up > 0 else None
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        eps = (x - denoised) / sigma
        x = rasg_math.ddim_step(denoised, eps, sigma_down, sigma_up, z)
    return x


def _gradient_region(extra_args, x) -> torch.Tensor | None:
    """Where the gradient w.r.t. x_t lives: the latent noise mask's support when the latent has one (ComfyUI puts
    the re-noised known image outside it before every model call, so the gradient there is 0), else None (all)."""
    denoise_mask = extra_args.get("denoise_mask")
    if denoise_mask is None:
        return None
    region = mask_ops.as_batch(denoise_mask[:, :1]) > 0
    if tuple(region.shape[-2:]) != tuple(x.shape[-2:]):
        region = mask_ops.resize(region.float(), x.shape[-2], x.shape[-1]) > 0
    return region


def _guided_call(model, guide, x, sigma, s_in, extra_args, latent_mask, region=None):
    """One model call with gradients: (denoised x0, -grad L / std(grad L)), the std over ``region``."""
    guide.recorder.clear()
    guide.recorder.enabled = True
    try:
        with gradient_pass(extra_args) as args:
            x_in = x.detach().clone().requires_grad_(True)
            denoised = model(x_in, for_autograd(sigma) * for_autograd(s_in), **args)
            loss = guide.loss(for_autograd(latent_mask)).sum()
            (grad,) = torch.autograd.grad(loss, x_in)
    finally:
        guide.recorder.enabled = False
        guide.recorder.clear()
    return denoised.detach(), -rasg_math.standardised(grad, region)
