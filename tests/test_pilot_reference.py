"""PILOT cross-checked against the official code's definitions, recomputed here independently.

The reference side below is written from the definitions the official implementation (Lingzhi-Pan/PILOT,
pipeline/pipeline_pilot.py, models/attn_processor.py) states, without the pack's kernels: its own attention
replace computes softmax(q k^T / sqrt(d)) per head, records it, and applies semantic boundary control; its own
bilinear resize (align_corners False, written out by hand) makes each layer's inside map (values below 1 -> 0); the
background loss maps both latents by v -> (v + 1) / 2; a layer whose inside map is empty or full adds 0; lambda_t
= coef * kept pixels / 1499 * sched(t) with sched built as the reference's table (300 x 0.1, then a 700-point
linspace to 1); the first step's learning rate is lr_warmup exactly, later ones lr * 1.002^(1000 - t); momentum in
the reference's form x_m <- mu x_m - lr g, z <- z + x_m; CFG with the control in both halves; DDIM eta 0.

The pack's side runs through ComfyUI's own sampling (SamplerCustom's path) with the PILOT nodes' sampler; the
latent it optimised, its losses and the result of the DDIM step are compared, for masks aligned and not aligned
with the attention blocks, a mask whose inside map is empty at one level and one whose map is full at one level,
a mask with nothing to keep and one with nothing to inpaint.
"""
import math

import pytest
import torch

import comfy.sample
import comfy.samplers
from faithful_inpaint.patching import pilot
from faithful_inpaint.patching.gradients import convert_inference_weights
from faithful_inpaint.devtools.random_models import build_model

SIDE = 16
WORDS = [1, 2, 3]
CFG = 5.0
LR, LR_WARMUP, COEF, MOMENTUM = 0.025, 0.007, 150.0, 0.7


@pytest.fixture(scope="module")
def sd15():
    model = build_model("sd15")
    convert_inference_weights([model])      # the reference side differentiates the same weights directly
    return model


def conds():
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 77, 768, generator=g)
    unc = torch.randn(1, 77, 768, generator=g) * 0.5
    return ctx, unc


LATENT = torch.randn(1, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(5))


def mask_of(kind):
    m = torch.zeros(SIDE, SIDE)
    if kind == "aligned":                  # aligned with the 2 x 2 and 4 x 4 blocks
        m[4:12, 4:12] = 1
    elif kind == "unaligned":
        m[3:13, 5:14] = 1
    elif kind == "empty at 1/4":           # inside at 8 x 8, nothing inside at 4 x 4
        m[2:4, 2:4] = 1
    elif kind == "full at 1/4":            # every 4 x 4 pixel inside, the 8 x 8 map is not full
        m[1:, 1:] = 1
    elif kind == "nothing kept":
        m[:] = 1
    elif kind != "nothing to inpaint":
        raise ValueError(kind)
    return m


# ------------------------------------------------------------------------------------ reference (independent)

def bilinear(m, h, w):
    """Bilinear resize of a 2-D map, align_corners False, no antialiasing, written out."""
    big_h, big_w = m.shape

    def taps(n_out, n_in):
        out = []
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = int(math.floor(src))
            i1 = min(i0 + 1, n_in - 1)
            out.append((i0, i1, src - i0))
        return out

    res = torch.zeros(h, w, dtype=torch.float64)
    for i, (a0, a1, la) in enumerate(taps(h, big_h)):
        for j, (b0, b1, lb) in enumerate(taps(w, big_w)):
            res[i, j] = ((1 - la) * (1 - lb) * m[a0, b0] + (1 - la) * lb * m[a0, b1]
                         + la * (1 - lb) * m[a1, b0] + la * lb * m[a1, b1])
    return res


def inside(fg, n):
    side = int(round(math.sqrt(n)))
    r = bilinear(fg.double(), side, side)
    return (r >= 1).float().flatten()            # values below 1 set to 0


def sched_table():
    return [0.1] * 300 + torch.linspace(0.1, 1.0, 700, dtype=torch.float64).tolist()


