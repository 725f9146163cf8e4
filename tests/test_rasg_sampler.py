"""RASG through ComfyUI's own sampling: eta 0 is DDIM, the guidance term, gradients, composition, errors."""
import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
from faithful_inpaint.patching import rasg
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.painta import PAIntAHooks
from faithful_inpaint.patching.prompt import RegionPrompt
from faithful_inpaint.patching.schedule import ScheduleWindow
from faithful_inpaint.devtools.random_models import build_model

DIM = {"sd15": 768, "sd2": 1024, "sdxl": 2048}
TOKENS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd15", inpaint=True)


def conds(family="sd15", seed=0):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    ctx = torch.randn(1, 77, DIM[family], generator=g)
    return [[ctx, dict(extra)]], [[torch.zeros_like(ctx), dict(extra)]]


def square(side=16, batch=1):
    m = torch.zeros(batch, 1, side, side)
    m[..., side // 4:3 * side // 4, side // 4:3 * side // 4] = 1
    return m


def run(model, sampler, steps=4, mask=True, batch=1, family="sd15", scheduler="ddim_uniform"):
    pos, neg = conds(family)
    latent = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, 5.0, sampler, sigmas, pos, neg, latent,
                                          noise_mask=square(batch=batch) if mask else None, seed=1, disable_pbar=True)


def rasg_sampler(**kw):
    return comfy.samplers.KSAMPLER(rasg.sample_rasg, extra_options=kw)


def test_eta_zero_is_comfy_ddim(sd15):
    prepared = rasg.install(sd15, TOKENS)
    ours = run(prepared, rasg_sampler(eta=0.0))
    torch.testing.assert_close(ours, run(sd15, comfy.samplers.ksampler("euler")), atol=1e-4, rtol=1e-4)
    # ComfyUI's "ddim" is Euler with its own re-noising of the known region: identical without a noise mask.
    prepared_nomask = rasg.install(sd15, TOKENS, mask=square())
    torch.testing.assert_close(run(prepared_nomask, rasg_sampler(eta=0.0), mask=False),
                               run(sd15, comfy.samplers.sampler_object("ddim"), mask=False), atol=1e-4, rtol=1e-4)


def test_guidance_changes_only_the_masked_region(sd15):
    prepared = rasg.install(sd15, TOKENS)
    plain = run(prepared, rasg_sampler(eta=0.0))
    guided = run(prepared, rasg_sampler(eta=0.15))
    inside = square().expand_as(guided).bool()
    assert (guided - plain)[inside].abs().max() > 1e-3
    torch.testing.assert_close(guided[~inside], plain[~inside], atol=1e-5, rtol=0)


class OneCall:
    """A single sampling-time model call of a prepared model, as sample_rasg makes it."""

    def __init__(self, model, batch=1, noise_mask=True):
        self.model = model
        self.noise_mask = square(batch=batch) if noise_mask is True else noise_mask
        pos, neg = conds()
        self.sampler = comfy.samplers.KSampler(model, steps=4, device=model.load_device, sampler="euler",
                                               scheduler="ddim_uniform")
        self.batch = batch
        self.pos, self.neg = pos, neg

    def guided(self, x, sigma):
        """(loss before, z, loss after a small step along z) with the real CFG guider and inpaint wrapper."""
        captured = {}

        def fn(model_k, x_, sigmas, extra_args=None, callback=None, disable=None):
            guide = rasg._guide(extra_args)
            mask = rasg._latent_mask(guide, extra_args, x_)
            s_in = x_.new_ones([x_.shape[0]])
            region = rasg._gradient_region(extra_args, x_)
            _, z = rasg._guided_call(model_k, guide, x, sigmas[0], s_in, extra_args, mask, region)
            captured["z"], captured["region"] = z, region
            for name, xx in (("before", x), ("after", x + 0.05 * z)):
                guide.recorder.clear()
                guide.recorder.enabled = True
                model_k(xx, sigmas[0] * s_in, **extra_args)
                guide.recorder.enabled = False
                captured[name] = guide.loss(mask).sum().item()
            return x_

        sigmas = torch.tensor([sigma, 0.0])
        latent = torch.zeros(self.batch, 4, 16, 16)
        with torch.inference_mode():
            comfy.sample.sample_custom(self.model, torch.zeros_like(latent), 5.0, comfy.samplers.KSAMPLER(fn),
                                       sigmas, self.pos, self.neg, latent, noise_mask=self.noise_mask,
                                       seed=0, disable_pbar=True)
        return captured


