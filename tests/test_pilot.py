"""PILOT: the losses and schedules by hand, the latent optimisation and blend stage through ComfyUI's own sampling
(tiny random SD1.5 UNet built under inference mode, like a loader node's), boundary control, nodes and errors."""
import pytest
import torch

import comfy.sample
import comfy.samplers
from faithful_inpaint.kernels import pilot as pm
from faithful_inpaint.patching import pilot
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.devtools.random_models import build_model

WORDS = [1, 2, 3]


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd15")          # plain 4-channel, weights are inference tensors


def conds(seed=0, family="sd15"):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 77, 2048 if family == "sdxl" else 768, generator=g)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    return [[ctx, dict(extra)]], [[torch.zeros_like(ctx), dict(extra)]]


def square(side=16, batch=1):
    m = torch.zeros(batch, 1, side, side)
    m[..., side // 4:3 * side // 4, side // 4:3 * side // 4] = 1
    return m


LATENT = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))


def run(model, steps=4, mask=True, seed=1, family="sd15", **options):
    pos, neg = conds(family=family)
    noise = torch.randn(LATENT.shape, generator=torch.Generator().manual_seed(1))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)
    sampler = comfy.samplers.KSAMPLER(pilot.sample_pilot, extra_options=options)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, 5.0, sampler, sigmas, pos, neg, LATENT,
                                          noise_mask=square() if mask else None, seed=seed, disable_pbar=True)


# ---------------------------------------------------------------------------------------------------- kernels

def test_background_loss_by_hand():
    z_img = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    x0 = torch.tensor([[[[0.0, 0.0], [3.0, 1.0]]]])
    fg = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])                # 1 = regenerate: pixel (0, 1) not counted
    # the reference maps both latents by v -> (v + 1) / 2 first: ((1+1)/2 - (0+1)/2)^2 = 0.25, 0, (4-1)^2 / 4
    assert pm.background_loss(z_img, x0, fg).tolist() == [0.25 + 0.0 + 2.25]
    # the reference's binary mask: fg > 0.5 is regenerated, 0.5 is kept
    assert pm.binarised(torch.tensor([0.2, 0.5, 0.51, 1.0])).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_centralisation_loss_by_hand():
    # 4 query pixels, L = 4 columns (SOT, two words, EOT); pixel 0 is foreground
    probs = torch.tensor([[[0.1, 0.6, 0.2, 0.1],
                           [0.5, 0.1, 0.1, 0.3],
                           [0.7, 0.2, 0.0, 0.1],
                           [0.4, 0.3, 0.3, 0.0]]])
    fg = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    r = (0.2 + 0.2 + 0.6) / 3                                       # word mass (columns 1, 2) over background
    i = 0.8
    torch.testing.assert_close(pm.centralisation_loss(probs, fg, [1, 2]), torch.tensor([r - i]))
    # heads are averaged; the layer mean is the mean of the per-layer losses
    heads = torch.stack([probs, probs.flip(-1)], 1)
    expected = (pm.centralisation_loss(probs, fg, [1, 2]) + pm.centralisation_loss(probs.flip(-1), fg, [1, 2])) / 2
    torch.testing.assert_close(pm.centralisation_loss(heads, fg, [1, 2]), expected)
    torch.testing.assert_close(pm.mean_centralisation_loss([(probs, fg), (heads, fg)], [1, 2]),
                               (pm.centralisation_loss(probs, fg, [1, 2]) + expected) / 2)
    # a layer whose inside map is empty or full adds 0, and still counts in the mean
    empty, full = torch.zeros(1, 4), torch.ones(1, 4)
    assert pm.centralisation_loss(probs, empty, [1, 2]).tolist() == [0.0]
    assert pm.centralisation_loss(probs, full, [1, 2]).tolist() == [0.0]
    torch.testing.assert_close(pm.mean_centralisation_loss([(probs, fg), (probs, empty)], [1, 2]),
                               torch.tensor([(r - i) / 2]))


