"""PILOT inside ComfyUI: the model patch (gradients, attention recorder, semantic boundary control) and the sampler.

``install(model, word_indices, boundary_control)`` returns a clone whose UNet can take part in autograd, which
records (while the sampler asks for it) the post-softmax cross-attention probabilities of the conditional rows at
every level but the highest resolution (latent downsample 2, 4, 8: SD1.5's 32x32, 16x16, 8x8 layers at 512 px), with
their graph, and which, with semantic boundary control on, multiplies the cross-attention probabilities of every
layer (both CFG halves) by the boundary mask while the PILOT sampler runs. The guide lives in ``model_options``.

``sample_pilot`` is a k-diffusion-style sampler function for ``comfy.samplers.KSAMPLER`` (SamplerCustom /
SamplerCustomAdvanced). DDIM with eta 0 in sigma space; while t >= 1000 (1 - gamma), every k-th step runs n inner
steps of SGD with momentum on z_t (DDPM scale, z = x sqrt(abar)) against L = L_bg + lambda_t L_s, each a forward and
backward pass of the UNet on the positive conditioning only (x0_hat from the conditional eps, no CFG); after that,
the blend stage re-noises the known image into the kept region before every model call. The model calls of the
sampler bypass ComfyUI's own inpaint re-noising (KSamplerX0Inpaint) so that the optimisation stage sees the free
background: the known image and the mask are read from ComfyUI's latent_image / denoise_mask.
Formulas and defaults: kernels/pilot.py (reference-implementation notes, section PILOT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from faithful_inpaint.kernels import masks as mask_ops
from faithful_inpaint.kernels import pilot as pilot_math
from faithful_inpaint.kernels.attention_maps import merge_heads, split_heads
from faithful_inpaint.patching.attention_capture import AttentionRecorder
from faithful_inpaint.patching.blocks import host_attention, previous_replace, transformer_blocks
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.gradients import enable_gradients, for_autograd, gradient_pass

GUIDE_KEY = "faithful_inpaint_pilot"
GUIDANCE_NODE = "PILOTGuidance"
SAMPLER_NODE = "PILOTSampler"
LOSS_DOWNSAMPLES = (2, 4, 8)       # "all but the highest resolution" (64x64 excluded at 512 px)
WINDOW = 77                        # CLIP window: one SOT every 77 context tokens


@dataclass(eq=False)
class PILOTGuide:
    recorder: AttentionRecorder
    word_indices: list[int]
    boundary_control: bool
    inside_rule: str = "reference"              # kernels.pilot.inside_map rule (loss and boundary control)
    fg: torch.Tensor | None = None              # [B, 1, H, W] latent mask (1 = regenerate) while the sampler runs
    probe: list | None = None                   # tests: boundary-controlled probabilities land here when a list
    last_losses: list = field(default_factory=list)   # (step, inner step, total loss per sample) of the last run

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; every clone must reach the same guide.
        return self

    def semantic_loss(self, fg: torch.Tensor, batch: int) -> torch.Tensor:
        """L_s averaged over the recorded layers, per sample: [B]. A layer's foreground is the same inside map
        semantic boundary control uses, as in the reference code, where one attention mask serves both (eqs. 12-13
        and 16)."""
        latent_hw = tuple(fg.shape[-2:])
        layers = []
        for cap in self.recorder.captures:
            if cap.maps.shape[0] != batch:
                continue
            fg_layer = mask_ops.match_batch(pilot_math.inside_map(fg, cap.height, cap.width, self.inside_rule),
                                            batch)
            if fg_layer.shape[1] != cap.maps.shape[1]:
                continue     # an area-restricted conditioning: not a full-image map
            layers.append((cap.maps, fg_layer.to(cap.maps.device)))
        if not layers:
            raise NodeInputError(SAMPLER_NODE, "model", "no cross-attention was recorded at the loss layers "
                                 f"(latent {latent_hw}); is the image too small?")
        return pilot_math.mean_centralisation_loss(layers, self.word_indices)


def loss_levels(model) -> tuple[int, ...]:
    """The loss layers' levels present in this model (a tiny test UNet has fewer levels than SD1.5)."""
    present = {b.downsample for b in transformer_blocks(model.get_model_object("diffusion_model"))
               if getattr(b.module, "attn2", None) is not None}
    levels = tuple(d for d in LOSS_DOWNSAMPLES if d in present)
    if not levels:
        raise ValueError(f"this model has no cross-attention below the highest resolution (levels {sorted(present)})")
    return levels