def test_injected_term_has_unit_std_and_lowers_the_objective(sd15):
    prepared = rasg.install(sd15, TOKENS)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 3.0
    got = OneCall(prepared, batch=2).guided(x, 3.0)
    z = got["z"]
    inside = square(batch=2).expand_as(z).bool()
    for b in range(2):
        torch.testing.assert_close(z[b][inside[b]].std(), torch.tensor(1.0), atol=1e-4, rtol=1e-4)
        assert z[b][~inside[b]].abs().max() == 0
    assert got["after"] < got["before"]


def set_latent_noise_mask(mask):
    """The latent's noise mask as ComfyUI's SetLatentNoiseMask node writes it."""
    import nodes

    (latent,) = nodes.NODE_CLASS_MAPPINGS["SetLatentNoiseMask"]().set_mask({"samples": torch.zeros(1, 4, 16, 16)},
                                                                           mask)
    return latent["noise_mask"]


@pytest.mark.parametrize("route", ["noise mask", "guidance mask + noise mask", "guidance mask, no noise mask"])
def test_noise_term_has_unit_std_where_the_gradient_lives(sd15, route):
    """Under a latent noise mask (SetLatentNoiseMask / InpaintModelConditioning) the gradient is 0 outside the mask,
    so the std is taken inside it: the noise injected there has unit std, whichever node gives RASG its mask.
    Without a noise mask the gradient lives everywhere and the whole latent has unit std (eq. 8)."""
    pixels = torch.zeros(1, 128, 128)
    pixels[:, 20:100, 36:92] = 1                                    # not aligned to the 8 px latent grid: soft edge
    noise_mask = None if route.endswith("no noise mask") else set_latent_noise_mask(pixels)
    prepared = rasg.install(sd15, TOKENS, mask=None if route == "noise mask" else pixels)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 3.0
    got = OneCall(prepared, noise_mask=noise_mask).guided(x, 3.0)
    z = got["z"][0]
    if noise_mask is None:
        assert got["region"] is None
        torch.testing.assert_close(z.std(), torch.tensor(1.0), atol=1e-4, rtol=1e-4)
        assert z[:, 0, 0].abs().max() > 0                           # the gradient reaches pixels outside the mask
    else:
        region = got["region"][0].expand_as(z)
        latent = torch.nn.functional.interpolate(pixels[:, None], size=(16, 16), mode="bilinear")[0]
        assert torch.equal(region, (latent > 0).expand_as(z))      # the noise mask's support at latent size
        torch.testing.assert_close(z[region].std(), torch.tensor(1.0), atol=1e-4, rtol=1e-4)
        assert z[~region].abs().max() == 0
    assert got["after"] < got["before"]