def test_centralisation_lower_when_attention_sits_inside_the_mask():
    fg = square(8).flatten(1)
    inside = torch.full((1, 64, 4), 0.25)
    inside[0, fg[0].bool(), 1] = 0.7
    inside[0, fg[0].bool(), 0] = 0.1                              # rows still sum to 1
    outside = torch.full((1, 64, 4), 0.25)
    outside[0, ~fg[0].bool(), 1] = 0.7
    outside[0, ~fg[0].bool(), 0] = 0.1
    assert pm.centralisation_loss(inside, fg, [1]) < 0 < pm.centralisation_loss(outside, fg, [1])


def test_lambda_schedule_and_learning_rate():
    fg = torch.ones(2, 1, 60, 60)
    fg[0].view(-1)[:1499] = 0                                       # 1499 background pixels in sample 0
    fg[1].view(-1)[:2998] = 0
    torch.testing.assert_close(pm.lambda_t(999, fg), torch.tensor([150.0, 300.0]))
    torch.testing.assert_close(pm.lambda_t(100, fg), torch.tensor([15.0, 30.0]))
    assert pm.schedule(299) == pytest.approx(0.1) and pm.schedule(300) == pytest.approx(0.1)
    assert pm.schedule(649.5) == pytest.approx(0.55) and pm.schedule(999) == pytest.approx(1.0)
    assert pm.learning_rate(999, 0.025) == pytest.approx(0.025 * 1.002)
    assert pm.learning_rate(0, 0.025) == pytest.approx(0.025 * 1.002 ** 1000)
    # the first sampling step uses lr_warmup as it is, at any t (the reference sets its table entry to it)
    assert pm.step_learning_rate(991, 0.025, 0.007, first=True) == 0.007
    assert pm.step_learning_rate(600, 0.025, 0.007, first=True) == 0.007
    assert pm.step_learning_rate(600, 0.025, 0.007, first=False) == pytest.approx(0.025 * 1.002 ** 400)
    torch.testing.assert_close(pm.total_loss(torch.tensor([1.0]), torch.tensor([-0.5]), torch.tensor([4.0])),
                               torch.tensor([-1.0]))


def test_momentum_step():
    z, v = pm.momentum_step(torch.tensor([1.0]), torch.tensor([2.0]), None, 0.1)
    assert z.item() == pytest.approx(0.8) and v.item() == pytest.approx(2.0)
    z, v = pm.momentum_step(z, torch.tensor([1.0]), v, 0.1, momentum=0.7)
    assert v.item() == pytest.approx(2.4) and z.item() == pytest.approx(0.56)


def test_boundary_control_by_hand():
    probs = torch.full((1, 2, 3, 78), 1.0 / 78)                     # [B, heads, N, L]: 2 windows' worth of columns
    full = torch.tensor([[1.0, 0.0, 0.0]])
    out = pm.boundary_control(probs, full, sot_columns=(0, 77))
    assert torch.equal(out[:, :, 0], probs[:, :, 0])               # fully foreground pixel: untouched
    assert torch.equal(out[:, :, 1:, 0], probs[:, :, 1:, 0]) and torch.equal(out[:, :, 1:, 77], probs[:, :, 1:, 77])
    assert out[:, :, 1:, 1:77].abs().max() == 0                     # background: text columns zeroed, no renormalising
    # inside maps at 1/2: the reference rule (bilinear, = 1) and the area rule agree there (a 2 x 2 average)
    fg = torch.zeros(1, 1, 4, 4)
    fg[..., :2, :] = 1
    fg[..., 2, 0] = 1
    for rule in pm.INSIDE_MAP_RULES:
        assert pm.inside_map(fg, 2, 2, rule).tolist() == [[1.0, 1.0, 0.0, 0.0]]
    # at 1/4 the reference rule samples the block's centre 2 x 2 only; the area rule wants the whole block
    fg = torch.zeros(1, 1, 8, 8)
    fg[..., 1:3, 1:3] = 1                                           # the centre of block (0, 0), not its rim
    fg[..., 4:8, 4:8] = 1                                           # all of block (1, 1)
    assert pm.inside_map(fg, 2, 2, "reference").tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert pm.inside_map(fg, 2, 2, "area").tolist() == [[0.0, 0.0, 0.0, 1.0]]
    # boundary control's map: a sample with nothing to inpaint is not controlled (the reference passes no mask)
    assert pm.control_map(torch.zeros(1, 1, 8, 8), 2, 2).tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_blend_kernel():
    z, z_img, noise = torch.full((1, 1, 2, 1), 5.0), torch.ones(1, 1, 2, 1), torch.full((1, 1, 2, 1), 2.0)
    fg = torch.tensor([[[[1.0], [0.0]]]])
    assert pm.blend(z, z_img, fg, 0.5, noise).flatten().tolist() == [5.0, 2.0]


