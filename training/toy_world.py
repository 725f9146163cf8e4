"""Train the toy shapes-world model (kernels/toy_world.py) on the pack's training core (training/core.py).

The model is ComfyUI's own SD1.5 UNet class at toy size plus the small text encoder of kernels/toy_world.py,
trained together from scratch with epsilon prediction on SD's beta schedule (the schedule ComfyUI samples SD1.5
with). The latent is the scene itself (kernels/toy_world.cells_to_latent), so no VAE is trained. Two variants:

* ``plain``: a 4-channel text-to-image model (inpaints through ComfyUI's noise mask: SetLatentNoiseMask);
* ``inpaint``: a 9-channel inpainting model trained like SD-inpainting: input = noisy latent, the mask (1 =
  regenerate) and the latent of the image with the masked cells set to grey, exactly what ComfyUI's
  InpaintModelConditioning feeds it.

Captions: 10% empty (for classifier-free guidance); otherwise the global caption ("a red circle and a blue
square") or one object's local caption ("a red circle"), half and half. The inpainting variant masks one object's
box (grown by 1-3 cells) with its local caption half of the time, a random box with the global caption 35% of the
time, and the whole image 15% of the time.

A second recipe, ``--recipe sd-inpaint`` (the default ``objects`` is the one above, which made the shipped files),
trains the way Stable Inpainting was trained: structured backgrounds, random boxes and brush strokes that ignore the
objects, incomplete global captions with background words, and 8 attention heads (RECIPES, SD_UNET_OVERRIDES).

Optimisation (defaults): AdamW through the core, batch 16, 2200 steps, lr 1e-3 after 100 warm-up steps with a cosine
decay to 0 at the last step, Min-SNR-5 loss weighting, and the exported weights are an
exponential moving average (decay 0.995) of the trained ones.

Output: ``<output-dir>/<name>.safetensors`` (UNet under ``model.diffusion_model.``, text encoder under
``text_encoder.``, fp16, configs and the training command in the metadata), which ToyWorldLoader reads from the
repository's ``toy/`` folder. The command that produced the shipped files is in README (toy world section).

    python -m faithful_inpaint.training.toy_world --variant plain --output-dir runs/toy_world   # ~21 min, 2 idle cores
    python -m faithful_inpaint.training.toy_world --evaluate runs/toy_world/toy_world.safetensors   # prompt following
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from faithful_inpaint.kernels import toy_world as tw

from faithful_inpaint.patching import image_prompt as ip
from faithful_inpaint.training.core import CoreConfig, Task, train

# ComfyUI SD15 UNet config of the toy model: 32 x 32 latent, levels 32 / 16 / 8, no attention at 32 x 32 and two
# transformer blocks (4 heads of 16) at 16 x 16, 8 x 8 and in the middle block, so attention carries real weight.
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": tw.DEFAULT_SIZE, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "channel_mult": [1, 2, 2],
    "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 2], "transformer_depth_output": [0, 0, 2, 2, 2, 2],
    "transformer_depth_middle": 2, "context_dim": 768, "num_heads": 4, "num_head_channels": -1,
    "use_linear_in_transformer": False, "use_temporal_attention": False, "use_temporal_resblock": False,
}
TEXT_CONFIG = {"width": 64, "layers": 2, "heads": 4, "context_dim": 768}
VARIANTS = {"plain": 4, "inpaint": 9}
DATASET_SIZE = 1_000_000     # virtual: item k is the scene with seed k (a new scene every time, resumable)

# Training recipes. "objects" (the shipped files): dull backgrounds, one object's box masked with its local caption
# half of the time (the SmartBrush-style cure for prompt neglect). "sd-inpaint": the way Stable Inpainting was
# trained, which is what leaves real models neglecting the prompt: structured backgrounds (kernels/toy_world.
# BACKGROUND_KINDS), random boxes and brush strokes that ignore the objects (random_mask) and incomplete global
# captions with background words (incomplete_caption).
RECIPES = ("objects", "sd-inpaint")
# The sd-inpaint recipe's capacity, aimed at sharper self-attention (the first model's is close to uniform:
# normalised entropy 0.97 at 16 x 16). Same block layout, so every hook and harness entry works unchanged:
# * 8 heads (of 8 channels at 16 x 16 and 8 x 8) instead of 4 of 16: a structured background is copied from a few
#   offsets (one period away along the stripes), and more heads can each specialise on one offset;
# * the text table gains the background words (vocabulary "shapes+backgrounds");
# * the budget goes into steps: SD_RECIPE_STEPS at batch 16 (see toy/README.md for the measured time per step).
SD_UNET_OVERRIDES = {"num_heads": 8}
SD_TEXT_CONFIG = {**TEXT_CONFIG, "vocabulary": "shapes+backgrounds"}
SD_RECIPE_STEPS = 4500


def unet_config(variant: str, recipe: str = "objects", **overrides) -> dict:
    recipe_overrides = SD_UNET_OVERRIDES if recipe == "sd-inpaint" else {}
    return {**UNET_CONFIG, "in_channels": VARIANTS[variant], **recipe_overrides, **overrides}


def text_config(recipe: str = "objects") -> dict:
    return SD_TEXT_CONFIG if recipe == "sd-inpaint" else TEXT_CONFIG


def build_unet(config: dict) -> nn.Module:
    """ComfyUI's UNetModel with ``config`` and a standard initialisation (ComfyUI's layers skip initialisation)."""
    from faithful_inpaint.devtools import host

    host.start()
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(config)
    model_config.unet_config.update({"num_heads": config["num_heads"], "num_head_channels": -1})
    unet = model_config.get_model({}).diffusion_model
    for module in unet.modules():
        if isinstance(module, nn.Conv2d):
            nn.Conv2d.reset_parameters(module)     # torch's default; ComfyUI's subclass makes it a no-op
        elif isinstance(module, nn.Linear):
            nn.Linear.reset_parameters(module)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.zeros_(unet.out[-1].weight)      # the last convolution starts at zero, as in SD's own initialisation
    nn.init.zeros_(unet.out[-1].bias)
    return unet


class ToyWorldData(torch.utils.data.Dataset):
    """Item k (= epoch * len + index, the core's key) is the scene with seed ``seed_offset + k`` and its caption
    (and mask for the inpainting variant), all drawn from an RNG seeded by k: a pure function of the key."""

    def __init__(self, variant: str, size: int = tw.DEFAULT_SIZE, seed_offset: int = 0, recipe: str = "objects"):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
        self.variant, self.size, self.seed_offset, self.recipe = variant, size, seed_offset, recipe

    def __len__(self) -> int:
        return DATASET_SIZE

    def __getitem__(self, key: int) -> dict:
        if self.recipe == "sd-inpaint":
            return self._sd_inpaint_item(self.seed_offset + int(key))
        seed = self.seed_offset + int(key)
        scene = tw.make_scene(seed, self.size)
        rng = np.random.default_rng([seed, 1])
        mask = np.zeros((self.size, self.size), bool)
        local = scene.objects[int(rng.integers(len(scene.objects)))] if scene.objects else None
        if self.variant == "inpaint":
            kind = rng.uniform()
            if kind < 0.5 and local is not None:
                mask = tw.dilate(np.pad(np.ones((local.size, local.size), bool),
                                        ((local.top, self.size - local.top - local.size),
                                         (local.left, self.size - local.left - local.size))),
                                 int(rng.integers(1, 4)))
                caption = local.caption
            elif kind < 0.85:
                h, w = (int(v) for v in rng.integers(self.size // 4, self.size * 3 // 4, size=2))
                top, left = int(rng.integers(0, self.size - h + 1)), int(rng.integers(0, self.size - w + 1))
                mask[top:top + h, left:left + w] = True
                caption = scene.caption
            else:
                mask[:] = True
                caption = scene.caption
        else:
            caption = scene.caption if rng.uniform() < 0.5 or local is None else local.caption
        if rng.uniform() < 0.1:
            caption = ""
        return {"cells": torch.from_numpy(scene.cells).permute(2, 0, 1).contiguous(),
                "mask": torch.from_numpy(mask)[None].float(),
                "tokens": torch.tensor(tw.tokenize(caption))}


    def _sd_inpaint_item(self, seed: int) -> dict:
        """The sd-inpaint recipe: a scene on any background kind, a random mask (inpainting variant; none for the
        plain one) and an incomplete global caption, 10% empty (for CFG)."""
        scene = tw.make_scene(seed, self.size, backgrounds=tw.BACKGROUND_KINDS)
        rng = np.random.default_rng([seed, 2])
        if self.variant == "inpaint":
            mask, _ = tw.random_mask(rng, self.size)
        else:
            mask = np.zeros((self.size, self.size), bool)
        caption = tw.incomplete_caption(rng, scene)
        if rng.uniform() < 0.1:
            caption = ""
        return {"cells": torch.from_numpy(scene.cells).permute(2, 0, 1).contiguous(),
                "mask": torch.from_numpy(mask)[None].float(),
                "tokens": torch.tensor(tw.tokenize(caption))}


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class ToyWorldTask(Task):
    """Epsilon prediction on SD's schedule: x_t = sqrt(a_t) z + sqrt(1 - a_t) eps, loss |eps - eps_hat|^2 (the
    UNet's input is exactly ComfyUI's scaled input x / sqrt(sigma^2 + 1) of that x_t, so sampling matches)."""

    def __init__(self, variant: str, seed: int, command: str = "", min_snr_gamma: float = 0.0,
                 size: int = tw.DEFAULT_SIZE, unet_overrides: dict | None = None, recipe: str = "objects"):
        """``size`` (cells per side) and ``unet_overrides`` exist for quick tests; the shipped model uses the
        defaults. ``recipe``: RECIPES (the data, and for "sd-inpaint" its capacity settings)."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
        self.variant, self.seed, self.command, self.min_snr_gamma = variant, seed, command, min_snr_gamma
        self.recipe, self.text_config = recipe, text_config(recipe)
        self.size, self.unet_config = size, unet_config(variant, recipe, **(unet_overrides or {}))
        self.name = {"plain": "toy_world", "inpaint": "toy_world_inpaint"}[variant]
        if recipe == "sd-inpaint":
            self.name = {"plain": "toy_world_sd", "inpaint": "toy_world_sd_inpaint"}[variant]
        torch.manual_seed(seed)
        self.modules = nn.ModuleDict({"unet": build_unet(self.unet_config),
                                      "text": tw.ToyTextEncoder(**self.text_config)})
        self.alphas_cumprod = tw.sd_alphas_cumprod()

    def dataset(self):
        return ToyWorldData(self.variant, self.size, recipe=self.recipe)

    def collate(self, items):
        return collate(items)

    def loss(self, modules: nn.ModuleDict, batch: dict) -> dict:
        z = tw.cells_to_latent(batch["cells"])
        eps = torch.randn_like(z)
        t = torch.randint(0, len(self.alphas_cumprod), (z.shape[0],), device=z.device)
        a = self.alphas_cumprod.to(z.device)[t].view(-1, 1, 1, 1)
        x = a.sqrt() * z + (1 - a).sqrt() * eps
        if self.variant == "inpaint":
            mask = batch["mask"]
            masked = tw.cells_to_latent(batch["cells"] * (1 - mask) + 0.5 * mask)
            x = torch.cat([x, mask, masked], dim=1)
        context, _ = modules["text"](batch["tokens"])
        eps_hat = modules["unet"](x, t.float(), context=context)
        per_sample = (eps_hat - eps).pow(2).mean(dim=(1, 2, 3))
        if self.min_snr_gamma > 0:
            # Min-SNR-gamma weighting (Hang et al. 2023, eq. 6 for epsilon prediction): min(SNR, gamma) / SNR
            # stops the nearly clean timesteps dominating, which speeds up learning of layout and shape.
            snr = a.flatten() / (1 - a.flatten())
            per_sample = per_sample * snr.clamp(max=self.min_snr_gamma) / snr
        return {"loss": per_sample.mean()}

    def export(self, modules: nn.ModuleDict, path: Path) -> Path:
        training = {"seed": self.seed, "command": self.command}
        if self.recipe != "objects":                 # the shipped files' metadata stays as it was
            training["recipe"] = self.recipe
        save_checkpoint(modules["unet"], modules["text"], self.variant, self.unet_config, path, training, self.size,
                        self.text_config)
        return path