def test_gradients_with_cond_and_uncond_split(sd15, monkeypatch):
    prepared = rasg.install(sd15, TOKENS)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 3.0
    batched = OneCall(prepared).guided(x, 3.0)
    # Too little free memory for both halves at once: ComfyUI runs cond and uncond as separate calls.
    monkeypatch.setattr(prepared.model, "memory_required", lambda *a, **k: float("inf"))
    unet = prepared.model.diffusion_model
    batch_sizes = []
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda x_, *a, **k: batch_sizes.append(x_.shape[0]) or forward(x_, *a, **k))
    split = OneCall(prepared).guided(x, 3.0)
    assert batch_sizes and set(batch_sizes) == {1}                      # every UNet call held one half only
    assert torch.isfinite(split["z"]).all()
    torch.testing.assert_close(split["z"], batched["z"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families(family):
    model = build_model(family)
    prepared = rasg.install(model, TOKENS)
    plain, guided = run(prepared, rasg_sampler(eta=0.0), family=family), run(prepared, rasg_sampler(eta=0.15),
                                                                               family=family)
    assert torch.isfinite(guided).all() and not torch.allclose(plain, guided)


def test_composes_with_painta(sd15):
    both = sd15.clone()
    PAIntAHooks(RegionPrompt("x", torch.randn(1, 77, 768), TOKENS, 3), square(side=128), (2, 4),
                ScheduleWindow(1e9, 0.0)).install(both)
    prepared = rasg.install(both, TOKENS)
    out = run(prepared, rasg_sampler(eta=0.15), batch=2)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, run(rasg.install(sd15, TOKENS), rasg_sampler(eta=0.15), batch=2))


def test_subset_of_steps_and_reference_rule_run(sd15):
    prepared = rasg.install(sd15, TOKENS)
    calls = []
    original = rasg._guided_call

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    rasg._guided_call = counting
    try:
        run(prepared, rasg_sampler(eta=0.15, guide_start=0.0, guide_end=0.5), steps=4)
        assert len(calls) == 2
        calls.clear()
        out = run(prepared, rasg_sampler(eta=0.15, sigma_rule="reference"), steps=4)
        assert len(calls) == 3 and torch.isfinite(out).all()      # the last step (to sigma 0) has no noise term
    finally:
        rasg._guided_call = original


def test_errors_name_the_node_and_input(sd15):
    with pytest.raises(NodeInputError, match="RASGSampler, input 'model'.*RASGGuidance"):
        run(sd15, rasg_sampler(eta=0.15))
    with pytest.raises(NodeInputError, match="RASGSampler, input 'latent'.*noise mask"):
        run(rasg.install(sd15, TOKENS), rasg_sampler(eta=0.15), mask=False)


def test_nodes(sd15):
    import nodes
    from faithful_inpaint.devtools.random_models import build_clip

    guidance, sampler_node = nodes.NODE_CLASS_MAPPINGS["RASGGuidance"], nodes.NODE_CLASS_MAPPINGS["RASGSampler"]
    clip = build_clip("sd15")
    with torch.inference_mode():
        (prepared,) = guidance.execute(model=sd15, clip=clip, prompt="a red vase",
                                       attention_resolution="1/32 (paper)").result
        (sampler,) = sampler_node.execute(eta=0.15, sigma_rule="paper (eq. 11)", guide_start=0.0,
                                          guide_end=1.0).result
    assert prepared.model_options[rasg.GUIDE_KEY].token_indices == [1, 2, 3, 4]
    assert rasg.GUIDE_KEY not in sd15.model_options
    assert torch.isfinite(run(prepared, sampler)).all()
    with pytest.raises(NodeInputError, match="RASGGuidance, input 'mask'"):
        guidance.execute(model=sd15, clip=clip, prompt="x", attention_resolution="1/32 (paper)",
                         mask=torch.zeros(1, 64, 64))


def test_backward_covers_the_conditional_half_only(sd15, monkeypatch):
    prepared = rasg.install(sd15, TOKENS)
    unet = prepared.model.diffusion_model
    calls = []
    forward = unet.forward

    def spy(x_, *a, **k):
        calls.append((x_.shape[0], torch.is_grad_enabled(), tuple(k["transformer_options"]["cond_or_uncond"])))
        return forward(x_, *a, **k)

    monkeypatch.setattr(unet, "forward", spy)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 3.0
    OneCall(prepared).guided(x, 3.0)
    # the guided call: positive with autograd, negative without; the two plain calls after it stay batched
    assert calls[:2] == [(1, True, (0,)), (1, False, (1,))]
    assert all(batch == 2 and not grad for batch, grad, _ in calls[2:])