def install(model, word_indices, boundary_control: bool = False, inside_rule: str = "reference"):
    """A clone of ``model`` prepared for PILOT (gradients, recorder, optional boundary control, guide).
    ``inside_rule``: how each attention layer's inside map is made from the latent mask (kernels.pilot.inside_map)."""
    if inside_rule not in pilot_math.INSIDE_MAP_RULES:
        raise ValueError(f"unknown inside-map rule {inside_rule!r}; expected one of {pilot_math.INSIDE_MAP_RULES}")
    recorder = AttentionRecorder(attention=("attn2",), downsamples=loss_levels(model), probabilities=True,
                                 with_grad=True, cond_only=True, average_heads=True, enabled=False)
    guide = PILOTGuide(recorder, list(word_indices), bool(boundary_control), inside_rule)
    clone = enable_gradients(model)
    if boundary_control:
        for info in transformer_blocks(clone.get_model_object("diffusion_model")):
            if getattr(info.module, "attn2", None) is None:
                continue
            previous = previous_replace(clone, "attn2", info.key)
            clone.set_model_attn2_replace(_boundary_replace(guide, previous), *info.key)
    # Installed last, the recorder chains the boundary control and records the probabilities BEFORE it, as the
    # reference code does (it stores the loss term, then masks the probabilities). After the control, every word
    # token's probability outside the fully masked pixels is 0, so R (eq. 12) would vanish identically and
    # L_s would reduce to -I; the paper's remark that the background attention "naturally approaches zero" after
    # the first optimisation steps also only makes sense for the uncontrolled probabilities. No option is offered.
    clone = recorder.install(clone)
    clone.model_options[GUIDE_KEY] = guide
    return clone


def _boundary_replace(guide: PILOTGuide, previous):
    """attn2 replace: the layer's attention (or the replace it chains) with the boundary control applied, by way of
    ``optimized_attention_override``, to every text-attention call made inside it (IPAdapter-style extra attention
    over other keys passes through)."""
    def replace(q, k, v, extra_options):
        if guide.fg is None:
            return previous(q, k, v, extra_options) if previous is not None else host_attention(q, k, v, extra_options)
        options = dict(extra_options)
        options["optimized_attention_override"] = _boundary_override(guide, extra_options.get(
            "optimized_attention_override"), extra_options)
        return previous(q, k, v, options) if previous is not None else host_attention(q, k, v, options)

    return replace


