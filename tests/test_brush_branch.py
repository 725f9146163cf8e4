"""BrushNet-family branches on real ComfyUI UNets: placement of the residuals, sampling, files, nodes."""
import pytest
import torch

import comfy.sample
from faithful_inpaint.kernels.batch import COND, UNCOND
from faithful_inpaint.kernels.brush_branch import BranchConfig, BranchOutput, BrushBranch
from faithful_inpaint.patching.brush_branch import (BranchConditioning, BrushBranchHooks, branch_patcher,
                                                    inject_residuals, unet_state_dict_diffusers)
from faithful_inpaint.patching.schedule import ScheduleWindow
from faithful_inpaint.devtools.random_models import build_model
from helpers import forward

ALWAYS = ScheduleWindow(1e9, 0.0)
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}


@pytest.fixture(scope="module")
def models():
    return {"sd15": build_model("sd15"), "sd15_inpaint": build_model("sd15", inpaint=True),
            "sdxl": build_model("sdxl")}


def family_of(name):
    return "sdxl" if name.startswith("sdxl") else "sd15"


def trained_branch(name, model, seed=0, cross_attention=False):
    """A branch made from the model (as training starts) whose zero-convs were then "trained" (random)."""
    branch = BrushBranch.from_unet(unet_state_dict_diffusers(model),
                                   BranchConfig.tiny(family_of(name), cross_attention=cross_attention))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in branch.named_parameters():
            if n.startswith("brushnet_") or n.startswith("conv_in_condition"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return branch


def conditioning(batch=1, size=16, seed=3, context=None):
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(batch, 1, size, size)
    keep[..., 4:12, 4:12] = 0
    return BranchConditioning(torch.randn(batch, 4, size, size, generator=g), keep, context)


def patched(model, branch, strength=1.0, window=ALWAYS, cond=None, observer=None):
    clone = model.clone()
    BrushBranchHooks(branch_patcher(branch), cond or conditioning(), strength, window, observer=observer).install(clone)
    return clone


def call_inputs(name, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    ctx = torch.randn(batch, 77, CONTEXT_DIM[family_of(name)], generator=g)
    y = torch.randn(batch, 2816, generator=g) if family_of(name) == "sdxl" else None
    concat = torch.randn(batch, 5, 16, 16, generator=g) if name.endswith("inpaint") else None
    return x, ctx, y, concat


def no_hooks_left(module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in module.modules())


# --------------------------------------------------------------------------------------------------------------------
# Where the residuals land
# --------------------------------------------------------------------------------------------------------------------

def reference_unet(unet, x, timesteps, context, y, out: BranchOutput, strength):
    """ComfyUI's UNet forward with BrushNet's additions written out by hand: down residual i after input block i
    (into h and the skip), mid after the middle block, up residuals after each output block's resnet(+attention)
    and after its upsampler."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample, forward_timestep_embed, timestep_embedding

    to = {}
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(x.dtype))
    if y is not None:
        emb = emb + unet.label_emb(y)
    down, up = iter(out.down), iter(out.up)
    hs, h = [], x
    for block in unet.input_blocks:
        h = forward_timestep_embed(block, h, emb, context, to) + strength * next(down)
        hs.append(h)
    h = forward_timestep_embed(unet.middle_block, h, emb, context, to) + strength * out.mid
    for block in unet.output_blocks:
        h = torch.cat([h, hs.pop()], dim=1)
        layers = list(block)
        upsample = layers.pop() if isinstance(layers[-1], Upsample) else None
        h = forward_timestep_embed(layers, h, emb, context, to) + strength * next(up)
        if upsample is not None:
            h = upsample(h, output_shape=hs[-1].shape) + strength * next(up)
    assert next(down, None) is None and next(up, None) is None
    return unet.out(h)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_residuals_land_where_brushnet_adds_them(models, name):
    model = models[name]
    unet = model.model.diffusion_model
    x, ctx, y, _ = call_inputs(name)
    t = torch.tensor([600.0, 600.0])
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        branch = trained_branch(name, model)
        out = branch(x, torch.randn(2, 4, 16, 16, generator=g), torch.ones(2, 1, 16, 16), t, ctx, y)
        down, mid, up = branch.config.residual_channels()
        assert [r.shape[1] for r in out.down] == down and out.mid.shape[1] == mid
        assert [r.shape[1] for r in out.up] == up
        expected = reference_unet(unet, x, t, ctx, y, out, 0.7)
        with inject_residuals(unet, out, 0.7, {}) as options:
            got = unet(x, t, ctx, y, transformer_options=options)
        plain = unet(x, t, ctx, y, transformer_options={})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    assert no_hooks_left(unet)


def test_each_residual_reaches_its_own_point(models):
    """One non-zero residual at a time: the patched UNet equals the hand-written reference for each of them."""
    model = models["sd15"]
    unet = model.model.diffusion_model
    x, ctx, _, _ = call_inputs("sd15", batch=1)
    t = torch.tensor([400.0])
    with torch.inference_mode():
        full = trained_branch("sd15", model)(x, torch.zeros_like(x), torch.ones(1, 1, 16, 16), t, ctx)
        zero = BranchOutput([torch.zeros_like(r) for r in full.down], torch.zeros_like(full.mid),
                            [torch.zeros_like(r) for r in full.up])
        slots = [("down", i) for i in range(len(full.down))] + [("mid", 0)] + [("up", i) for i in range(len(full.up))]
        for path, i in slots:
            one = BranchOutput(list(zero.down), zero.mid, list(zero.up))
            if path == "mid":
                one.mid = torch.ones_like(full.mid)
            else:
                getattr(one, path)[i] = torch.ones_like(getattr(full, path)[i])
            with inject_residuals(unet, one, 1.0, {}) as options:
                got = unet(x, t, ctx, transformer_options=options)
            torch.testing.assert_close(got, reference_unet(unet, x, t, ctx, None, one, 1.0), rtol=1e-5, atol=1e-5,
                                       msg=f"{path} residual {i}")


# --------------------------------------------------------------------------------------------------------------------
# Through ComfyUI's sampling
# --------------------------------------------------------------------------------------------------------------------

def sample(model, name, steps=3, batch=1, seed=7, controlnet=None):
    fam = family_of(name)
    g = torch.Generator().manual_seed(0)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if fam == "sdxl" else {}
    positive = [[torch.randn(1, 77, CONTEXT_DIM[fam], generator=g), dict(extra)]]
    negative = [[torch.zeros(1, 77, CONTEXT_DIM[fam]), dict(extra)]]
    if controlnet is not None:
        import nodes

        positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet[0],
                                                                              controlnet[1], 1.0, 0.0, 1.0)
    if name.endswith("inpaint"):
        for c in (positive, negative):
            c[0][1]["concat_latent_image"] = torch.randn(1, 4, 16, 16, generator=g)
            c[0][1]["concat_mask"] = torch.zeros(1, 1, 128, 128)
    latent = torch.randn(batch, 4, 16, 16, generator=g)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent, seed=seed,
                               disable_pbar=True)


@pytest.mark.parametrize("name", ["sd15", "sd15_inpaint", "sdxl"])
def test_zero_initialised_branch_leaves_sampling_unchanged(models, name):
    model = models[name]
    base = sample(model, name)
    calls = []
    fresh = BrushBranch.from_unet(unet_state_dict_diffusers(model), BranchConfig.tiny(family_of(name)))
    out = sample(patched(model, fresh, observer=calls.append), name)
    assert calls and all(not r.any() for o in calls for r in o.down + o.up + [o.mid])
    assert torch.equal(out, base)


def test_trained_branch_changes_sampling_and_leaves_nothing_behind(models):
    model = models["sd15"]
    unet = model.model.diffusion_model
    before_options = repr(model.model_options)
    base = sample(model, "sd15")
    out = sample(patched(model, trained_branch("sd15", model)), "sd15")
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3
    assert no_hooks_left(unet)
    assert repr(model.model_options) == before_options
    assert torch.equal(sample(model, "sd15"), base)


def test_strength_zero_and_schedule_window(models):
    model = models["sd15"]
    branch = trained_branch("sd15", model)
    base = sample(model, "sd15", steps=4)
    assert torch.equal(sample(patched(model, branch, strength=0.0), "sd15", steps=4), base)
    never = ScheduleWindow(0.0, 0.0)   # only sigma 0, which is never sampled
    calls = []
    assert torch.equal(sample(patched(model, branch, window=never, observer=calls.append), "sd15", steps=4), base)
    assert not calls
    half = ScheduleWindow.from_percent(model, 0.0, 0.5)
    out = sample(patched(model, branch, window=half, observer=calls.append), "sd15", steps=4)
    assert 0 < len(calls) < 4 and not torch.equal(out, base)


def test_branch_rows_follow_cond_or_uncond(models):
    """Branch-own prompts (PowerPaint) go to the rows ComfyUI marks as cond / uncond, whatever their order."""
    model = models["sd15"]
    branch = trained_branch("sd15", model, cross_attention=True)
    g = torch.Generator().manual_seed(9)
    ctx = {COND: torch.randn(1, 77, 768, generator=g), UNCOND: torch.randn(1, 77, 768, generator=g)}
    calls = []
    clone = patched(model, branch, cond=conditioning(context=ctx), observer=calls.append)
    x, c, _, _ = call_inputs("sd15", batch=2)
    a = forward(clone, x, 3.0, c, cond_or_uncond=(0, 1))
    b = forward(clone, x.flip(0), 3.0, c.flip(0), cond_or_uncond=(1, 0))
    torch.testing.assert_close(a, b.flip(0), rtol=1e-4, atol=1e-5)
    only_cond = forward(clone, x[:1], 3.0, c[:1], cond_or_uncond=(0,))
    torch.testing.assert_close(only_cond, a[:1], rtol=1e-4, atol=1e-5)
    assert len(calls) == 3                                   # the branch ran in every call
    assert not torch.allclose(a, forward(model, x, 3.0, c, cond_or_uncond=(0, 1)), atol=1e-4)


def test_batch_of_images_each_gets_its_own_masked_image(models):
    model = models["sd15"]
    branch = trained_branch("sd15", model)
    two = conditioning(batch=2)
    x, c, _, _ = call_inputs("sd15", batch=4)   # 2 images x (cond, uncond)
    both = forward(patched(model, branch, cond=two), x, 3.0, c)
    for i in range(2):
        single = BranchConditioning(two.masked_latent[i:i + 1], two.keep_mask[i:i + 1])
        rows = [i, 2 + i]
        one = forward(patched(model, branch, cond=single), x[rows], 3.0, c[rows])
        torch.testing.assert_close(both[rows], one, rtol=1e-4, atol=1e-5)


def test_composes_with_painta(models):
    from faithful_inpaint.patching.painta import PAIntAHooks
    from faithful_inpaint.patching.prompt import RegionPrompt

    model = models["sd15_inpaint"]
    region = RegionPrompt("a red circle", torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0)),
                          [1, 2, 3, 4], 3)
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 32:96, 32:96] = 1
    branch = trained_branch("sd15_inpaint", model)
    painta_only = model.clone()
    PAIntAHooks(region, mask, (2, 4), ALWAYS).install(painta_only)
    both = patched(painta_only, branch)
    fresh = BrushBranch.from_unet(unet_state_dict_diffusers(model), BranchConfig.tiny("sd15"))
    painta_zero_branch = patched(painta_only, fresh)
    base_painta = sample(painta_only, "sd15_inpaint")
    assert torch.equal(sample(painta_zero_branch, "sd15_inpaint"), base_painta)
    out = sample(both, "sd15_inpaint")
    assert torch.isfinite(out).all() and (out - base_painta).abs().max() > 1e-3
    assert not torch.equal(out, sample(patched(model, branch), "sd15_inpaint"))


def tiny_controlnet():
    """A ControlNet of the tiny SD1.5 shape with random weights, wrapped as ComfyUI's loader wraps one."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops
    from faithful_inpaint.devtools import random_models

    cfg = random_models.unet_config("sd15")
    cfg.pop("out_channels")
    with torch.inference_mode():
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                         device="cpu", **cfg)
        random_models.randomise(net, 4)
    return comfy.controlnet.ControlNet(net, load_device=comfy.model_management.get_torch_device())


def test_composes_with_controlnet(models):
    model = models["sd15"]
    control = tiny_controlnet()
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(2))
    base_sample = sample

    def sample_cn(m):
        return base_sample(m, "sd15", controlnet=(control, hint))

    with_cn = sample_cn(model)
    assert not torch.equal(with_cn, sample(model, "sd15"))
    fresh = BrushBranch.from_unet(unet_state_dict_diffusers(model), BranchConfig.tiny("sd15"))
    assert torch.equal(sample_cn(patched(model, fresh)), with_cn)
    both = sample_cn(patched(model, trained_branch("sd15", model)))
    assert torch.isfinite(both).all() and (both - with_cn).abs().max() > 1e-3


