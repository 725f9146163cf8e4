"""The branch kernels on their own (no ComfyUI): construction from a UNet, config round trip, file classification."""
import pytest
import torch

from faithful_inpaint.kernels import brush_files
from faithful_inpaint.kernels.brush_branch import BranchConfig, BrushBranch, keep_mask_at, masked_image


def unet_like(config: BranchConfig, seed=0) -> dict:
    """A diffusers-named "UNet" state dict holding every tensor the branch copies (random values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in BrushBranch(config).state_dict().items() if not k.startswith("brushnet_")}
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items() if not k.startswith("conv_in_condition")}
    sd["conv_in.weight"] = torch.randn(config.model_channels, 4, 3, 3, generator=g)
    sd["conv_in.bias"] = torch.randn(config.model_channels, generator=g)
    return sd


def test_from_unet_copies_the_unet_and_starts_silent():
    cfg = BranchConfig.tiny("sd15")
    sd = unet_like(cfg)
    branch = BrushBranch.from_unet(sd, cfg)
    own = branch.state_dict()
    for k, v in sd.items():
        if k in own:
            assert torch.equal(own[k], v), k
    w = own["conv_in_condition.weight"]
    assert torch.equal(w[:, :4], sd["conv_in.weight"]) and torch.equal(w[:, 4:8], sd["conv_in.weight"])
    assert not w[:, 8].any() and torch.equal(own["conv_in_condition.bias"], sd["conv_in.bias"])
    out = branch(torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.ones(2, 1, 16, 16),
                 torch.tensor([10.0, 900.0]), None)
    assert all(not r.any() for r in out.down + out.up + [out.mid])


@pytest.mark.parametrize("cfg", [BranchConfig.sd15(), BranchConfig.sd15(cross_attention=True), BranchConfig.sdxl(),
                                 BranchConfig.tiny("sdxl", cross_attention=True)])
def test_config_json_round_trip(cfg):
    assert BranchConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("family,size,preset", [
    ("sd15", "tiny", BranchConfig.tiny("sd15")), ("sdxl", "tiny", BranchConfig.tiny("sdxl")),
    ("sd15", "full", BranchConfig.sd15()), ("sdxl", "full", BranchConfig.sdxl())])
def test_presets_match_the_comfy_unet_configs(family, size, preset):
    from faithful_inpaint.devtools.random_models import unet_config

    cfg = unet_config(family, size)
    assert BranchConfig.from_unet_config(cfg) == preset
    if family == "sd15":
        cross = BranchConfig.sd15(True) if size == "full" else BranchConfig.tiny("sd15", True)
        assert BranchConfig.from_unet_config(cfg, cross_attention=True) == cross


def test_presets_residual_counts():
    assert [len(x) if isinstance(x, list) else 1 for x in BranchConfig.sd15().residual_channels()] == [12, 1, 15]
    assert [len(x) if isinstance(x, list) else 1 for x in BranchConfig.sdxl().residual_channels()] == [9, 1, 11]


def test_classify_by_structure_and_metadata():
    def shapes(cfg):
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in BrushBranch(cfg).state_dict().items()}

    assert brush_files.classify(shapes(BranchConfig.sd15())).label == "BrushNet SD1.5"
    assert brush_files.classify(shapes(BranchConfig.sdxl())).label == "BrushNet SDXL"
    assert brush_files.classify(shapes(BranchConfig.sd15(True))).label == "PowerPaint v2 (BrushNet_CA) SD1.5"
    tiny = BranchConfig.tiny("sdxl")
    own = brush_files.classify({"x": (1,)}, {brush_files.META_KIND: "brushnet", brush_files.META_CONFIG: tiny.to_json()})
    assert (own.family, own.public, own.branch_config()) == ("sdxl", False, tiny)
    with pytest.raises(brush_files.UnknownBranchFile, match="LoRA"):
        brush_files.classify({"lora_unet_down_blocks_0.lora_up.weight": (4, 4)})


def test_mask_and_masked_image_follow_the_reference():
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1                       # ComfyUI: 1 = regenerate
    keep = keep_mask_at(mask, 8, 8)
    assert keep.shape == (1, 1, 8, 8) and keep[0, 0, 4, 4] == 0 and keep[0, 0, 0, 0] == 1
    image = torch.rand(1, 64, 64, 3)
    out = masked_image(image, mask)
    assert not out[:, 16:48, 16:48].any() and torch.equal(out[:, :16], image[:, :16])