def save_checkpoint(unet: nn.Module, text: nn.Module, variant: str, config: dict, path: Path, training: dict,
                    size: int = tw.DEFAULT_SIZE, text_config: dict = TEXT_CONFIG) -> None:
    """The file ToyWorldLoader reads: fp16 weights, configs in the safetensors metadata."""
    from safetensors.torch import save_file

    tensors = {tw.UNET_PREFIX + k: v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({tw.TEXT_PREFIX + k: v.detach().half().contiguous() for k, v in text.state_dict().items()})
    meta = {tw.META_KEY: json.dumps({
        "variant": variant, "unet_config": config, "text_config": text_config,
        "world": {"size": size, "cell_pixels": tw.CELL_PIXELS}, "training": training})}
    save_file(tensors, str(path), metadata=meta)


def fresh_checkpoint(path: Path, variant: str = "plain", seed: int = 0, recipe: str = "objects") -> Path:
    """An untrained (freshly initialised) checkpoint with ``recipe``'s capacity: for tests and for checking a graph
    before training."""
    torch.manual_seed(seed)
    config = unet_config(variant, recipe)
    save_checkpoint(build_unet(config), tw.ToyTextEncoder(**text_config(recipe)), variant, config, path,
                    {"seed": seed, "command": "fresh (untrained)"}, text_config=text_config(recipe))
    return path


def write_clip_vision(path: Path, seed: int = 0, command: str = "") -> Path:
    """The toy CLIP vision file ToyWorldClipVisionLoader reads: patching/toy_world.CLIP_VISION_CONFIG with fixed random
    weights from ``seed`` (a frozen feature extractor, as CLIP is to an image-prompt adapter; nothing is trained)."""
    from safetensors.torch import save_file

    from faithful_inpaint.devtools import host
    from faithful_inpaint.devtools.random_models import randomise

    host.start()
    from faithful_inpaint.patching.toy_world import CLIP_VISION_CONFIG

    model = ip.clip_vision_from_config(CLIP_VISION_CONFIG)
    with torch.no_grad():
        randomise(model.model, seed)
    tensors = {k: v.detach().float().contiguous() for k, v in model.get_sd().items()}
    meta = {tw.META_KEY: json.dumps({"kind": "clip_vision", "clip_vision_config": CLIP_VISION_CONFIG,
                                     "training": {"seed": seed, "command": command}})}
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


@torch.no_grad()
def sample(unet: nn.Module, text: nn.Module, prompts: list[str], seed: int, steps: int = 25, cfg: float = 4.0,
           known: torch.Tensor | None = None, mask: torch.Tensor | None = None, inpaint_model: bool = False):
    """Deterministic DDIM (eta 0) with classifier-free guidance; with ``known`` cells and a ``mask`` (1 = inpaint),
    inpainting as ComfyUI's noise mask does it (the known region re-noised to each step's level) and, for the
    9-channel model, with the mask and the masked image as extra input. Returns colours [B, 3, H, W]."""
    a_bar = tw.sd_alphas_cumprod()
    g = torch.Generator().manual_seed(seed)
    n, size = len(prompts), tw.DEFAULT_SIZE
    x = torch.randn(n, 4, size, size, generator=g)
    context = torch.cat([text(torch.tensor([tw.tokenize(p) for p in prompts]))[0],
                         text(torch.tensor([tw.tokenize("")] * n))[0]])
    z0 = tw.cells_to_latent(known) if known is not None else None
    extra = None
    if inpaint_model:
        masked = tw.cells_to_latent(known * (1 - mask) + 0.5 * mask)
        extra = torch.cat([mask, masked], 1).repeat(2, 1, 1, 1)
    ts = torch.linspace(len(a_bar) - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        a, a_prev = a_bar[t], (a_bar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0))
        if z0 is not None and not inpaint_model:
            x = mask * x + (1 - mask) * (a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(x.shape, generator=g))
        inp = torch.cat([x, x]) if extra is None else torch.cat([torch.cat([x, x]), extra], 1)
        eps_c, eps_u = unet(inp, torch.full((2 * n,), float(t)), context=context).chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    if z0 is not None:
        x = mask * x + (1 - mask) * z0
    return tw.latent_to_cells(x)


def evaluate(unet: nn.Module, text: nn.Module, variant: str, n: int = 60, seed: int = 0) -> dict:
    """Prompt following of a trained model, scored as blobs (kernels/toy_world.score_region): text-to-image of
    "a <colour> <shape>" over the whole image (4-channel model only) and ``n`` inpainting cases (half background,
    half nearby-object dominance). Fractions of samples."""
    unet.eval()
    text.eval()
    rng = np.random.default_rng(seed)
    results = {}
    everywhere = np.ones((tw.DEFAULT_SIZE, tw.DEFAULT_SIZE), bool)
    if variant == "plain":
        wanted = [(tw.COLOUR_NAMES[rng.integers(4)], tw.SHAPES[rng.integers(3)]) for _ in range(n)]
        cells = sample(unet, text, [f"a {c} {s}" for c, s in wanted], seed)
        scores = [tw.score_region(im.permute(1, 2, 0).numpy(), everywhere, c, s) for im, (c, s) in zip(cells, wanted)]
        results["text_to_image"] = {k: float(np.mean([r[k] for r in scores])) for k in ("present", "dominant",
                                                                                        "shape_ok")}
    cases = tw.make_cases(n, seed)
    known = torch.stack([torch.from_numpy(c.scene.cells).permute(2, 0, 1) for c in cases])
    mask = torch.stack([torch.from_numpy(c.mask)[None].float() for c in cases])
    cells = sample(unet, text, [c.prompt for c in cases], seed, known=known, mask=mask,
                   inpaint_model=variant == "inpaint")
    scores = [tw.score_case(im.permute(1, 2, 0).numpy(), c) for im, c in zip(cells, cases)]
    results["inpainting"] = {k: float(np.mean([r[k] for r in scores])) for k in ("present", "dominant", "shape_ok",
                                                                                  "mae")}
    return results


def load_checkpoint(path: str) -> tuple[nn.Module, nn.Module, str]:
    """(UNet, text encoder, variant) from a file written by :func:`save_checkpoint`, in fp32."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()[tw.META_KEY])
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    unet = build_unet(meta["unet_config"])
    unet.load_state_dict({k[len(tw.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(tw.UNET_PREFIX)})
    text = tw.ToyTextEncoder(**meta["text_config"])
    text.load_state_dict({k[len(tw.TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(tw.TEXT_PREFIX)})
    return unet, text, meta["variant"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="plain", choices=sorted(VARIANTS))
    p.add_argument("--recipe", default="objects", choices=RECIPES,
                   help="objects: the shipped files' data (object boxes, local captions); sd-inpaint: Stable "
                        "Inpainting's (random masks, incomplete global captions, structured backgrounds) with its "
                        "capacity settings (SD_UNET_OVERRIDES)")
    p.add_argument("--output-dir", help="where checkpoints, log.jsonl and the exported file go")
    p.add_argument("--evaluate", metavar="FILE", help="only score a trained file (text-to-image and inpainting "
                                                      "prompt following) and exit")
    p.add_argument("--samples", type=int, default=60, help="samples per --evaluate score")
    p.add_argument("--make-clip-vision", metavar="FILE", help="only write the toy CLIP vision encoder (fixed random "
                                                              "weights from --seed) to FILE and exit")
    p.add_argument("--max-steps", type=int, help=f"default 2200 (objects), {SD_RECIPE_STEPS} (sd-inpaint)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup-steps", type=int, default=100)
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"],
                   help="after the warm-up (cosine: decays to 0 at --max-steps)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="0 = plain epsilon MSE")
    p.add_argument("--ema-decay", type=float, default=0.995, help="the exported weights are the average; 0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="scene generation is cheap; 0 keeps both cores "
                                                               "for the model on a 2-core machine")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--resume", default="latest", help="latest | none | a checkpoint folder")
    p.add_argument("--log-every", type=int, default=10)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.evaluate:
        unet, text, variant = load_checkpoint(args.evaluate)
        print(json.dumps(evaluate(unet, text, variant, n=args.samples, seed=args.seed), indent=1))
        return 0
    command = "python -m faithful_inpaint.training.toy_world " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.make_clip_vision:
        print(f"wrote {write_clip_vision(Path(args.make_clip_vision), args.seed, command)}")
        return 0
    if not args.output_dir:
        parser().error("--output-dir is required for training")
    task = ToyWorldTask(args.variant, args.seed, command, args.min_snr_gamma, recipe=args.recipe)
    max_steps = args.max_steps or (SD_RECIPE_STEPS if args.recipe == "sd-inpaint" else 2200)
    config = CoreConfig(output_dir=args.output_dir, max_steps=max_steps, batch_size=args.batch_size,
                        learning_rate=args.lr, lr_warmup_steps=args.lr_warmup_steps, lr_schedule=args.lr_schedule,
                        weight_decay=args.weight_decay, seed=args.seed, num_workers=args.num_workers,
                        checkpoint_every=args.checkpoint_every, resume=args.resume, log_every=args.log_every,
                        ema_decay=args.ema_decay, mixed_precision="no")
    result = train(config, task)
    print(f"exported {result.export} after {result.step} steps ({result.samples_per_second:.1f} samples/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