def _boundary_override(guide: PILOTGuide, prior, layer_options):
    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        def passthrough():
            if prior is not None:
                return prior(func, q, k, v, heads, mask=mask, attn_precision=attn_precision,
                             skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, **kwargs)
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)

        fg = guide.fg
        height, width = layer_options["activations_shape"][-2:]
        if (fg is None or skip_reshape or mask is not None or k.shape[1] % WINDOW != 0
                or q.shape[1] != height * width):
            return passthrough()
        b, _, dim = q.shape
        qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
        probs = ((qh.float() @ kh.float().transpose(-1, -2)) * (dim // heads) ** -0.5).softmax(-1)
        full = mask_ops.match_batch(pilot_math.control_map(fg, height, width, guide.inside_rule), b).to(probs.device)
        probs = pilot_math.boundary_control(probs, full, range(0, k.shape[1], WINDOW))
        if guide.probe is not None:
            guide.probe.append(probs.detach().clone())
        out = probs.to(vh.dtype) @ vh                                   # [b, heads, n, d]
        if skip_output_reshape:
            return out
        return merge_heads(out)

    return override


def _guide(extra_args) -> PILOTGuide:
    guide = extra_args.get("model_options", {}).get(GUIDE_KEY)
    if guide is None:
        raise NodeInputError(SAMPLER_NODE, "model", "the model was not prepared for PILOT: pass it through the "
                             f"'PILOT guidance' ({GUIDANCE_NODE}) node before the sampler.")
    return guide


def _conditional_x0(model, x, sigma, s_in, model_options):
    """x0_hat of the positive conditioning alone (no CFG), through the guider's model and ComfyUI's
    calc_cond_batch (so wrappers, area / timestep ranges and ControlNet hooks on the cond still apply)."""
    import comfy.samplers

    guider = model.inner_model
    conds = getattr(guider, "conds", None) or {}
    positive = conds.get("positive")
    if positive is None:
        raise NodeInputError(SAMPLER_NODE, "guider", "PILOT optimises against the positive conditioning: use "
                             "SamplerCustom or a CFG / basic guider with a positive prompt.")
    return comfy.samplers.calc_cond_batch(guider.inner_model, [positive], x, sigma * s_in, model_options)[0]


@torch.no_grad()
def sample_pilot(model, x, sigmas, extra_args=None, callback=None, disable=None, every=10, inner_steps=10,
                 lr=0.025, lr_warmup=0.007, coef=150.0, gamma=1.0, momentum=0.7, mask="binary"):
    """PILOT sampling: DDIM (eta 0) with latent optimisation every ``every`` steps while t >= 1000 (1 - gamma),
    then the blend stage. ``mask``: "binary" thresholds the latent noise mask at 0.5 as the reference does (its
    masks are binary); "soft" uses ComfyUI's resized mask as it is (a feathered edge weights the background loss
    and the blend by the kept fraction)."""
    import comfy.model_management
    from comfy.k_diffusion.sampling import default_noise_sampler, trange

    extra_args = {} if extra_args is None else extra_args
    guide = _guide(extra_args)
    denoise_mask = extra_args.get("denoise_mask")
    if denoise_mask is None:
        raise NodeInputError(SAMPLER_NODE, "latent", "PILOT needs the region to inpaint and the known image: give "
                             "SamplerCustom the VAE-encoded image with a noise mask (SetLatentNoiseMask).")
    if mask not in ("binary", "soft"):
        raise NodeInputError(SAMPLER_NODE, "mask", f"expected 'binary' or 'soft', got {mask!r}")
    fg = mask_ops.as_batch(denoise_mask[:, :1].float())                 # 1 = regenerate, latent resolution
    if mask == "binary":
        fg = pilot_math.binarised(fg)
    # nothing kept anywhere: L_bg and lambda_t are 0, so the gradient is 0 (the reference skips the passes too)
    optimise = int(inner_steps) > 0 and bool((fg < 1).any())
    z_img = getattr(model, "latent_image", None)
    if z_img is None:
        z_img = torch.zeros_like(x)
    ms = model.inner_model.inner_model.model_sampling
    args = {k: v for k, v in extra_args.items() if k != "denoise_mask"}
    args["denoise_mask"] = None                # our own blend / no blend: skip KSamplerX0Inpaint's re-noising
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    guide.last_losses = []
    guide.fg = fg
    try:
        for i in trange(steps, disable=disable):
            comfy.model_management.throw_exception_if_processing_interrupted()
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            t = float(ms.timestep(sigmas[i]))
            if t >= 1000.0 * (1.0 - gamma):
                if i % max(int(every), 1) == 0 and optimise:
                    lr_t = pilot_math.step_learning_rate(t, lr, lr_warmup, first=i == 0)
                    x = _optimise(model, guide, x, sigmas[i], t, fg, z_img, args, s_in, i, lr_t, coef,
                                  int(inner_steps), momentum)
            else:
                x = pilot_math.blend(x, z_img, fg, sigma, noise_sampler(sigmas[i], sigmas[i + 1]))
            denoised = model(x, sigmas[i] * s_in, **args)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            x = denoised + (sigma_next / sigma) * (x - denoised) if sigma_next > 0 else denoised
    finally:
        guide.fg = None
    return x


def _optimise(model, guide, x, sigma, t, fg, z_img, args, s_in, step, lr_t, coef, inner_steps, momentum):
    """``inner_steps`` momentum-SGD steps at learning rate ``lr_t`` on z_t = x sqrt(abar) (the DDPM-scale latent
    the reference optimises)."""
    import comfy.model_management

    scale = 1.0 / math.sqrt(1.0 + float(sigma) ** 2)                  # sqrt(abar_t)
    lam = pilot_math.lambda_t(t, fg, coef)
    z = x * scale
    velocity = None
    for j in range(inner_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        guide.recorder.clear()
        guide.recorder.enabled = True
        try:
            with gradient_pass(args) as a:
                z_leaf = z.detach().clone().requires_grad_(True)
                x0 = _conditional_x0(model, z_leaf / scale, for_autograd(sigma), for_autograd(s_in),
                                     a["model_options"])
                fg_g, z_img_g = for_autograd(fg).to(x0.device), for_autograd(z_img).to(x0.device)
                l_bg = pilot_math.background_loss(z_img_g, x0, fg_g)
                l_s = guide.semantic_loss(fg_g, x0.shape[0])
                total = pilot_math.total_loss(l_bg, l_s.to(l_bg), for_autograd(lam).to(l_bg.device))
                (grad,) = torch.autograd.grad(total.sum(), z_leaf)
                guide.last_losses.append((step, j, total.detach().clone()))
                del x0, l_bg, l_s, total, z_leaf                          # free the graph every inner step
        finally:
            guide.recorder.enabled = False
            guide.recorder.clear()
        z, velocity = pilot_math.momentum_step(z, grad.to(z.dtype), velocity, lr_t, momentum)
    return z / scale
