"""PainterNet's branch on real ComfyUI UNets: layer + attention control points, local prompt, sampling, files."""
import pytest
import torch
from safetensors.torch import save_file

import comfy.sample
from faithful_inpaint.kernels import brush_files
from faithful_inpaint.kernels.batch import COND, UNCOND
from faithful_inpaint.kernels.brush_branch import BranchConfig
from faithful_inpaint.kernels.painternet import (AttentionControl, PainterNetBranch, PainterNetConfig, new_branch,
                                                 transformer_block_keys)
from faithful_inpaint.patching.blocks import transformer_blocks
from faithful_inpaint.patching.brush_branch import (BranchConditioning, BrushBranchHooks, branch_patcher,
                                                    inject_residuals, unet_state_dict_diffusers)
from faithful_inpaint.patching.schedule import ScheduleWindow
from faithful_inpaint.devtools.random_models import build_model
from helpers import forward

ALWAYS = ScheduleWindow(1e9, 0.0)
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}


@pytest.fixture(scope="module")
def models():
    return {"sd15": build_model("sd15"), "sdxl": build_model("sdxl")}


def branch_for(model, **acp):
    """A new PainterNet branch made from the model, as training starts (every control point zero)."""
    with torch.inference_mode():
        return new_branch(unet_state_dict_diffusers(model), model.model.model_config.unet_config, **acp)