# ------------------------------------------------------------------------------------------------ sampling

def test_inner_optimisation_lowers_the_total_loss(sd15):
    prepared = pilot.install(sd15, WORDS)
    guide = prepared.model_options[pilot.GUIDE_KEY]
    run(prepared, steps=2, every=10, inner_steps=6, lr_warmup=0.025)
    first = [loss.item() for step, _, loss in guide.last_losses if step == 0]
    assert len(first) == 6 and len(guide.last_losses) == 6       # step 0 only (every 10)
    assert first[-1] < first[0]
    assert pilot.GUIDE_KEY not in sd15.model_options


@pytest.mark.parametrize("family,inpaint", [("sdxl", False), ("sd15", True)])
def test_sdxl_and_nine_channel_models(family, inpaint):
    model = build_model(family, inpaint=inpaint)
    prepared = pilot.install(model, WORDS, boundary_control=True)
    guide = prepared.model_options[pilot.GUIDE_KEY]
    plain = run(prepared, steps=2, family=family, inner_steps=0)
    out = run(prepared, steps=2, family=family, inner_steps=2, lr_warmup=0.025)
    assert torch.isfinite(out).all() and len(guide.last_losses) == 2
    assert all(torch.isfinite(loss).all() for _, _, loss in guide.last_losses)
    assert not torch.allclose(out, plain)                             # the optimisation moved the latent


def test_background_stays_close_to_the_encoded_image(sd15):
    prepared = pilot.install(sd15, WORDS)
    out = run(prepared, steps=6, every=2, inner_steps=2, gamma=0.5)
    keep = ~square().bool().expand_as(out)
    # The blend stage ends with a model call on z_img + sigma_last * noise (sigma_last = 0.041 for 6 ddim_uniform
    # steps), so the background of the result is z_img + sigma_last * (noise - eps_hat): with a random UNet eps_hat
    # is large (its masked region ends around 60 away from the image), hence the stated tolerance
    # mean |error| < 0.25, max |error| < 1.0 on a latent of std 1.
    err = (out - LATENT)[keep].abs()
    assert err.mean() < 0.25 and err.max() < 1.0, (err.mean(), err.max())
    inside = (out - LATENT)[~keep].abs().mean()
    assert inside > 20 * err.mean()                                # the masked region was regenerated


def test_gamma_zero_is_the_pure_blend_stage(sd15):
    from comfy.k_diffusion.sampling import default_noise_sampler

    prepared = pilot.install(sd15, WORDS)
    ours = run(prepared, steps=4, gamma=0.0)

    def blend_only(model, x, sigmas, extra_args=None, callback=None, disable=None):
        mask = extra_args["denoise_mask"][:, :1]
        args = dict(extra_args, denoise_mask=None)
        ns = default_noise_sampler(x, seed=extra_args.get("seed"))
        for i in range(len(sigmas) - 1):
            x = x * mask + (model.latent_image + sigmas[i] * ns(sigmas[i], sigmas[i + 1])) * (1 - mask)
            d = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **args)
            x = d + (sigmas[i + 1] / sigmas[i]) * (x - d)
        return x

    pos, neg = conds()
    noise = torch.randn(LATENT.shape, generator=torch.Generator().manual_seed(1))
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "ddim_uniform", 4)
    with torch.inference_mode():
        direct = comfy.sample.sample_custom(sd15, noise, 5.0, comfy.samplers.KSAMPLER(blend_only), sigmas, pos, neg,
                                            LATENT, noise_mask=square(), seed=1, disable_pbar=True)
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=1e-5)
    # and no optimisation ran: same as asking for none
    torch.testing.assert_close(ours, run(prepared, steps=4, gamma=0.0, inner_steps=0), atol=0, rtol=0)


