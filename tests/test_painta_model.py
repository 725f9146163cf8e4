"""PAIntA on real ComfyUI UNets (tiny configs, random weights built under inference mode)."""
import pytest
import torch

import comfy.sample
from faithful_inpaint.patching.painta import PAIntAHooks
from faithful_inpaint.patching.prompt import RegionPrompt
from faithful_inpaint.patching.schedule import ScheduleWindow
from faithful_inpaint.devtools.random_models import build_model
from helpers import forward

CONTEXT_DIM = {"sd15": 768, "sd2": 1024, "sdxl": 2048}
ALWAYS = ScheduleWindow(1e9, 0.0)


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd15")


def region(dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RegionPrompt("a red circle", torch.randn(1, 77, dim, generator=g), [1, 2, 3, 4], 3)


def square_mask(batch=1, size=128, lo=32, hi=96):
    m = torch.zeros(batch, 1, size, size)
    m[..., lo:hi, lo:hi] = 1
    return m


def patched(model, mask, downsamples=(2, 4), window=ALWAYS, override=None, family="sd15"):
    clone = model.clone()
    hooks = PAIntAHooks(region(CONTEXT_DIM[family]), mask, downsamples, window, relevance_override=override)
    hooks.install(clone)
    return clone


def inputs(batch=1, chunks=2, dim=768, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch * chunks, 4, 16, 16, generator=g)
    ctx = torch.randn(batch * chunks, 77, dim, generator=g)
    return x, ctx


def test_zero_mask_equals_unpatched_exactly(sd15):
    x, ctx = inputs()
    assert torch.equal(forward(patched(sd15, torch.zeros(1, 1, 128, 128)), x, 3.0, ctx), forward(sd15, x, 3.0, ctx))


def test_relevance_one_everywhere_equals_unpatched_exactly(sd15):
    x, ctx = inputs()
    ones = patched(sd15, square_mask(), override=torch.ones_like)
    assert torch.equal(forward(ones, x, 3.0, ctx), forward(sd15, x, 3.0, ctx))


def test_patch_changes_output_and_leaves_original_model_untouched(sd15):
    x, ctx = inputs()
    before_options = repr(sd15.model_options)
    base = forward(sd15, x, 3.0, ctx)
    out = forward(patched(sd15, square_mask()), x, 3.0, ctx)
    assert not torch.allclose(out, base, atol=1e-4)
    assert repr(sd15.model_options) == before_options
    assert torch.equal(forward(sd15, x, 3.0, ctx), base)


def test_gating_by_resolution(sd15):
    seen = []

    def record(c):
        seen.append(c.shape[1])
        return c

    x, ctx = inputs()
    forward(patched(sd15, square_mask(), downsamples=(4,), override=record), x, 3.0, ctx)
    assert set(seen) == {16}                          # 4 x 4 tokens: the H/32 level of a 16 x 16 latent
    seen.clear()
    forward(patched(sd15, square_mask(), downsamples=(2, 4), override=record), x, 3.0, ctx)
    assert set(seen) == {16, 64}


def test_gating_by_schedule(sd15):
    calls = []

    def record(c):
        calls.append(1)
        return c

    model = patched(sd15, square_mask(), window=ScheduleWindow(10.0, 2.0), override=record)
    x, ctx = inputs()
    out_off = forward(model, x, 1.0, ctx)             # sigma below the window: PAIntA idle
    assert not calls and torch.equal(out_off, forward(sd15, x, 1.0, ctx))
    forward(model, x, 5.0, ctx)
    assert calls


def test_window_from_percent_matches_t500(sd15):
    w = ScheduleWindow.from_percent(sd15, 0.0, 0.5)
    ms = sd15.get_model_object("model_sampling")
    assert w.contains(ms.sigma(torch.tensor(600.0)).view(1))
    assert not w.contains(ms.sigma(torch.tensor(400.0)).view(1))


def test_per_sample_masks_in_a_batch(sd15):
    masks = torch.cat([torch.zeros(1, 1, 128, 128), square_mask()])   # sample 0: nothing to inpaint
    x, ctx = inputs(batch=2)
    base = forward(sd15, x, 3.0, ctx)
    out = forward(patched(sd15, masks), x, 3.0, ctx)
    # layout [cond s0, cond s1, uncond s0, uncond s1]
    assert torch.equal(out[[0, 2]], base[[0, 2]])
    assert not torch.allclose(out[[1, 3]], base[[1, 3]], atol=1e-4)


def test_mask_batch_mismatch_is_a_clear_error(sd15):
    x, ctx = inputs(batch=3)
    with pytest.raises(ValueError, match="PAIntAPatch, input 'mask'.*mask batch"):
        forward(patched(sd15, square_mask(batch=2)), x, 3.0, ctx)


def test_cond_uncond_batched_split_and_reordered_agree(sd15):
    model = patched(sd15, square_mask())
    x, ctx = inputs()
    together = forward(model, x, 3.0, ctx, cond_or_uncond=(0, 1))
    cond_alone = forward(model, x[:1], 3.0, ctx[:1], cond_or_uncond=(0,))
    uncond_alone = forward(model, x[1:], 3.0, ctx[1:], cond_or_uncond=(1,))
    torch.testing.assert_close(torch.cat([cond_alone, uncond_alone]), together, atol=1e-5, rtol=1e-5)
    swapped = forward(model, x.flip(0), 3.0, ctx.flip(0), cond_or_uncond=(1, 0))
    torch.testing.assert_close(swapped.flip(0), together, atol=1e-5, rtol=1e-5)


def test_chains_an_attn1_replace_installed_before(sd15):
    from comfy.ldm.modules import attention

    calls = []

    def other_pack(q, k, v, extra_options):
        calls.append(1)
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    first = sd15.clone()
    for key in [("input", 5, 0), ("output", 0, 0)]:
        first.set_model_attn1_replace(other_pack, *key)
    x, ctx = inputs()
    only_other = forward(first, x, 3.0, ctx)
    both_idle = forward(patched(first, torch.zeros(1, 1, 128, 128)), x, 3.0, ctx)
    assert calls and torch.equal(both_idle, only_other)


def test_an_earlier_attn1_replace_also_computes_the_masked_rows(sd15):
    """With a non-empty mask the masked rows are recomputed through the replace installed before PAIntA: with c = 1
    PAIntA is then exactly that replace alone (recomputing them with ComfyUI's attention dropped the replace's
    halving there), and with the real c the replace sees the scaled keys."""
    from comfy.ldm.modules import attention

    keys_seen = []

    def halving(q, k, v, extra_options):
        keys_seen.append(k)
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    first = sd15.clone()
    for key in [("input", 4, 0), ("input", 5, 0), ("output", 0, 0), ("output", 1, 0)]:
        first.set_model_attn1_replace(halving, *key)
    x, ctx = inputs()
    only_halving = forward(first, x, 3.0, ctx)
    assert not torch.equal(only_halving, forward(sd15, x, 3.0, ctx))          # the replace changes the output
    keys_seen.clear()
    assert torch.equal(forward(patched(first, square_mask(), override=torch.ones_like), x, 3.0, ctx), only_halving)
    plain_calls = len(keys_seen)

    def scaled_copy(a, b):   # b is a with every key token multiplied by its own factor (c_j)
        return a.shape == b.shape and not torch.equal(a, b) and torch.allclose(b, a * (b[..., :1] / a[..., :1]),
                                                                               rtol=1e-4, atol=1e-5)

    keys_seen.clear()
    chained = forward(patched(first, square_mask()), x, 3.0, ctx)
    assert not torch.equal(chained, only_halving) and len(keys_seen) == plain_calls > 4   # masked rows: the replace
    assert any(scaled_copy(a, b) for a, b in zip(keys_seen, keys_seen[1:]))               # ... on the scaled keys


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_through_comfy_sampling(family):
    model = build_model(family)
    dim = CONTEXT_DIM[family]
    g = torch.Generator().manual_seed(0)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    positive = [[torch.randn(1, 77, dim, generator=g), dict(extra)]]
    negative = [[torch.zeros(1, 77, dim), dict(extra)]]
    latent = torch.randn(2, 4, 16, 16, generator=g)
    noise_mask = square_mask(batch=1, size=16, lo=4, hi=12)
    patched_model = patched(model, square_mask(), family=family)

    def run(m):
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
        return comfy.sample.sample(m, noise, 4, 5.0, "euler", "normal", positive, negative, latent,
                                   noise_mask=noise_mask, seed=7, disable_pbar=True)

    base = run(model)
    out = run(patched_model)
    assert torch.isfinite(out).all()
    inside = noise_mask.expand_as(out).bool()
    assert (out - base)[inside].abs().max() > 1e-3
    torch.testing.assert_close(out[~inside], base[~inside], atol=1e-5, rtol=0)   # known region pasted back
    assert torch.equal(run(model), base)                                           # nothing left behind