class Reference:
    """The official algorithm on the pack's UNet weights, computed from its stated definitions."""

    def __init__(self, model, fg):
        self.model = model
        self.unet = model.model.diffusion_model
        self.ms = model.get_model_object("model_sampling")
        self.fg = fg.float()                                        # [H, W], 1 = regenerate (binary)
        self.keep = 1 - self.fg
        self.control = bool(self.fg.any()) and bool(self.keep.any())
        self.bank = []

    def replace(self, q, k, v, extra):
        heads = extra["n_heads"]
        b, n, dim = q.shape
        d = dim // heads
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)     # [b, heads, n, 77]
        a = inside(self.fg, n) if self.control else torch.ones(n)
        self.bank.append((n, probs, a))
        if self.control:
            cols = torch.ones(n, probs.shape[-1])
            cols[:, 1:] = a[:, None]                               # SOT kept everywhere, the rest inside only
            probs = probs * cols
        return (probs @ vh).transpose(1, 2).reshape(b, n, dim)

    def eps(self, z, sigma, context):
        keys = {}
        for i, seq in enumerate(self.unet.input_blocks):
            keys[("input", i)] = self.replace
        keys[("middle", 0)] = self.replace
        for i, seq in enumerate(self.unet.output_blocks):
            keys[("output", i)] = self.replace
        t = self.ms.timestep(torch.tensor([sigma])).float().expand(z.shape[0])
        self.bank = []
        return self.unet(z, timesteps=t, context=context, transformer_options={"patches_replace": {"attn2": keys}})

    def abar(self, sigma):
        return 1.0 / (1.0 + sigma ** 2)

    def loss(self, z, sigma, ctx, z_img):
        a = self.abar(sigma)
        e = self.eps(z, sigma, ctx)
        x0 = (z - math.sqrt(1 - a) * e) / math.sqrt(a)
        keep = (self.keep >= 0.5).float()
        l_bg = (((z_img + 1) / 2 * keep - (x0 + 1) / 2 * keep) ** 2).sum()
        terms = []
        for n, probs, ins in self.bank:
            if n == SIDE * SIDE:
                continue                                            # the highest resolution is not in the loss
            if not self.control or ins.all() or not ins.any():
                terms.append(torch.zeros(()))
                continue
            heads = probs.shape[1]
            word = probs[0][:, :, WORDS].sum(-1)                    # [heads, n]
            reverse = (word * (1 - ins)).sum() / ((1 - ins).sum() * heads)
            in_score = (word * ins).sum() / (ins.sum() * heads)
            terms.append(reverse - in_score)
        t = int(round(float(self.ms.timestep(torch.tensor([sigma])))))
        lam = COEF * float(keep.sum()) / 1499.0 * sched_table()[t]
        return l_bg + lam * sum(terms) / len(terms), t

    def optimise(self, z, sigma, ctx, z_img, first, inner_steps):
        losses = []
        if not bool(self.keep.any()):
            return z, losses                                        # nothing kept: no gradient steps
        x_m = torch.zeros_like(z)
        for _ in range(inner_steps):
            z_leaf = z.detach().requires_grad_(True)
            with torch.enable_grad():
                total, t = self.loss(z_leaf, sigma, ctx, z_img)
                (g,) = torch.autograd.grad(total, z_leaf)
            losses.append(total.item())
            lr_t = LR_WARMUP if first else LR * 1.002 ** (1000 - t)
            x_m = MOMENTUM * x_m - lr_t * g
            z = z.detach() + x_m
        return z, losses

    def ddim(self, z, sigma, sigma_next, ctx, unc):
        e_c, e_u = self.eps(z, sigma, ctx), self.eps(z, sigma, unc)
        e = e_u + CFG * (e_c - e_u)
        a, a_next = self.abar(sigma), self.abar(sigma_next)
        x0 = (z - math.sqrt(1 - a) * e) / math.sqrt(a)
        return math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * e


# ------------------------------------------------------------------------------------------------ pack side

