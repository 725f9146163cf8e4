"""The PAIntAPatch node as ComfyUI calls it: inputs, outputs, warnings and errors."""
import logging

import pytest
import torch

from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.devtools.random_models import build_clip, build_flux_model, build_model


@pytest.fixture(scope="module")
def node():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS["PAIntAPatch"]


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd15", inpaint=True)


@pytest.fixture(scope="module")
def clip():
    return build_clip("sd15")


def square(size=64, batch=1):
    m = torch.zeros(batch, size, size)
    m[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    return m


def run(node, model, clip, prompt="a red circle", mask=None, **kw):
    args = dict(at_h8=False, at_h16=True, at_h32=True, at_h64=False, start_percent=0.0, end_percent=0.5,
                smoothing=0.7071)
    args.update(kw)
    with torch.inference_mode():
        out = node.execute(model=model, clip=clip, prompt=prompt, mask=square() if mask is None else mask, **args)
    return out.result


def test_schema_is_registered_under_the_pack_category(node):
    info = node.INPUT_TYPES()
    assert list(info["required"])[:4] == ["model", "clip", "prompt", "mask"]
    assert node.CATEGORY.startswith("inpaint/faithful")
    assert tuple(node.RETURN_TYPES) == ("MODEL", "IMAGE")


def test_returns_a_patched_clone_and_a_mask_preview(node, sd15, clip):
    patched, preview = run(node, sd15, clip)
    assert patched is not sd15
    replaces = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert len(replaces) == 7                    # tiny SD1.5: H/16 and H/32 blocks
    assert "middle_patch" in patched.model_options["transformer_options"]["patches"]
    assert "patches_replace" not in sd15.model_options["transformer_options"]
    assert preview.shape == (1, 64, 64 * 2 + 2, 3) and preview.min() >= 0 and preview.max() <= 1


def test_layer_mask_rule_reaches_the_hooks_and_the_preview(node, sd15, clip):
    """The diffusers port's rule (bicubic > 0.5) is offered beside the area rule; an unaligned mask shows the
    difference in mask_levels, an aligned one does not."""
    aligned, unaligned = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    aligned[:, :32, :32] = 1                                     # whole blocks at H/16 and H/32
    unaligned[:, 8:56, 8:56] = 1                                 # half of each edge block at H/16: area 0.5 is in,
    for mask, same in ((aligned, True), (unaligned, False)):     # bicubic 0.5 is not (> 0.5)
        _, area = run(node, sd15, clip, mask=mask)
        patched, port = run(node, sd15, clip, mask=mask, layer_mask="bicubic > 0.5 (diffusers port)")
        assert torch.equal(area, port) == same
    hooks = [cell.cell_contents for p in patched.model_options["transformer_options"]["patches"]["middle_patch"]
             for cell in (p.__closure__ or ()) if hasattr(cell.cell_contents, "layer_rule")]
    assert hooks and {h.layer_rule for h in hooks} == {"bicubic"}
    with pytest.raises(NodeInputError, match="PAIntAPatch, input 'layer_mask'"):
        run(node, sd15, clip, layer_mask="nearest")


@pytest.mark.parametrize("case", ["empty mask", "empty prompt", "no resolution"])
def test_noop_cases_warn_and_return_the_model_unchanged(node, sd15, clip, caplog, case):
    kw = {"empty mask": dict(mask=torch.zeros(1, 64, 64)), "empty prompt": dict(prompt="  "),
          "no resolution": dict(at_h16=False, at_h32=False)}[case]
    with caplog.at_level(logging.WARNING):
        patched, _ = run(node, sd15, clip, **kw)
    assert patched is sd15
    assert "PAIntAPatch" in caplog.text and "unchanged" in caplog.text


def test_unsupported_model_family_is_a_clear_error(node, clip):
    with pytest.raises(NodeInputError, match=r"PAIntAPatch, input 'model': Flux models are not supported"):
        run(node, build_flux_model(), clip)


def test_clip_of_another_family_is_a_clear_error(node, clip):
    with pytest.raises(NodeInputError, match=r"input 'clip': this CLIP gives 768-wide .* expects 2048"):
        run(node, build_model("sdxl"), clip)


def test_bad_schedule_window_is_a_clear_error(node, sd15, clip):
    with pytest.raises(NodeInputError, match="end_percent"):
        run(node, sd15, clip, start_percent=0.6, end_percent=0.5)


def test_mask_of_another_size_is_resized(node, sd15, clip):
    import comfy.sample

    patched, _ = run(node, sd15, clip, mask=square(size=37))   # odd size, not a multiple of 8
    latent = torch.zeros(1, 4, 16, 16)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        ctx = clip.encode_from_tokens(clip.tokenize("a red circle"))
    out = comfy.sample.sample(patched, torch.randn(latent.shape, generator=g), 2, 5.0, "euler", "normal",
                              [[ctx, {}]], [[torch.zeros_like(ctx), {}]], latent, disable_pbar=True, seed=0,
                              noise_mask=square(16)[:, None])
    assert torch.isfinite(out).all()