def train_acp(branch, seed=0, scale=0.5):
    """Give the attention control points random ("trained") weights; the layer control points stay zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():                     # the branch was built under inference mode, like a loader's
        for p in branch.attention_control_points.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return branch


def branch_context(family, seed=4):
    g = torch.Generator().manual_seed(seed)
    dim = CONTEXT_DIM[family]
    return {COND: torch.randn(1, 77, dim, generator=g), UNCOND: torch.randn(1, 77, dim, generator=g)}


def conditioning(family, size=16, context=None):
    g = torch.Generator().manual_seed(3)
    keep = torch.ones(1, 1, size, size)
    keep[..., 4:12, 4:12] = 0
    return BranchConditioning(torch.randn(1, 4, size, size, generator=g), keep, context or branch_context(family))


def patched(model, branch, family, strength=1.0, observer=None, context=None):
    clone = model.clone()
    BrushBranchHooks(branch_patcher(branch), conditioning(family, context=context), strength, ALWAYS,
                     observer=observer).install(clone)
    return clone


def call_inputs(family, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    ctx = torch.randn(batch, 77, CONTEXT_DIM[family], generator=g)
    y = torch.randn(batch, 2816, generator=g) if family == "sdxl" else None
    return x, ctx, y


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_branch_blocks_are_named_after_the_unets_transformer_blocks(models, family):
    unet = models[family].model.diffusion_model
    branch = branch_for(models[family])
    assert transformer_block_keys(branch.config) == [b.key for b in transformer_blocks(unet)]
    assert branch.config.acp_keys() == transformer_block_keys(branch.config)      # default: an ACP on every block


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_untrained_branch_leaves_sampling_unchanged(models, family):
    model = models[family]
    seen = []
    branch = branch_for(model)
    g = torch.Generator().manual_seed(0)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    positive = [[torch.randn(1, 77, CONTEXT_DIM[family], generator=g), dict(extra)]]
    negative = [[torch.zeros(1, 77, CONTEXT_DIM[family]), dict(extra)]]
    latent = torch.randn(1, 4, 16, 16, generator=g)

    def run(m):
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
        return comfy.sample.sample(m, noise, 2, 5.0, "euler", "normal", positive, negative, latent, seed=7,
                                   disable_pbar=True)

    base = run(model)
    out = run(patched(model, branch, family, observer=seen.append))
    assert seen, "the branch never ran"
    control = seen[0].extras["acp"]
    assert isinstance(control, AttentionControl) and control.attention == "attn2"
    assert list(control.features) == transformer_block_keys(branch.config)
    assert torch.equal(out, base)


def _next_norm_inputs(unet, attention):
    """Record, per transformer block, the input of the norm that follows ``attention`` (x + that attention's output,
    after every output patch)."""
    after = "norm2" if attention == "attn1" else "norm3"
    seen, handles = {}, []
    for info in transformer_blocks(unet):
        norm = getattr(info.module, after)
        handles.append(norm.register_forward_pre_hook(
            lambda mod, args, key=info.key: seen.__setitem__(key, args[0].clone())))
    return seen, handles


@pytest.mark.parametrize("attention", ["attn2", "attn1"])
def test_attention_control_reaches_only_the_chosen_layer(models, attention):
    """SDXL tiny has two transformers in input block 5: the ACP of the second one changes its attention output by
    exactly strength * Z(A_branch) and leaves every earlier layer (the first one in the same block included) alone."""
    model = models["sdxl"]
    unet = model.model.diffusion_model
    chosen = ("input", 5, 1)
    branch = train_acp(branch_for(model, acp_attention=attention, acp_blocks=(chosen,)))
    assert [k for k, _ in zip(branch.acp_keys, branch.attention_control_points)] == [chosen]
    seen_out = []
    x, ctx, y = call_inputs("sdxl")
    order = transformer_block_keys(branch.config)
    seen, handles = _next_norm_inputs(unet, attention)
    try:
        forward(model, x, 3.0, ctx, y=y)
        base = dict(seen)
        forward(patched(model, branch, "sdxl", strength=0.8, observer=seen_out.append), x, 3.0, ctx, y=y)
    finally:
        for h in handles:
            h.remove()
    for key in order[:order.index(chosen)]:
        assert torch.equal(seen[key], base[key]), key
    feature = seen_out[0].extras["acp"].features[chosen]
    torch.testing.assert_close(seen[chosen] - base[chosen], 0.8 * feature, atol=1e-5, rtol=1e-5)
    assert feature.abs().max() > 1e-2


def test_strength_scales_the_attention_control_and_zero_is_identity(models):
    model = models["sd15"]
    branch = train_acp(branch_for(model))
    x, ctx, _ = call_inputs("sd15")
    base = forward(model, x, 3.0, ctx)
    assert torch.equal(forward(patched(model, branch, "sd15", strength=0.0), x, 3.0, ctx), base)
    out = forward(patched(model, branch, "sd15", strength=1.0), x, 3.0, ctx)
    assert not torch.allclose(out, base, atol=1e-4)
    assert torch.equal(forward(model, x, 3.0, ctx), base)             # nothing left behind


def test_branch_reads_the_local_prompt_on_conditional_rows_only(models):
    """Changing the local prompt changes the branch's attention features of the conditional rows, wherever they are
    in the batch; the unconditional rows read the negative prompt and stay as they were."""
    model = models["sd15"]
    branch = train_acp(branch_for(model))
    x, ctx, _ = call_inputs("sd15")
    first, other = branch_context("sd15", seed=4), branch_context("sd15", seed=4)
    other[COND] = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(9))
    for order in ((0, 1), (1, 0)):
        outs = []
        for context in (first, other):
            seen = []
            forward(patched(model, branch, "sd15", observer=seen.append, context=context), x, 3.0, ctx,
                    cond_or_uncond=order)
            outs.append(seen[0].extras["acp"].features[("input", 1, 0)])
        cond_row, uncond_row = order.index(COND), order.index(UNCOND)
        assert torch.equal(outs[0][uncond_row], outs[1][uncond_row])
        assert not torch.allclose(outs[0][cond_row], outs[1][cond_row], atol=1e-5)


def test_shared_injection_path_matches_the_sampling_hooks(models):
    """inject_residuals (what training calls) gives the same UNet output as the sampling wrapper, ACP included."""
    model = models["sd15"]
    unet = model.model.diffusion_model
    branch = train_acp(branch_for(model))
    x, ctx, _ = call_inputs("sd15", batch=1)
    seen = []
    cond = conditioning("sd15")
    via_hooks = forward(patched(model, branch, "sd15", strength=0.6, observer=seen.append), x, 3.0, ctx,
                        cond_or_uncond=(0,))
    ms, sigma = model.model.model_sampling, torch.tensor([3.0])
    xc, t = ms.calculate_input(sigma, x), ms.timestep(sigma).float()
    with torch.inference_mode():
        out = branch(xc, cond.masked_latent, cond.keep_mask, t, cond.context[COND], None)
        with inject_residuals(unet, out, 0.6, {"cond_or_uncond": [0]}) as options:
            eps = unet(xc, t, ctx, transformer_options=options)
    expected = ms.calculate_denoised(sigma, eps.float(), x)
    torch.testing.assert_close(via_hooks, expected, atol=1e-5, rtol=1e-5)


def test_file_round_trip_through_the_loader(models, tmp_path):
    """Contract section 3: safetensors + kind/config metadata; BrushBranchLoader rebuilds the same branch."""
    from faithful_inpaint.patching.brush_branch import load_branch

    model = models["sd15"]
    branch = train_acp(branch_for(model, acp_blocks=(("input", 3, 0), ("output", 4, 0))))
    path = tmp_path / "painternet.safetensors"
    save_file({k: v.detach().contiguous() for k, v in branch.state_dict().items()}, str(path),
              metadata={brush_files.META_KIND: "painternet", brush_files.META_CONFIG: branch.config.to_json()})
    loaded = load_branch(str(path))
    module = loaded.patcher.model
    assert loaded.kind.kind == "painternet" and loaded.kind.family == "sd15" and not loaded.kind.public
    assert isinstance(module, PainterNetBranch) and module.config == branch.config
    assert module.config.acp_keys() == [("input", 3, 0), ("output", 4, 0)]
    theirs, ours = module.state_dict(), branch.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert "attention_control_points.1.weight" in ours and "brushnet_up_blocks.7.weight" in ours
    x, ctx, _ = call_inputs("sd15")
    with torch.inference_mode():
        a = branch(x, x, torch.ones(2, 1, 16, 16), torch.tensor([500.0, 500.0]), ctx)
        b = module(x, x, torch.ones(2, 1, 16, 16), torch.tensor([500.0, 500.0]), ctx)
    assert all(torch.equal(a.extras["acp"].features[k], b.extras["acp"].features[k]) for k in a.extras["acp"].features)
    assert all(torch.equal(p, q) for p, q in zip(a.down + a.up + [a.mid], b.down + b.up + [b.mid]))


def test_config_rejects_blocks_the_architecture_lacks():
    base = BranchConfig.tiny("sd15", cross_attention=True)
    with pytest.raises(ValueError, match="no transformer block"):
        PainterNetConfig.of(base, acp_blocks=(("input", 2, 0),))
    with pytest.raises(ValueError, match="transformer_depth"):
        PainterNetConfig.of(BranchConfig.tiny("sd15"))


# --------------------------------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae():
    from faithful_inpaint.devtools.random_models import build_vae

    return build_vae("tiny")


def loaded(branch, kind="painternet", family="sd15"):
    from faithful_inpaint.patching.brush_branch import LoadedBranch

    return LoadedBranch(branch_patcher(branch), brush_files.FileKind(kind, family, branch.config.to_json(), False),
                        f"{kind}.safetensors")


RANDOM_LOCAL, NO_LOCAL, POSITIVE = "random", "none", "positive"


def run_node(model, branch, vae, local=RANDOM_LOCAL, **kw):
    """BrushBranchApply on a 64 px image; ``local``: a 154-token random local prompt, none, or the positive prompt."""
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS["BrushBranchApply"]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 64, 64, 3, generator=g)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.zeros(1, 77, 768), {}]]
    args = dict(strength=1.0, start=0.0, end=1.0)
    if local != NO_LOCAL:
        args["local_prompt"] = positive if local == POSITIVE else [[torch.randn(1, 154, 768, generator=g), {}]]
    args.update(kw)
    with torch.inference_mode():
        out = node.execute(model=model, branch=branch, vae=vae, image=image, mask=mask, positive=positive,
                           negative=negative, **args)
    return out.result, positive, negative


def test_node_without_a_local_prompt_gives_the_branch_the_models_prompts(models, vae):
    """local_prompt is optional: left out, the branch reads the positive / negative the model reads, exactly as
    when the positive prompt is given as the local prompt."""
    model = models["sd15"]
    branch = loaded(train_acp(branch_for(model)))
    outs = []
    for local in (NO_LOCAL, POSITIVE):
        (patched_model, pos, neg, latent), _, _ = run_node(model, branch, vae, local=local)
        noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            outs.append(comfy.sample.sample(patched_model, noise, 1, 5.0, "euler", "normal", pos, neg,
                                            latent["samples"], seed=1, disable_pbar=True))
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


def test_node_patches_a_clone_and_samples_with_a_longer_local_prompt(models, vae):
    """A 154-token local prompt next to a 77-token negative: the branch context is padded the way ComfyUI batches
    prompts, and the patched model samples; the model passed in is left as it was."""
    from comfy.patcher_extension import WrappersMP
    from faithful_inpaint.patching.brush_branch import WRAPPER_KEY

    model = models["sd15"]
    (patched_model, pos, neg, latent), positive, negative = run_node(model, loaded(train_acp(branch_for(model))), vae)
    assert patched_model is not model and pos is positive and neg is negative
    assert WRAPPER_KEY in patched_model.wrappers[WrappersMP.DIFFUSION_MODEL]
    assert WRAPPER_KEY not in model.wrappers.get(WrappersMP.DIFFUSION_MODEL, {})
    assert not model.get_additional_models()
    assert latent["samples"].shape == (1, 4, 8, 8)
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out, base = (comfy.sample.sample(m, noise, 1, 5.0, "euler", "normal", pos, neg, latent["samples"], seed=1,
                                         disable_pbar=True) for m in (patched_model, model))
    assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-4)


@pytest.mark.parametrize("case", ["not painternet", "wrong family", "empty window"])
def test_node_errors_name_the_input(models, vae, case):
    from faithful_inpaint.kernels.mtadiffusion import new_branch as mta_branch
    from faithful_inpaint.patching.errors import NodeInputError

    model = models["sd15"]
    if case == "not painternet":
        with torch.inference_mode():
            other = mta_branch(unet_state_dict_diffusers(model), model.model.model_config.unet_config)
        branch, match = loaded(other, kind="mtadiffusion"), "input 'local_prompt'.*only a PainterNet branch"
    elif case == "wrong family":
        branch, match = loaded(branch_for(model), family="sdxl"), "input 'branch'.*made for SDXL"
    else:
        branch, match = loaded(branch_for(model)), "input 'end'"
    with pytest.raises(NodeInputError, match=match):
        run_node(model, branch, vae, **({"start": 0.5, "end": 0.5} if case == "empty window" else {}))