def test_composes_with_rasg_gradient_guidance(models):
    """RASG differentiates the UNet w.r.t. x; the branch (inference-tensor weights, as a loader node makes them)
    contributes its residuals as constants to that pass."""
    import comfy.samplers
    from faithful_inpaint.patching import rasg

    model = models["sd15_inpaint"]
    with torch.inference_mode():
        branch = trained_branch("sd15_inpaint", model)
    guided = rasg.install(patched(model, branch), [1, 2, 3, 4])
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 77, 768, generator=g)
    pos, neg = [[ctx, {}]], [[torch.zeros_like(ctx), {}]]
    latent = torch.randn(1, 4, 16, 16, generator=g)
    noise_mask = torch.zeros(1, 1, 16, 16)
    noise_mask[..., 4:12, 4:12] = 1
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", 3)

    def run(m, eta):
        with torch.inference_mode():
            return comfy.sample.sample_custom(m, latent, 5.0, comfy.samplers.KSAMPLER(rasg.sample_rasg,
                                              extra_options={"eta": eta}), sigmas, pos, neg, latent,
                                              noise_mask=noise_mask, seed=1, disable_pbar=True)

    out = run(guided, 0.15)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, run(guided, 0.0))                     # the guidance acted
    assert not torch.allclose(out, run(rasg.install(model, [1, 2, 3, 4]), 0.15))   # and so did the branch
