"""The attention recorder (patching/attention_capture.py) on a real ComfyUI UNet with random weights."""
import copy

import pytest
import torch

from faithful_inpaint.kernels.attention_maps import attention_maps
from faithful_inpaint.patching.attention_capture import AttentionRecorder
from faithful_inpaint.patching.blocks import host_attention, transformer_blocks
from faithful_inpaint.devtools.random_models import build_model
from helpers import forward

SIGMA = 2.0


@pytest.fixture(scope="module")
def model():
    return build_model("sd15", "tiny")


@pytest.fixture(scope="module")
def inputs():
    """One latent repeated for both chunks, two different prompts: chunk rows differ only through the context."""
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        x = torch.randn(1, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
        cond, uncond = torch.randn(2, 1, 77, 768, generator=g)
    return x, cond, uncond


def run(model, inputs, cond_or_uncond=(0, 1)):
    x, cond, uncond = inputs
    context = torch.cat([cond if kind == 0 else uncond for kind in cond_or_uncond])
    return forward(model, x[: len(cond_or_uncond)], SIGMA, context, cond_or_uncond)


def blocks_of(model):
    return transformer_blocks(model.get_model_object("diffusion_model"))


@pytest.mark.parametrize("enabled", [False, True])
def test_installed_recorder_leaves_the_output_bit_identical(model, inputs, enabled):
    plain = run(model, inputs)
    recorder = AttentionRecorder(attention=("attn1", "attn2"), enabled=enabled)
    out = run(recorder.install(model), inputs)
    assert torch.equal(out, plain)
    assert len(recorder.captures) == (2 * len(blocks_of(model)) if enabled else 0)


def test_probabilities_sum_to_one_and_match_the_layers_own_projections(model, inputs):
    block = blocks_of(model)[1]
    seen = {}
    hooks = [block.module.attn2.to_q.register_forward_hook(lambda m, a, out: seen.__setitem__("q", out)),
             block.module.attn2.to_k.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out)),
             block.module.attn2.to_q.register_forward_pre_hook(lambda m, a: seen.__setitem__("n", a[0])),
             block.module.attn2.to_k.register_forward_pre_hook(lambda m, a: seen.__setitem__("ctx", a[0]))]
    recorder = AttentionRecorder(blocks=[block.key], average_heads=False)
    try:
        run(recorder.install(model), inputs)
    finally:
        for h in hooks:
            h.remove()
    (cap,) = recorder.captures
    heads = block.module.attn2.heads
    assert cap.maps.shape == (2, heads, cap.height * cap.width, 77) and cap.kinds == (0, 1)
    torch.testing.assert_close(cap.maps.sum(-1), torch.ones(2, heads, cap.height * cap.width))
    # By hand from the layer's own to_q / to_k applied to the hooked inputs.
    with torch.inference_mode():
        q = block.module.attn2.to_q(seen["n"]).view(2, -1, heads, block.module.attn2.dim_head).transpose(1, 2)
        k = block.module.attn2.to_k(seen["ctx"]).view(2, -1, heads, block.module.attn2.dim_head).transpose(1, 2)
    torch.testing.assert_close(q.transpose(1, 2).flatten(2), seen["q"])
    by_hand = torch.softmax(q @ k.transpose(-1, -2) / block.module.attn2.dim_head ** 0.5, dim=-1)
    torch.testing.assert_close(cap.maps, by_hand, atol=1e-6, rtol=1e-5)


def test_logits_are_the_pre_softmax_scores_and_heads_average(model, inputs):
    key = blocks_of(model)[0].key
    logits = AttentionRecorder(blocks=[key], probabilities=False, average_heads=False)
    probs = AttentionRecorder(blocks=[key], average_heads=True)
    run(probs.install(logits.install(model)), inputs)
    torch.testing.assert_close(probs.captures[0].maps, logits.captures[0].maps.softmax(-1).mean(1))


def test_only_requested_layers_are_captured(model, inputs):
    infos = blocks_of(model)
    chosen = [infos[0].key, infos[-2].key]
    by_key = AttentionRecorder(blocks=chosen, attention="attn1")
    by_level = AttentionRecorder(downsamples=(2,))
    run(by_level.install(by_key.install(model)), inputs)
    assert [(c.attention, c.key) for c in by_key.captures] == [("attn1", k) for k in chosen]
    assert [c.key for c in by_level.captures] == [b.key for b in infos if b.downsample == 2]
    assert all(c.attention == "attn2" and c.height == 4 and c.maps.shape[-1] == 77 for c in by_level.captures)
    with pytest.raises(ValueError, match="no transformer block"):
        AttentionRecorder(blocks=[("input", 99, 0)]).install(model)
    with pytest.raises(ValueError, match="downsample"):
        AttentionRecorder(downsamples=(8,)).install(model)


def test_cond_only_takes_the_conditional_rows_in_any_order_and_in_split_calls(model, inputs):
    def captured(cond_or_uncond, cond_only):
        recorder = AttentionRecorder(downsamples=(1,), cond_only=cond_only)
        run(recorder.install(model), inputs, cond_or_uncond)
        return recorder.captures

    full = {order: captured(list(order), False) for order in ((0, 1), (1, 0))}
    for order in full:
        cond, rows = captured(list(order), True), order.index(0)
        assert all(c.kinds == (0,) and c.maps.shape[0] == 1 for c in cond)
        for f, c in zip(full[order], cond, strict=True):
            assert f.kinds == order and torch.equal(c.maps, f.maps[rows:rows + 1])
    assert captured([1], True) == []
    alone = captured([0], True)
    for f, c in zip(full[(1, 0)], alone, strict=True):
        torch.testing.assert_close(c.maps, f.maps[1:2], atol=1e-5, rtol=1e-4)
    # The two prompts differ, so picking the wrong chunk would show.
    assert not torch.allclose(alone[0].maps, full[(0, 1)][0].maps[1:2], atol=1e-3)


@pytest.mark.parametrize("two_part_key", [False, True])
def test_a_replace_installed_before_still_runs_and_its_output_is_returned(model, inputs, two_part_key):
    key = blocks_of(model)[2].key

    def plus_constant(q, k, v, extra_options):
        return host_attention(q, k, v, extra_options) + 0.25

    other = model.clone()
    other.set_model_attn2_replace(plus_constant, key[0], key[1], None if two_part_key else key[2])
    expected = run(other, inputs)
    assert not torch.equal(expected, run(model, inputs))
    recorder = AttentionRecorder(blocks=[key])
    assert torch.equal(run(recorder.install(other), inputs), expected)
    assert len(recorder.captures) == 1


def test_nothing_is_left_on_the_original_model(model, inputs):
    before_options = copy.deepcopy(model.model_options)
    before = run(model, inputs)
    recorder = AttentionRecorder(attention=("attn1", "attn2"))
    run(recorder.install(model), inputs)
    recorder.clear()
    assert model.model_options == before_options
    assert torch.equal(run(model, inputs), before)
    assert recorder.captures == []


def test_maps_kernel_matches_a_dense_per_head_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 12, generator=g), torch.randn(2, 7, 12, generator=g)
    per_head = [torch.softmax(q[..., h * 4:(h + 1) * 4] @ k[..., h * 4:(h + 1) * 4].mT / 2.0, -1) for h in range(3)]
    torch.testing.assert_close(attention_maps(q, k, 3), torch.stack(per_head, 1))
    torch.testing.assert_close(attention_maps(q.half(), k.half(), 3, average_heads=True),
                               torch.stack(per_head, 1).mean(1), atol=2e-3, rtol=1e-2)
