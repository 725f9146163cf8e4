"""Token selection, masks and cond/uncond layout (kernels/), with ComfyUI's real tokenizers where they matter."""
import math

import pytest
import torch
import torch.nn.functional as F

from faithful_inpaint.kernels import batch, masks, sr_blend
from faithful_inpaint.kernels.tokens import prompt_token_indices, word_count, word_token_indices


# -- ind(tau) ------------------------------------------------------------------------------------------------
def _windows(tokens, key):
    return [[t for t, *_ in w] for w in tokens[key]]


def test_sd1_clip_l_words_plus_eot():
    from comfy.sd1_clip import SD1Tokenizer

    tok = SD1Tokenizer()
    windows = _windows(tok.tokenize_with_weights("a red circle"), "l")
    assert windows[0][:5] == [49406, 320, 736, 7117, 49407]       # SOT a red circle EOT, then EOT padding
    assert prompt_token_indices(windows, 49407) == [1, 2, 3, 4]
    assert word_token_indices(windows, 49407) == [1, 2, 3]
    assert word_count(windows, 49407) == 3


def test_sd2_openclip_h_pads_with_zero():
    from comfy.text_encoders.sd2_clip import SD2Tokenizer

    tok = SD2Tokenizer()
    tokens = tok.tokenize_with_weights("a red circle")
    windows = _windows(tokens, "h")
    assert windows[0][4] == 49407 and windows[0][5] == 0
    assert prompt_token_indices(windows, tok.clip_h.end_token) == [1, 2, 3, 4]


def test_sdxl_both_encoders_agree_on_positions():
    from comfy.sdxl_clip import SDXLTokenizer

    tok = SDXLTokenizer()
    tokens = tok.tokenize_with_weights("a photo of a blue vase")
    lpos = prompt_token_indices(_windows(tokens, "l"), tok.clip_l.end_token)
    gpos = prompt_token_indices(_windows(tokens, "g"), tok.clip_g.end_token)
    assert lpos == gpos == [1, 2, 3, 4, 5, 6, 7]


def test_long_prompt_spans_windows_with_each_eot():
    from comfy.sd1_clip import SD1Tokenizer

    text = " ".join(["cat"] * 100)
    windows = _windows(SD1Tokenizer().tokenize_with_weights(text), "l")
    assert len(windows) == 2 and all(len(w) == 77 for w in windows)
    idx = prompt_token_indices(windows, 49407)
    assert 0 not in idx and 77 not in idx                  # no SOT of either window
    assert word_count(windows, 49407) == 100
    assert len(idx) == 102                                 # 100 words + 2 EOT
    assert windows[1][idx[-1] - 77] == 49407


def test_empty_prompt_has_only_eot():
    from comfy.sd1_clip import SD1Tokenizer

    windows = _windows(SD1Tokenizer().tokenize_with_weights(""), "l")
    assert prompt_token_indices(windows, 49407) == [1]
    assert word_count(windows, 49407) == 0


# -- masks ---------------------------------------------------------------------------------------------------
def test_as_batch_layouts_and_bad_shape():
    assert masks.as_batch(torch.ones(8, 8)).shape == (1, 1, 8, 8)
    assert masks.as_batch(torch.ones(2, 8, 8)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="mask must be"):
        masks.as_batch(torch.ones(2, 3, 8, 8))


def test_polarity_roundtrip():
    m = torch.tensor([[0.0, 1.0, 0.25]])
    assert torch.equal(masks.invert(masks.invert(m)), m)
    assert torch.equal(masks.invert(m), torch.tensor([[1.0, 0.0, 0.75]]))


def test_level_sizes_follow_unet_rounding():
    assert masks.level_size(64, 64, 4) == (16, 16)
    assert masks.level_size(75, 50, 2) == (38, 25)
    assert masks.level_size(75, 50, 8) == (10, 7)


