"""InpaintConditionalUpscale (ProFI-Painter appendix E) against the real host: x0 blending at every step, the Poisson
blend's exact-outside guarantee, bad input, and an end-to-end node call.

Models: a tiny SD x4 upscaler UNet (comfy.supported_models.SD_X4Upscaler, random weights, built under inference
mode like a loader node builds it) and a full-shape x4 VAE (ComfyUI's VAE class, random weights).
"""
import logging
import math

import numpy as np
import pytest
import torch

from faithful_inpaint.kernels import sr_blend
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.devtools.random_models import randomise, build_model

_TINY_X4 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 7, "model_channels": 32, "num_res_blocks": [1, 1, 1, 1],
    "transformer_depth": [0, 0, 1, 1], "channel_mult": [1, 1, 2, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 1024, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [0, 0, 0, 0, 1, 1, 1, 1], "num_classes": 1000,
    "disable_self_attentions": [True, True, True, False],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def build_x4_model(seed=0):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.SD_X4Upscaler(dict(_TINY_X4))
    offload = comfy.model_management.unet_offload_device()
    with torch.inference_mode():
        model = config.get_model({})
        randomise(model, seed)
        model.to(offload)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                           offload_device=offload)


def _random_vae_sd(ddconfig, seed):
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        layout = {k: v.shape for k, v in AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if len(shape) > 1:
            sd[k] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif "norm" in k and k.endswith("weight"):
            sd[k] = torch.ones(shape)
        else:
            sd[k] = torch.zeros(shape)
    return sd


_X4_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
           "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def build_x4_vae(seed=0):
    """The real x4 VAE layout: ComfyUI's VAE class detects it from its keys (no encoder.down.2.downsample) and sets
    the 4x ratios itself. Full shapes, random values (slow on CPU: used once)."""
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.VAE(sd=_random_vae_sd(_X4_VAE, seed))


def build_small_x4_vae(seed=0):
    """Same architecture family with 32 base channels and one res block per level (fast unit tests). Built through
    VAE's explicit-config path, which leaves the SD default ratio of 8: set to the x4 VAE's 4 like detection does."""
    import comfy.sd

    ddconfig = dict(_X4_VAE, ch=32, num_res_blocks=1)
    with torch.inference_mode():
        vae = comfy.sd.VAE(sd=_random_vae_sd(ddconfig, seed), config={"params": {"ddconfig": ddconfig,
                                                                                   "embed_dim": 4}})
    vae.downscale_ratio = vae.upscale_ratio = 4
    return vae


@pytest.fixture(scope="module")
def x4():
    return build_x4_model()


@pytest.fixture(scope="module")
def vae():
    return build_small_x4_vae()


@pytest.fixture(scope="module")
def full_vae():
    return build_x4_vae()


@pytest.fixture(scope="module")
def node():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS["InpaintConditionalUpscale"]


def conds(batch=1):
    gen = torch.Generator().manual_seed(1)
    return ([[torch.randn(batch, 77, 1024, generator=gen), {}]],
            [[torch.randn(batch, 77, 1024, generator=gen), {}]])


def scene(h=96, w=64, batch=1):
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(batch, h, w, 3, generator=gen)
    mask = torch.zeros(batch, h, w)
    mask[:, h // 3:h // 3 + 16, w // 3:w // 3 + 12] = 1
    low = torch.rand(batch, h // 4, w // 4, 3, generator=gen)
    return image, mask, low


def upscale(x4, vae, image, mask, low, **kw):
    from faithful_inpaint.patching.upscale import conditional_upscale

    pos, neg = conds()
    args = dict(seed=3, steps=3, cfg=7.5, noise_level=20, mask_dilation=4, mask_blur=3, poisson_dilation=8,
                poisson_padding=8, vae_tiling="never", tile_size=512)
    args.update(kw)
    with torch.inference_mode():
        return conditional_upscale(x4, vae, pos, neg, image, mask, low, **args)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

def test_blend_x0_is_exact_where_the_mask_is_zero_or_one():
    x0, z = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:5, 2:5] = 1
    m[..., 5, 2:5] = 0.3
    out = sr_blend.blend_x0(x0, z, m)
    keep = (m == 0).expand_as(out)
    assert torch.equal(out[keep], z.expand_as(out)[keep])
    assert torch.equal(out[(m == 1).expand_as(out)], x0[(m == 1).expand_as(out)])
    assert torch.allclose(out[..., 5, 2:5], 0.3 * x0[..., 5, 2:5] + 0.7 * z[..., 5, 2:5])


def test_ddim_step_is_the_reference_update():
    # Discrete VP: x_t = sqrt(a) x0 + sqrt(1 - a) eps  <=>  x_t / sqrt(a) = x0 + sigma eps, sigma^2 = (1 - a) / a.
    a, a_prev = 0.3, 0.6
    x0, x0b, eps = torch.randn(3, 1, 4, 4).unbind(0)
    sigma, sigma_prev = math.sqrt((1 - a) / a), math.sqrt((1 - a_prev) / a_prev)
    x = x0 + sigma * eps                                           # the sampler's (scaled) x_t
    nxt = sr_blend.ddim_step(x, x0, x0b, sigma, sigma_prev)
    reference = math.sqrt(a_prev) * x0b + math.sqrt(1 - a_prev) * eps       # z_{t-1} of the official code
    assert torch.allclose(nxt * math.sqrt(a_prev), reference, atol=1e-5)
    assert torch.equal(sr_blend.ddim_step(x, x0, x0b, sigma, 0.0), x0b)


def test_reference_timesteps_and_mask():
    assert sr_blend.ddim_timesteps(20) == list(range(999, 0, -50))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 30:34, 30:34] = 1
    m = sr_blend.x0_blend_mask(mask, (16, 16), dilation=4, blur_kernel=5)
    assert m.shape == (1, 1, 16, 16) and 0 <= m.min() and m.max() <= 1
    # dilated square covers px 26..37 -> latent 6..9; the k=5 blur reaches 2 further, then exactly 0
    assert m[..., 7:9, 7:9].min() > 0.5
    assert (m[..., :4, :] == 0).all() and (m[..., 12:, :] == 0).all()


def _stripes(h, w, seed):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def test_poisson_wrapper_matches_opencv_and_leaves_the_outside_untouched():
    import cv2

    h, w, pad, dil = 60, 70, 8, 6
    original = _stripes(h, w, 0)
    generated = np.full((h, w, 3), 200, np.uint8)
    generated[28:32, 33:37] = (30, 160, 90)
    mask = np.zeros((h, w), np.float32)
    mask[22:38, 27:43] = 1
    out, region = sr_blend.poisson_blend(original, generated, mask, padding=pad, dilation=dil)

    # The same construction written directly against OpenCV.
    cfg = ((pad, pad), (pad, pad), (0, 0))
    fake_p, orig_p = np.pad(generated, cfg, mode="reflect"), np.pad(original, cfg, mode="reflect")
    orig_p[:pad], orig_p[-pad:], orig_p[:, :pad], orig_p[:, -pad:] = (fake_p[:pad], fake_p[-pad:],
                                                                      fake_p[:, :pad], fake_p[:, -pad:])
    dmask = cv2.dilate(np.pad(mask.astype(np.uint8), pad), np.ones((dil, dil), np.uint8)) * 255
    x, y, rw, rh = cv2.boundingRect(dmask)
    dmask_in = dmask.copy()                              # OpenCV 5 overwrites the mask it is given
    expected = cv2.seamlessClone(fake_p, orig_p, dmask_in, (x + rw // 2, y + rh // 2), cv2.NORMAL_CLONE)[pad:-pad,
                                                                                                       pad:-pad]
    assert np.array_equal(region, dmask[pad:-pad, pad:-pad] > 0)
    assert np.array_equal(out[region], expected[region])
    assert np.array_equal(out[~region], original[~region])
    # Inside, the result takes the source's gradients: the small square's contrast against its surroundings
    # reappears (the original has no such square), while the original's stripes fade out.
    def contrast(img):
        img = img.astype(float)
        return img[28:32, 33:37].mean((0, 1)) - img[23:25, 28:30].mean((0, 1))

    want, got, before = contrast(generated), contrast(out), contrast(original)
    assert (np.sign(got) == np.sign(want)).all() and (np.abs(got) > 0.4 * np.abs(want)).all()
    assert np.abs(got - want).sum() < np.abs(before - want).sum()


def test_poisson_blend_near_the_border_and_exact_float_composite():
    original = _stripes(40, 40, 1)
    generated = _stripes(40, 40, 2)[:, ::-1].copy()
    mask = np.zeros((40, 40))
    mask[:10, 30:] = 1                                  # touches two image edges
    out, region = sr_blend.poisson_blend(original, generated, mask, padding=4, dilation=12)
    assert region[:10, 30:].all() and np.array_equal(out[~region], original[~region])
    orig_f = torch.rand(40, 40, 3)
    comp = sr_blend.composite_exact(orig_f, torch.from_numpy(out).float() / 255, torch.from_numpy(region))
    assert torch.equal(comp[~torch.from_numpy(region)], orig_f[~torch.from_numpy(region)])


# ----------------------------------------------------------------------------------------------------------------
# Sampling with the real host
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sampled(x4, vae):
    """One 3-step run shared by the next tests, with every x0 blend captured from the hook."""
    image, mask, low = scene()
    steps = []
    res = upscale(x4, vae, image, mask, low, steps=3, on_step=steps.append)
    return image, mask, res, steps


def test_every_step_blends_x0_to_the_encoded_original_outside_the_mask(x4, vae, sampled):
    image, _, res, steps = sampled
    assert len(steps) == 3
    with torch.inference_mode():
        z_expected = x4.model.process_latent_in(vae.encode(image))     # 96 x 64: a multiple of 32, no padding
    sigmas = [float(info["sigma"].flatten()[0]) for info in steps]
    ms = x4.get_model_object("model_sampling")
    assert sigmas == pytest.approx([float(ms.sigmas[t]) for t in (999, 666, 333)], rel=1e-5)
    for info in steps:
        m, blended, z = info["m"], info["blended"], info["z_hr"]
        assert blended.shape == (1, 4, 24, 16)
        outside = (m == 0).expand_as(blended)
        assert outside.float().mean() > 0.3 and (m > 0.99).any()
        assert torch.equal(blended[outside], z.expand_as(blended)[outside])
        assert torch.allclose(z, z_expected.to(z), atol=1e-5)        # the x4 latent, scaled by 0.08333
        inside = (m == 1).expand_as(blended)
        assert torch.equal(blended[inside], info["raw"][inside])
    assert res.image.shape == image.shape and res.preview.shape == image.shape


def test_final_blend_is_bit_identical_outside_the_region(sampled):
    image, mask, res, _ = sampled
    region = res.region[0]
    assert region.any() and not region.all()
    assert torch.equal(res.image[0][~region], image[0][~region])
    assert mask[0].bool()[region].any() and region[mask[0].bool()].all()
    assert not torch.equal(res.image[0][region], image[0][region])


def test_sizes_are_padded_and_resized(x4, vae):
    # 90 x 75 px: padded to 96 x 96 for the model (4 UNet levels x the 4x VAE: multiples of 32) and cropped back;
    # a low_res and a mask of other sizes are resized.
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(1, 90, 75, 3, generator=gen)
    mask = torch.zeros(1, 45, 38)
    mask[:, 10:25, 10:20] = 1
    low = torch.rand(1, 50, 50, 3, generator=gen)
    res = upscale(x4, vae, image, mask, low, steps=1)
    assert res.image.shape == image.shape and res.generated.shape == image.shape
    assert torch.equal(res.image[0][~res.region[0]], image[0][~res.region[0]])


def test_batch_broadcast_one_original_many_candidates(x4, vae):
    image, mask, _ = scene(64, 64)
    low = torch.rand(2, 16, 16, 3)
    res = upscale(x4, vae, image, mask, low, steps=1)
    assert res.image.shape == (2, 64, 64, 3)
    for b in range(2):
        assert torch.equal(res.image[b][~res.region[b]], image[0][~res.region[b]])


def test_tiled_vae_path(x4, vae):
    image, mask, low = scene(64, 64)
    res = upscale(x4, vae, image, mask, low, steps=1, vae_tiling="always", tile_size=128)
    assert res.image.shape == image.shape
    assert torch.equal(res.image[0][~res.region[0]], image[0][~res.region[0]])


# ----------------------------------------------------------------------------------------------------------------
# Bad input and the node
# ----------------------------------------------------------------------------------------------------------------

def test_empty_mask_warns_and_returns_the_original(x4, vae, caplog):
    image, mask, low = scene(64, 64)
    with caplog.at_level(logging.WARNING):
        res = upscale(x4, vae, image, torch.zeros_like(mask), low)
    assert "mask is empty" in caplog.text
    assert torch.equal(res.image, image)


@pytest.mark.parametrize("case", ["batch", "not x4", "wrong vae", "noise level", "mask shape"])
def test_bad_input_names_the_input(x4, vae, case):
    image, mask, low = scene(64, 64)
    model, v, inputs, kw = x4, vae, dict(image=image, mask=mask, low_res=low), {}
    expected = {"batch": "mask", "not x4": "model", "wrong vae": "vae", "noise level": "noise_level",
                "mask shape": "mask"}[case]
    if case == "batch":
        inputs = dict(image=image, mask=mask.repeat(2, 1, 1), low_res=low.repeat(3, 1, 1, 1))
    elif case == "not x4":
        model = build_model("sd2", "tiny")
    elif case == "wrong vae":
        class EightX:
            downscale_ratio, latent_channels = 8, 4
        v = EightX()
    elif case == "noise level":
        kw["noise_level"] = 351
    else:
        inputs["mask"] = torch.zeros(1, 2, 3, 64, 64)
    with pytest.raises(NodeInputError) as err:
        upscale(model, v, inputs["image"], inputs["mask"], inputs["low_res"], **kw)
    assert err.value.input_name == expected and "InpaintConditionalUpscale" in str(err.value)
    if case == "not x4":
        assert "BaseModel" in str(err.value) and "x4 upscaler" in str(err.value)


def test_node_end_to_end(node, x4, full_vae):
    info = node.INPUT_TYPES()
    assert list(info["required"])[:7] == ["model", "vae", "positive", "negative", "image", "mask", "low_res"]
    assert node.CATEGORY == "inpaint/faithful/ProFI-Painter"
    assert tuple(node.RETURN_TYPES) == ("IMAGE", "IMAGE")
    defaults = {k: v[1].get("default") for k, v in info["required"].items() if len(v) > 1}
    assert defaults["steps"] == 20 and defaults["cfg"] == 7.5 and defaults["noise_level"] == 20
    assert defaults["mask_dilation"] == 19 and defaults["mask_blur"] == 19
    assert defaults["poisson_dilation"] == 48 and defaults["poisson_padding"] == 32

    image, mask, low = scene()
    pos, neg = conds()
    with torch.inference_mode():
        out = node.execute(model=x4, vae=full_vae, positive=pos, negative=neg, image=image, mask=mask, low_res=low,
                           seed=0, steps=2, cfg=7.5, noise_level=20, mask_dilation=19, mask_blur=19,
                           poisson_dilation=48, poisson_padding=32, vae_tiling="auto", tile_size=512).result
    result, preview = out
    assert result.shape == image.shape and preview.shape == image.shape
    assert torch.isfinite(result).all() and 0 <= result.min() and result.max() <= 1
    region = preview[0, ..., 2] > 0.5
    assert region.any() and not region.all()
    assert torch.equal(result[0][~region], image[0][~region])
    assert "concat_image" not in pos[0][1]                    # the inputs' conditioning is not mutated
    assert not x4.model_options.get("sampler_post_cfg_function")   # the hook went on a clone


def test_progress_bar_and_interrupts(x4, vae):
    import comfy.model_management
    import comfy.utils

    image, mask, low = scene(64, 64)
    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        upscale(x4, vae, image, mask, low, steps=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert (1, 2) in calls and (2, 2) in calls

    seen = []

    def interrupt_after_first(info):
        seen.append(info)
        comfy.model_management.interrupt_current_processing(True)

    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            upscale(x4, vae, image, mask, low, steps=3, on_step=interrupt_after_first)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert len(seen) == 1


def test_ddim_uses_the_models_own_eps(x4, vae, monkeypatch):
    """The sampler steps from the blended x0 with the eps of the UN-blended prediction (the reference's update)."""
    image, mask, low = scene(64, 64)
    captured, used = [], []
    real_step = sr_blend.ddim_step

    def spy(x, x0_raw, x0_used, sigma, sigma_next):
        used.append((x0_raw, x0_used))
        return real_step(x, x0_raw, x0_used, sigma, sigma_next)

    monkeypatch.setattr(sr_blend, "ddim_step", spy)
    upscale(x4, vae, image, mask, low, steps=2, on_step=captured.append)
    assert len(used) == 2
    for (x0_raw, x0_used), info in zip(used, captured):
        assert x0_raw is info["raw"] and torch.equal(x0_used, info["blended"])
        assert not torch.equal(x0_raw, x0_used)


def test_real_loader_path_with_the_smoke_checkpoint(node):
    """Load Checkpoint's code path on the full-shape random x4 checkpoint (generated once, cached in .smoke/)."""
    import comfy.sd
    import nodes

    from faithful_inpaint.devtools import smoke_checkpoints

    models = smoke_checkpoints.default_models_dir()
    name = smoke_checkpoints.ensure_smoke_models(models, ["sd_x4_upscaler"])["sd_x4_upscaler"]
    path = models / "checkpoints" / name
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
        pos = nodes.CLIPTextEncode().encode(clip, "a cat, high resolution professional photo")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        image, mask, low = scene(64, 64)
        result, preview = node.execute(model=model, vae=vae, positive=pos, negative=neg, image=image, mask=mask,
                                       low_res=low, seed=0, steps=1, cfg=7.5, noise_level=20, mask_dilation=19,
                                       mask_blur=19, poisson_dilation=48, poisson_padding=32, vae_tiling="auto",
                                       tile_size=512).result
    region = preview[0, ..., 2] > 0.5
    assert torch.isfinite(result).all() and torch.equal(result[0][~region], image[0][~region])
