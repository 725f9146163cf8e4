"""Train an inpainting branch (BrushNet, PowerPaint, PainterNet, MTADiffusion or a combination) beside a frozen
Stable Diffusion UNet, and export it as a file ``BrushBranchLoader`` loads.

    accelerate launch -m faithful_inpaint.training.train_branch --recipe mtadiffusion --base sd15.safetensors \\
        --data shards/ --output-dir runs/mta --resolution 512 --batch-size 4 --max-steps 200000

One GPU, many GPUs or many machines: the same command (``accelerate config`` / ``accelerate launch`` flags choose
DDP, DeepSpeed or FSDP, the number of processes and mixed precision). Run ``--help`` for every option; recipes and
their defaults are listed in training/recipes.py. A killed run resumes exactly from its newest checkpoint when the
same command is started again.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from faithful_inpaint.kernels import branch_losses as L
from faithful_inpaint.kernels import brush_branch as bb
from faithful_inpaint.kernels import brush_files
from faithful_inpaint.training.core import CoreConfig, Task, add_core_options, core_config_from_args, train
from faithful_inpaint.training.data import MaskPolicy, ShardDataset, collate
from faithful_inpaint.training.recipes import (BRANCHES, LOSS_TERMS, RECIPES, LossContext, parse_losses,
                                              record_cross_attention)

META_RECIPE = "faithful_inpaint.recipe"


class BranchTask(Task):
    def __init__(self, args: argparse.Namespace):
        self.args = args
        recipe = RECIPES[args.recipe]
        self.branch_kind = args.branch or recipe.branch
        if self.branch_kind not in BRANCHES:
            raise ValueError(f"unknown branch {self.branch_kind!r}; known: {sorted(BRANCHES)}")
        self.weights = parse_losses(args.losses, recipe.losses)
        self.options = {"atal_mode": args.atal_mode, "edge_reduction": args.edge_reduction,
                        "vgg_arch": args.vgg_arch, "vgg_weights": args.vgg_weights}
        self.name = f"{args.recipe}-branch"
        self.base = None
        self._validation_items = None

    # ---- core hooks ---------------------------------------------------------------------------------------------
    def setup(self, device: torch.device, frozen_dtype: torch.dtype) -> None:
        from faithful_inpaint.training.base import FrozenBase

        self.base = FrozenBase(self.args.base, device, frozen_dtype, seed=self.args.seed)
        torch.manual_seed(self.args.seed)          # new modules' initialisation is the same on every process
        modules = {"branch": BRANCHES[self.branch_kind].build(self.base, self.options)}
        for term in self.weights:
            for name, factory in LOSS_TERMS[term].modules.items():
                modules[name] = factory(self.options)
        self.modules = nn.ModuleDict(modules).to(device)
        self.modules.train()

    def param_groups(self, learning_rate: float) -> list[dict]:
        lrs = {}
        for term in self.weights:
            lrs.update(LOSS_TERMS[term].module_lr)
        if self.args.vgg_lr is not None:
            lrs["style_vgg"] = self.args.vgg_lr
        groups = []
        for name, module in self.modules.items():
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lrs.get(name, learning_rate)})
        return groups

    def dataset(self):
        a = self.args
        policy = MaskPolicy(object_prob=a.object_prob, invert_prob=a.invert_prob, morph_prob=a.morph_prob,
                            caption_dropout=a.caption_dropout)
        return ShardDataset(a.data, a.resolution, policy, seed=a.seed)

    def collate(self, items):
        return collate(items)

    def enable_gradient_checkpointing(self) -> None:
        self.base.checkpoint_blocks()
        for module in self.modules["branch"].modules():
            if type(module).__name__ in ("ResnetBlock", "Transformer2D"):
                module.forward = _checkpointed(module.forward)

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        images, mask = batch["image"], batch["mask"]
        latents = self.base.encode_images(images)
        masked = bb.masked_image(images.permute(0, 2, 3, 1), mask).permute(0, 3, 1, 2)
        masked_latents = self.base.encode_images(masked)
        h, w = latents.shape[-2:]
        text = self.base.encode_text(batch["caption"])
        unet_text = text
        if BRANCHES[self.branch_kind].unet_prompt == "global":
            unet_text = self.base.encode_text(batch["global_caption"])
        return {"images": images, "mask": mask, "latents": latents, "masked_latents": masked_latents,
                "keep": bb.keep_mask_at(mask, h, w).to(latents.device), "context": text.context,
                "actual_tokens": text.actual_tokens, "unet_context": unet_text.context,
                "y": self.base.adm(unet_text, *images.shape[-2:])}

    def loss(self, modules: nn.ModuleDict, batch: dict) -> dict:
        base = self.base
        x0 = batch["latents"]
        noise, t, x_t = base.noise_latents(x0)
        attention: list = []
        record = any(LOSS_TERMS[n].needs_attention for n in self.weights)
        with (record_cross_attention(modules["branch"], attention) if record else _nothing()):
            out = modules["branch"](x_t, batch["masked_latents"], batch["keep"], t, batch["context"], batch["y"])
        pred = base.unet_forward(x_t, t, batch["unet_context"], batch["y"], out)
        ctx = LossContext(base=base, images=batch["images"], mask=batch["mask"], latents=x0, noise=noise,
                          timesteps=t, noisy=x_t, model_output=pred.float(),
                          target=base.training_target(x0, noise, t),
                          branch_output=out, actual_tokens=batch["actual_tokens"], cross_attention=attention,
                          options=self.options)
        terms = {name: LOSS_TERMS[name].compute(ctx, modules) for name in self.weights}
        total = sum(self.weights[n] * v for n, v in terms.items())
        return {"loss": total, **terms}

    def validate(self, modules: nn.ModuleDict, step: int, folder: Path) -> Optional[Path]:
        a = self.args
        if a.num_validation <= 0:
            return None
        if self._validation_items is None:          # the first samples of epoch 0: the same ones every time
            data = self.dataset()
            self._validation_items = [data[i] for i in range(min(a.num_validation, len(data)))]
        items = self._validation_items
        batch = self.prepare({k: v.to(self.base.device) if torch.is_tensor(v) else v
                              for k, v in collate(items).items()})
        result = sample(self.base, modules["branch"], batch, a.validation_steps, a.seed)
        images = batch["images"].cpu()
        keep = 1 - batch["mask"].cpu()
        shown = images * keep + 0.5 * (1 - keep)
        path = folder / f"step-{step:08d}.png"
        save_grid([shown, result, images], path)
        return path

    def export(self, modules: nn.ModuleDict, path: Path) -> Path:
        return export_branch(modules["branch"], self.branch_kind, path, self.args.recipe, self.weights,
                             self.args.export_dtype)


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def sample(base, branch: nn.Module, batch: dict, steps: int, seed: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) with the branch injected; images [B, 3, H, W] in [0, 1] on the CPU.

    The known region is not pasted back: the grid shows what the branch makes of it."""
    x0 = batch["latents"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x0.shape, generator=gen).to(x0.device)
    abar = base.alphas_cumprod
    ts = np.linspace(len(abar) - 1, 0, steps).round().astype(int)
    for i, t_int in enumerate(ts):
        t = torch.full((x.shape[0],), int(t_int), device=x.device, dtype=torch.long)
        out = branch(x, batch["masked_latents"], batch["keep"], t, batch["context"], batch["y"])
        pred = base.unet_forward(x, t, batch["unet_context"], batch["y"], out).float()
        eps, x0_hat = L.eps_and_x0(pred, x, t, abar, base.prediction)
        a_prev = abar[int(ts[i + 1])].item() if i + 1 < len(ts) else 1.0
        x = a_prev ** 0.5 * x0_hat + (1 - a_prev) ** 0.5 * eps
    return base.decode_latents(x)


