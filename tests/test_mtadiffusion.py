"""MTADiffusion's brush branch on real ComfyUI UNets: self-attention blocks, edge channel, sampling, files."""
import pytest
import torch
from safetensors.torch import save_file

import comfy.sample
from faithful_inpaint.kernels import brush_files
from faithful_inpaint.kernels.brush_branch import BranchConfig
from faithful_inpaint.kernels.mtadiffusion import MTADiffusionBranch, SelfAttention2D, new_branch
from faithful_inpaint.patching.brush_branch import (BranchConditioning, BrushBranchHooks, branch_patcher,
                                                    unet_state_dict_diffusers)
from faithful_inpaint.patching.schedule import ScheduleWindow
from faithful_inpaint.devtools.random_models import build_model

ALWAYS = ScheduleWindow(1e9, 0.0)
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}


@pytest.fixture(scope="module")
def models():
    return {"sd15": build_model("sd15"), "sdxl": build_model("sdxl")}


def branch_for(model):
    with torch.inference_mode():
        return new_branch(unet_state_dict_diffusers(model), model.model.model_config.unet_config)


def conditioning(size=16):
    g = torch.Generator().manual_seed(3)
    keep = torch.ones(1, 1, size, size)
    keep[..., 4:12, 4:12] = 0
    return BranchConditioning(torch.randn(1, 4, size, size, generator=g), keep)


def branch_inputs(family, batch=2, height=16, width=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=g)
    masked = torch.randn(batch, 4, height, width, generator=g)
    keep = torch.ones(batch, 1, height, width)
    keep[..., height // 4:height // 2, :] = 0
    t = torch.full((batch,), 500.0)
    y = torch.randn(batch, 2816, generator=g) if family == "sdxl" else None
    return x, masked, keep, t, None, y


def test_a_self_attention_block_after_every_resnet_at_every_resolution(models):
    branch = branch_for(models["sd15"])
    cfg = branch.config
    for level in list(branch.down_blocks) + [branch.mid_block] + list(branch.up_blocks):
        assert len(level.attentions) == (1 if level is branch.mid_block else len(level.resnets))
        assert all(isinstance(a, SelfAttention2D) for a in level.attentions)
    names = list(branch.state_dict())
    assert not any(".attn2." in n for n in names)                         # no text: self-attention only
    assert sum(".attn1.to_q.weight" in n for n in names) == sum(cfg.num_res_blocks) * 2 + len(cfg.num_res_blocks) + 1
    # Where the UNet has attention at the same place, the new branch starts from its self-attention weights.
    unet = unet_state_dict_diffusers(models["sd15"])
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(branch.state_dict()[key], unet[key])
    edge_proj = "up_blocks.2.attentions.1.proj_out.weight"
    assert branch.state_dict()[edge_proj].shape[0] == unet[edge_proj].shape[0] + 1
    assert torch.equal(branch.state_dict()[edge_proj][:-1], unet[edge_proj])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("size", [(16, 16), (15, 21)])
def test_edge_channel_at_latent_resolution_and_not_injected(models, family, size):
    branch = branch_for(models[family])
    inputs = branch_inputs(family, 2, *size)
    with torch.inference_mode():
        out = branch(*inputs)
        edge = out.extras["edge"]
        assert edge.shape == (2, 1, *size) and torch.isfinite(edge).all()
        assert branch.edge_block.side_output is None                     # nothing kept on the module
        # The edge row of the widened projection feeds the edge map only, never the residuals.
        proj = branch.edge_block.proj_out
        proj.weight[-1].add_(1.0)
        again = branch(*inputs)
    assert not torch.allclose(again.extras["edge"], edge)
    assert all(torch.equal(a, b) for a, b in zip(out.down + out.up + [out.mid], again.down + again.up + [again.mid]))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_untrained_branch_leaves_sampling_unchanged(models, family):
    model = models[family]
    seen = []
    g = torch.Generator().manual_seed(0)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    positive = [[torch.randn(1, 77, CONTEXT_DIM[family], generator=g), dict(extra)]]
    negative = [[torch.zeros(1, 77, CONTEXT_DIM[family]), dict(extra)]]
    latent = torch.randn(1, 4, 16, 16, generator=g)
    clone = model.clone()
    BrushBranchHooks(branch_patcher(branch_for(model)), conditioning(), 1.0, ALWAYS,
                     observer=seen.append).install(clone)

    def run(m):
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
        return comfy.sample.sample(m, noise, 2, 5.0, "euler", "normal", positive, negative, latent, seed=7,
                                   disable_pbar=True)

    base = run(model)
    out = run(clone)
    assert seen and seen[0].extras["edge"].shape == (2, 1, 16, 16)      # cond + uncond rows
    assert torch.equal(out, base)


def test_one_trained_residual_changes_the_unet_from_its_place_on(models):
    """Only down residual 3 is non-zero: input blocks 0-2 are untouched, input block 3 onwards differ."""
    from faithful_inpaint.patching.brush_branch import inject_residuals

    model = models["sd15"]
    unet = model.model.diffusion_model
    branch = branch_for(model)
    with torch.inference_mode():
        conv = branch.brushnet_down_blocks[3]
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
        x, masked, keep, t, _, _ = branch_inputs("sd15")
        ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(5))
        out = branch(x, masked, keep, t)
        seen = {}
        # ComfyUI runs a block's layers one by one (forward_timestep_embed): hook each block's last layer.
        handles = [blk[-1].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.clone()))
                   for i, blk in enumerate(unet.input_blocks)]
        try:
            unet(x, t, ctx, transformer_options={})
            base = dict(seen)
            with inject_residuals(unet, out, 1.0, {}) as options:
                unet(x, t, ctx, transformer_options=options)
        finally:
            for h in handles:
                h.remove()
    # forward hooks see each block's own output (the residual is added after it); block 4 reads the sum.
    assert all(torch.equal(seen[i], base[i]) for i in range(4))
    assert all(not torch.allclose(seen[i], base[i]) for i in range(4, len(unet.input_blocks)))


def test_file_round_trip_through_the_loader(models, tmp_path):
    """Contract section 3: safetensors + kind/config metadata; BrushBranchLoader rebuilds the same branch, and its
    config reads as a plain BranchConfig (what BrushBranchApply checks the residual counts with)."""
    from faithful_inpaint.patching.brush_branch import load_branch

    branch = branch_for(models["sd15"])
    with torch.inference_mode():
        for p in branch.brushnet_up_blocks.parameters():
            p.add_(0.01)
    path = tmp_path / "mta.safetensors"
    save_file({k: v.detach().contiguous() for k, v in branch.state_dict().items()}, str(path),
              metadata={brush_files.META_KIND: "mtadiffusion", brush_files.META_CONFIG: branch.config.to_json()})
    loaded = load_branch(str(path))
    module = loaded.patcher.model
    assert loaded.kind.kind == "mtadiffusion" and not loaded.kind.public
    assert isinstance(module, MTADiffusionBranch) and module.config == branch.config
    assert loaded.kind.branch_config() == branch.config == BranchConfig.from_json(branch.config.to_json())
    theirs, ours = module.state_dict(), branch.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    inputs = branch_inputs("sd15")
    with torch.inference_mode():
        a, b = branch(*inputs), module(*inputs)
    assert torch.equal(a.extras["edge"], b.extras["edge"])
    assert all(torch.equal(p, q) for p, q in zip(a.down + a.up + [a.mid], b.down + b.up + [b.mid]))


def test_refuses_a_cross_attention_config():
    with pytest.raises(ValueError, match="self-attention only"):
        MTADiffusionBranch(BranchConfig.tiny("sd15", cross_attention=True))