def pack_run(model, fg, sigmas, inner_steps, **kw):
    ctx, unc = conds()
    prepared = pilot.install(model, WORDS, boundary_control=True, **kw)
    guide = prepared.model_options[pilot.GUIDE_KEY]
    seen = {"x": []}

    def spy(model_k, x, sigmas_, extra_args=None, callback=None, disable=None, **options):
        seen["start"], seen["z_img"] = x.clone(), model_k.latent_image.clone()
        return pilot.sample_pilot(model_k, x, sigmas_, extra_args, callback=lambda d: seen["x"].append(
            d["x"].clone()), disable=disable, **options)

    sampler = comfy.samplers.KSAMPLER(spy, extra_options={"every": 1, "inner_steps": inner_steps, "lr": LR,
                                                          "lr_warmup": LR_WARMUP, "coef": COEF, "gamma": 1.0,
                                                          "momentum": MOMENTUM})
    noise = torch.randn(LATENT.shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = comfy.sample.sample_custom(prepared, noise, CFG, sampler, sigmas, [[ctx, {}]], [[unc, {}]], LATENT,
                                         noise_mask=fg[None, None], seed=1, disable_pbar=True)
    return seen, guide, out


def sigmas_for(model, start):
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", 10)
    return sigmas[start:start + 3]


KINDS = ["aligned", "unaligned", "empty at 1/4", "full at 1/4", "nothing kept", "nothing to inpaint"]


@pytest.mark.parametrize("kind", KINDS)
def test_two_optimised_steps_match_the_reference(sd15, kind):
    fg = mask_of(kind)
    sigmas = sigmas_for(sd15, 0)
    seen, guide, _ = pack_run(sd15, fg, sigmas, inner_steps=2)
    ref = Reference(sd15, fg)
    ctx, unc = conds()
    z_img = seen["z_img"].float()
    x = seen["start"].float()
    s0, s1, s2 = (float(s) for s in sigmas)
    with torch.inference_mode(False):
        z0, losses0 = ref.optimise(x * math.sqrt(ref.abar(s0)), s0, ctx, z_img, True, 2)
        z1 = ref.ddim(z0.detach(), s0, s1, torch.cat([ctx]), unc)
        z1, losses1 = ref.optimise(z1.detach(), s1, ctx, z_img, False, 2)
    pack_losses = [loss.item() for _, _, loss in guide.last_losses]
    torch.testing.assert_close(torch.tensor(pack_losses), torch.tensor(losses0 + losses1, dtype=torch.float32),
                               rtol=2e-4, atol=1e-4)
    torch.testing.assert_close(seen["x"][0], z0 / math.sqrt(ref.abar(s0)), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(seen["x"][1], z1 / math.sqrt(ref.abar(s1)), rtol=2e-4, atol=2e-4)
    if kind == "nothing kept":
        assert not pack_losses and torch.equal(seen["x"][0], seen["start"])


@pytest.mark.parametrize("kind", ["aligned", "unaligned"])
def test_gradient_and_first_step_match_the_reference(sd15, kind):
    """One inner step: the pack's step divided by the warm-up lr is the reference gradient (norm ratio 1, cosine 1),
    also when sampling starts below t = 999 (denoise < 1): the first step's lr is lr_warmup exactly."""
    fg = mask_of(kind)
    for start in (0, 3):
        sigmas = sigmas_for(sd15, start)
        seen, guide, _ = pack_run(sd15, fg, sigmas[:2], inner_steps=1)
        ref = Reference(sd15, fg)
        ctx, _ = conds()
        s0 = float(sigmas[0])
        scale = math.sqrt(ref.abar(s0))
        z_start = seen["start"].float() * scale
        with torch.inference_mode(False):
            z_leaf = z_start.clone().requires_grad_(True)
            with torch.enable_grad():
                total, _ = ref.loss(z_leaf, s0, ctx, seen["z_img"].float())
                (g_ref,) = torch.autograd.grad(total, z_leaf)
        g_pack = (z_start - seen["x"][0] * scale) / LR_WARMUP
        cos = torch.nn.functional.cosine_similarity(g_pack.flatten(), g_ref.flatten(), dim=0)
        ratio = g_pack.norm() / g_ref.norm()
        assert cos > 1 - 1e-5 and abs(ratio - 1) < 1e-3, (start, cos.item(), ratio.item())


def test_inside_map_rules_differ_for_unaligned_masks_only(sd15):
    """The pack's "area" rule is offered as an option: same result as the reference rule for an aligned mask, a
    different one for an unaligned mask."""
    sigmas = sigmas_for(sd15, 0)[:2]
    for kind, same in (("aligned", True), ("unaligned", False)):
        fg = mask_of(kind)
        a = pack_run(sd15, fg, sigmas, inner_steps=0)[2]
        b = pack_run(sd15, fg, sigmas, inner_steps=0, inside_rule="area")[2]
        assert torch.allclose(a, b, atol=1e-6) == same, kind
