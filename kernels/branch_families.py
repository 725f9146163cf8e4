"""One record per branch family (BrushNet, PowerPaint v2, PainterNet, MTADiffusion): the one place to edit when a
family is added (docs/brush-branches.md, "Adding a branch family").

Every table that used to list the families is derived from :data:`FAMILIES`: the labels and the config parsing of
kernels/brush_files.py, the loader's factories (patching/brush_branch.py), the training architectures
(training/recipes.py), the smoke files (devtools/smoke_checkpoints.py) and what BrushBranchApply offers each family
(nodes/brush_branch.py). Only format facts live here (no ComfyUI): how the smoke files' public layouts are read off
ComfyUI's UNet stays in devtools/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from faithful_inpaint.kernels import mtadiffusion, painternet
from faithful_inpaint.kernels.brush_branch import BranchConfig, BrushBranch


@dataclass(frozen=True)
class SmokeFile:
    """A random-weight file of the family (devtools/smoke_checkpoints.py): its smoke kind, its file name in
    models/inpaint, the base family it is made for, and its layout revision (bump to regenerate cached files)."""
    name: str
    filename: str
    base: str = "sd15"
    revision: int = 1


@dataclass(frozen=True)
class BranchFamily:
    kind: str                                     # file metadata ``faithful_inpaint.kind``, training ``--branch``
    label: str                                    # "BrushNet" (node messages add the base: "BrushNet SD1.5")
    module: type                                  # the nn.Module class (BrushBranch or a subclass)
    config: type = BranchConfig                   # its config class (``from_json`` parses a file's config)
    config_for: Callable[[dict], BranchConfig] = BranchConfig.from_unet_config   # base unet_config -> config
    # Public files, recognised by structure (no metadata): base family -> the preset config. {}: own files only.
    public: dict = field(default_factory=dict)
    smoke: tuple[SmokeFile, ...] = ()
    task_prompt: bool = False                     # takes a PowerPaint task (through PowerPaint's text encoder)
    attention_control: bool = False               # has attention control points (PainterNet's ACPs)
    local_prompt: bool = False                    # the branch reads a local prompt, the UNet the global one

    def parse_config(self, config_json: str) -> BranchConfig:
        return self.config.from_json(config_json)

    def build(self, config_json: str) -> nn.Module:
        """The (untrained) branch a file's config describes; the loader fills in the weights."""
        return self.module(self.parse_config(config_json))

    def new_branch(self, unet_state_dict: dict, unet_config: dict) -> nn.Module:
        """A new branch for a base UNet (ComfyUI unet_config, diffusers-named weights), as training starts."""
        return self.module.from_unet(unet_state_dict, self.config_for(unet_config))


def _cross_attention_config(unet_config: dict) -> BranchConfig:
    return BranchConfig.from_unet_config(unet_config, cross_attention=True)


FAMILIES: tuple[BranchFamily, ...] = (
    BranchFamily("brushnet", "BrushNet", BrushBranch,
                 public={"sd15": BranchConfig.sd15(), "sdxl": BranchConfig.sdxl()},
                 smoke=(SmokeFile("brushnet_sd15", "smoke-random_brushnet_sd15.safetensors", "sd15", revision=2),
                        SmokeFile("brushnet_sdxl", "smoke-random_brushnet_sdxl.safetensors", "sdxl", revision=2))),
    BranchFamily("powerpaint", "PowerPaint v2 (BrushNet_CA)", BrushBranch, config_for=_cross_attention_config,
                 public={"sd15": BranchConfig.sd15(cross_attention=True)},
                 smoke=(SmokeFile("powerpaint_sd15", "smoke-random_powerpaint_v2_brushnet.safetensors"),),
                 task_prompt=True),
    BranchFamily(painternet.KIND, "PainterNet", painternet.PainterNetBranch, painternet.PainterNetConfig,
                 painternet.config_for,
                 smoke=(SmokeFile("painternet_sd15", "smoke-random_painternet_sd15.safetensors"),),
                 attention_control=True, local_prompt=True),
    BranchFamily(mtadiffusion.KIND, "MTADiffusion", mtadiffusion.MTADiffusionBranch, BranchConfig,
                 mtadiffusion.config_for,
                 smoke=(SmokeFile("mtadiffusion_sd15", "smoke-random_mtadiffusion_sd15.safetensors"),)),
)

BY_KIND: dict[str, BranchFamily] = {f.kind: f for f in FAMILIES}
