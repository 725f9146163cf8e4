"""RASG's math (kernels/rasg.py): eq. (8)/(11) in sigma space, the eq. (10) objective, standardisation."""
import math

import pytest

import torch

from faithful_inpaint.kernels import rasg


def test_ddim_split_is_eq11_in_sigma_space():
    sigma, sigma_next, eta = 3.0, 1.5, 0.15
    a_t, a_p = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    sigma_t = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)       # eq. (11), DDIM space
    down, up = rasg.ddim_split(sigma, sigma_next, eta)
    assert math.isclose(up, sigma_t / math.sqrt(a_p), rel_tol=1e-9)
    # eq. (8)'s eps coefficient sqrt(1 - a_p - sigma_t^2), divided by sqrt(a_p)
    assert math.isclose(down, math.sqrt(1 - a_p - sigma_t ** 2) / math.sqrt(a_p), rel_tol=1e-9)


def test_eta_zero_is_deterministic_ddim():
    assert rasg.ddim_split(3.0, 1.5, 0.0) == (1.5, 0.0)
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(rasg.ddim_step(x0, eps, 1.5, 0.0, torch.randn(1, 4, 8, 8)), x0 + 1.5 * eps)


def test_reference_sigma_is_much_smaller():
    # SD's scaled-linear beta schedule (ComfyUI's default for SD1.x/SD2.x)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    t, tp = 979, 959
    sigma, sigma_next = (((1 - abar[i]) / abar[i]).sqrt().item() for i in (t, tp))
    _, up_paper = rasg.ddim_split(sigma, sigma_next, 0.15)
    _, up_ref = rasg.reference_split(sigma_next, 1 - betas[t].item(), 1 - betas[tp].item(), 0.15)
    assert up_ref < 0.05 * up_paper


def test_segmentation_loss_by_hand():
    maps = torch.tensor([[[0.0, 2.0, 9.0], [1.0, 0.0, 9.0]]])          # B=1, N=2 pixels, L=3 tokens
    mask = torch.tensor([[1.0, 0.0]])
    # tokens 0 and 1 only; logits A - 1
    def bce(logit, target):
        p = 1 / (1 + math.exp(-logit))
        return -(target * math.log(p) + (1 - target) * math.log(1 - p))
    expected = (bce(-1, 1) + bce(0, 0)) / 2 + (bce(1, 1) + bce(-1, 0)) / 2
    assert math.isclose(rasg.segmentation_loss(maps, mask, [0, 1]).item(), expected, rel_tol=1e-6)


def test_loss_lower_when_attention_sits_in_the_mask():
    mask = torch.zeros(1, 16)
    mask[:, :4] = 1
    inside = torch.full((1, 16, 2), -2.0)
    inside[:, :4] = 4.0
    outside = torch.full((1, 16, 2), -2.0)
    outside[:, 8:12] = 4.0
    assert rasg.segmentation_loss(inside, mask, [0, 1]) < rasg.segmentation_loss(outside, mask, [0, 1])


def test_standardised_has_unit_std_per_sample_and_keeps_the_mean_sign():
    scale = torch.tensor([0.01, 1.0, 50.0]).view(3, 1, 1, 1)
    g = (torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.3) * scale  # positive mean each
    z = rasg.standardised(g)
    torch.testing.assert_close(z.flatten(1).std(1), torch.ones(3))
    assert (z.flatten(1).mean(1) > 0).all()


def test_standardised_over_the_region_the_gradient_lives_in():
    """With a latent noise mask the gradient is 0 outside it; the std over the mask makes the noise there unit."""
    g = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.2
    region = torch.zeros(2, 1, 8, 8)
    region[0, :, 2:6, 2:6] = 1                                      # 25% of the latent
    region[1, :, :, :4] = 1                                         # 50%
    g = g * region
    z = rasg.standardised(g, region)
    for b, frac in ((0, 0.25), (1, 0.5)):
        inside = z[b][region[b].expand(4, -1, -1).bool()]
        torch.testing.assert_close(inside.std(), torch.tensor(1.0))
        assert inside.mean() > 0                                    # the mean is kept
        assert z[b][~region[b].expand(4, -1, -1).bool()].abs().max() == 0
        # the whole-latent std (the previous rule) makes the noise inside 1 / sqrt(fraction) strong instead
        whole = rasg.standardised(g)[b][region[b].expand(4, -1, -1).bool()].std()
        assert whole == pytest.approx(1 / frac ** 0.5, rel=0.1)
    # no region: the whole latent, eq. (8)
    torch.testing.assert_close(rasg.standardised(g, None), rasg.standardised(g))


def test_layer_mask_rules_by_hand():
    """area >= 0.5 counts the token's covered area; the port's bicubic > 0.5 weighs its centre (taps -0.09375,
    0.59375, 0.59375, -0.09375 when shrinking by 2 or 4: PyTorch's cubic kernel, A = -0.75)."""
    from faithful_inpaint.kernels import masks

    m = torch.zeros(1, 1, 8, 8)
    m[..., :, 2:4] = 1                                              # half of the first 4-wide block, off-centre
    m[..., :, 4:7] = 1                                              # 3/4 of the second block, its centre included
    area = masks.at_resolution(m, 2, 2, rule="area").view(2, 2)
    port = masks.at_resolution(m, 2, 2, rule="bicubic").view(2, 2)
    assert area.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    # first block: pixels 0..3 -> 0, 0, 1, 1 -> 0.59375 - 0.09375 = 0.5, not > 0.5
    assert port.tolist() == [[0.0, 1.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="layer-mask rule"):
        masks.at_resolution(m, 2, 2, rule="nearest")