def test_per_resolution_masks_of_a_centred_square():
    m = torch.zeros(1, 512, 512)
    m[:, 128:384, 128:384] = 1
    levels = masks.per_resolution(m, (64, 64))
    for d, lm in levels.items():
        side = 64 // d
        assert lm.shape == (1, 1, side, side)
        assert lm.sum() == (side // 2) ** 2                  # the square covers the centre half of each side
    flat = masks.at_resolution(m, 16, 16)
    assert flat.shape == (1, 256) and set(flat.unique().tolist()) == {0.0, 1.0}


def test_match_batch():
    m = torch.ones(1, 1, 4, 4)
    assert masks.match_batch(m, 3).shape[0] == 3
    two = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    assert torch.equal(masks.match_batch(two, 4)[2:], two)
    with pytest.raises(ValueError, match="mask batch"):
        masks.match_batch(two, 3)


def test_dilate_and_blur():
    m = torch.zeros(1, 1, 9, 9)
    m[..., 4, 4] = 1
    assert masks.dilate(m, 1).sum() == 9
    b = masks.blur(m, 1.0)
    assert torch.isclose(b.sum(), torch.tensor(1.0), atol=1e-5)
    assert b[..., 4, 4] < 1 and b[..., 4, 5] > 0


def _separable_gaussian(x, sigma, radius, mode):
    """Reference: normalised samples of exp(-t^2 / 2 sigma^2), t = -radius..radius, one pass per axis."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode[1]), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode[0]), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def test_blur_is_the_replicate_padded_gaussian():
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(2, 1, 37, 53, generator=g) > 0.7).float()
    for sigma in (0.3, 1.0, 2.5, 6.0):
        radius = max(1, math.ceil(3 * sigma))
        assert torch.allclose(masks.blur(m, sigma), _separable_gaussian(m, sigma, radius, ("replicate",) * 2),
                              atol=1e-6)


def test_sr_blend_blur_is_torchvisions_gaussian_blur():
    from torchvision.transforms.functional import gaussian_blur

    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 4, 40, 33, generator=g)
    for k in (3, 5, 19):
        assert torch.allclose(sr_blend.gaussian_blur_k(x, k), gaussian_blur(x, [k, k]), atol=1e-6)
    # An axis no longer than k // 2 cannot reflect; it replicates (torchvision raises there).
    thin = torch.rand(1, 1, 5, 40, generator=g)
    sigma = sr_blend.torchvision_sigma(19)
    assert torch.allclose(sr_blend.gaussian_blur_k(thin, 19), _separable_gaussian(thin, sigma, 9, ("replicate",
                                                                                                   "reflect")),
                          atol=1e-6)
    spot = torch.zeros(1, 1, 32, 32)
    spot[..., 16, 16] = 1
    out = sr_blend.gaussian_blur_k(spot, 5)
    assert (out[..., :14, :] == 0).all() and (out[..., 19:, :] == 0).all() and out[..., 14, 16] > 0


def test_dilate_is_kornia_flat_square_dilation():
    import kornia

    m = (torch.rand(2, 1, 50, 61, generator=torch.Generator().manual_seed(2)) > 0.9).float()
    for pixels in (1, 4, 19):
        assert torch.equal(masks.dilate(m, pixels), kornia.morphology.dilation(m, torch.ones(2 * pixels + 1,
                                                                                          2 * pixels + 1)))


# -- cond/uncond ---------------------------------------------------------------------------------------------
def test_chunks_follow_cond_or_uncond_order():
    assert batch.chunks([1, 0], 4) == [(1, slice(0, 2)), (0, slice(2, 4))]
    assert batch.cond_slice([1, 0], 4) == slice(2, 4)
    assert batch.cond_slice([0, 1], 6) == slice(0, 3)
    assert batch.cond_slice([1], 2) is None
    with pytest.raises(ValueError):
        batch.chunks([0, 1], 3)


def test_mask_levels_preview_of_an_8192_px_mask_is_small_and_exact():
    """An 8192 x 8192 mask gives 1024 px tiles (about 50 MB instead of about 1.5 GB), each the level mask PAIntA sees,
    nearest-upscaled; a small mask keeps its size."""
    from faithful_inpaint.kernels.previews import mask_levels_preview

    mask = torch.zeros(1, 1, 8192, 8192)
    mask[..., 1000:5000, 3000:7777] = 1
    preview = mask_levels_preview(mask, (1, 2, 4, 8))
    assert preview.shape == (1, 1024, 4 * 1024 + 3 * 2, 3)
    assert preview.numel() * preview.element_size() < 60 * 2**20
    for i, d in enumerate((1, 2, 4, 8)):
        side = 1024 // d                                         # the level: 8192 / 8 / d tokens a side
        level = masks.binary(masks.resize(mask, side, side))[0, 0]
        tile = preview[0, :, i * 1026:i * 1026 + 1024, 0]
        assert torch.equal(tile[::d, ::d], level)
    small = mask_levels_preview(torch.ones(1, 1, 64, 48), (2,))
    assert small.shape == (1, 64, 48, 3)