def save_grid(columns: list[torch.Tensor], path: Path) -> None:
    """One row per sample, one column per tensor ([B, 3, H, W] in [0, 1], resized to the first's size)."""
    h, w = columns[0].shape[-2:]
    cols = [torch.nn.functional.interpolate(c.float(), size=(h, w), mode="bilinear", align_corners=False)
            if c.shape[-2:] != (h, w) else c.float() for c in columns]
    grid = torch.cat([torch.cat(list(c), dim=2) for c in zip(*cols)], dim=1)      # rows of [3, H, W * cols]
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def export_branch(branch: nn.Module, kind: str, path: Path, recipe: str, losses: dict,
                  dtype: str = "fp32") -> Path:
    """The pack's branch file (docs/brush-branches.md): diffusers-style keys of the branch module, metadata kind,
    config (the branch config JSON) and ``faithful_inpaint.recipe`` (how it was trained)."""
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    brush_files.save_branch_file(path, branch.state_dict(), kind, branch.config.to_json(), dtype=torch_dtype,
                                 metadata={META_RECIPE: json.dumps({"recipe": recipe, "losses": losses})})
    return Path(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--recipe", default="brushnet", choices=sorted(RECIPES))
    g.add_argument("--branch", default=None, choices=sorted(BRANCHES), help="override the recipe's branch")
    g.add_argument("--losses", default=None, help="override the recipe's losses, e.g. 'noise=1,atal=0.05'")
    g.add_argument("--base", required=True,
                   help="the frozen base: a SD1.x/SD2.x/SDXL checkpoint file, or random:<sd15|sd2|sdxl>[:tiny|full]")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="folder of *.tar shards (format: training/data.py)")
    g.add_argument("--resolution", type=int, default=512)
    g.add_argument("--object-prob", type=float, default=0.5, help="share of object (local-caption) masks")
    g.add_argument("--invert-prob", type=float, default=0.5, help="inverted random masks (BrushNet: 0.5)")
    g.add_argument("--morph-prob", type=float, default=0.3, help="eroded/dilated masks (BrushNet: 0.3)")
    g.add_argument("--caption-dropout", type=float, default=0.1)
    optimisation = p.add_argument_group("optimisation")
    checkpoints = p.add_argument_group("checkpoints, validation, export")
    add_core_options(optimisation, checkpoints, max_steps=10000, lr=None,
                     lr_help="branch learning rate (default: the recipe's)")
    optimisation.add_argument("--vgg-lr", type=float, default=None,
                              help="style VGG learning rate (default 1e-7, paper)")
    checkpoints.add_argument("--validate-every", type=int, default=0, help="0: only at the end")
    checkpoints.add_argument("--num-validation", type=int, default=4)
    checkpoints.add_argument("--validation-steps", type=int, default=20)
    g = p.add_argument_group("loss options")
    g.add_argument("--atal-mode", default="outside_mass", choices=["outside_mass", "mse"])
    g.add_argument("--edge-reduction", default="sum", choices=["sum", "mean"])
    g.add_argument("--vgg-arch", default="vgg16", choices=["vgg16", "vgg19"])
    g.add_argument("--vgg-weights", default=None,
                   help="a torchvision VGG state dict (.pth) for the style loss; default: random initialisation")
    return p


def core_config(args: argparse.Namespace) -> CoreConfig:
    lr = args.lr if args.lr is not None else RECIPES[args.recipe].learning_rate
    return core_config_from_args(args, learning_rate=lr, validate_every=args.validate_every)

def main(argv=None, callbacks: tuple = ()):
    args = parser().parse_args(argv)
    return train(core_config(args), BranchTask(args), callbacks)


if __name__ == "__main__":
    main()