def test_boundary_control_removes_text_attention_from_the_background(sd15):
    prepared = pilot.install(sd15, WORDS, boundary_control=True)
    guide = prepared.model_options[pilot.GUIDE_KEY]
    guide.probe = []
    try:
        out = run(prepared, steps=2, inner_steps=1)
    finally:
        probes, guide.probe = guide.probe, None
    assert torch.isfinite(out).all() and probes
    fg = square()
    sizes = set()
    for p in probes:                                               # [rows, heads, N, 77]
        side = int(p.shape[-2] ** 0.5)
        sizes.add((side, p.shape[0]))
        full = pm.inside_map(fg, side, side)[0].bool()
        assert p[:, :, ~full, 1:].abs().max() == 0
        assert (p[:, :, ~full, 0] > 0).all()                       # SOT kept everywhere
        assert (p[:, :, full, 1:].sum(-1) > 0).all()
    assert {16, 8, 4} <= {s for s, _ in sizes}                     # every layer, the highest resolution included
    assert 2 in {rows for _, rows in sizes}                        # both CFG halves in the batched calls
    plain = pilot.install(sd15, WORDS)
    assert not torch.allclose(run(prepared, steps=2, gamma=0.0), run(plain, steps=2, gamma=0.0))
    # outside a PILOT run (another sampler) the patch passes through: same as the model without it
    pos, neg = conds()
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "ddim_uniform", 2)
    euler = comfy.samplers.ksampler("euler")
    with torch.inference_mode():
        a, b = (comfy.sample.sample_custom(m, torch.zeros_like(LATENT), 5.0, euler, sigmas, pos, neg, LATENT,
                                           noise_mask=square(), seed=1, disable_pbar=True) for m in (prepared, sd15))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_errors_name_the_node_and_input(sd15):
    with pytest.raises(NodeInputError, match="PILOTSampler, input 'model'.*PILOTGuidance"):
        run(sd15)
    with pytest.raises(NodeInputError, match="PILOTSampler, input 'latent'.*noise mask"):
        run(pilot.install(sd15, WORDS), mask=False)


def test_nodes(sd15):
    import nodes
    from faithful_inpaint.devtools.random_models import build_clip

    guidance = nodes.NODE_CLASS_MAPPINGS["PILOTGuidance"]
    sampler_node = nodes.NODE_CLASS_MAPPINGS["PILOTSampler"]
    clip = build_clip("sd15")
    with torch.inference_mode():
        (prepared,) = guidance.execute(model=sd15, clip=clip, prompt="a red vase",
                                       semantic_boundary_control=True).result
        (fast,) = sampler_node.execute(preset="fast", optimise_every=10, inner_steps=10, lr=0.025, lr_warmup=0.007,
                                       coef=150.0, gamma=1.0, momentum=0.7).result
    guide = prepared.model_options[pilot.GUIDE_KEY]
    assert guide.word_indices == [1, 2, 3] and guide.boundary_control
    assert fast.extra_options["every"] == 20 and fast.extra_options["inner_steps"] == 5
    pos, neg = conds()
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "ddim_uniform", 2)
    with torch.inference_mode():
        out = comfy.sample.sample_custom(prepared, torch.randn(1, 4, 16, 16), 5.0, fast, sigmas, pos, neg, LATENT,
                                         noise_mask=square(), seed=1, disable_pbar=True)
    assert torch.isfinite(out).all()
