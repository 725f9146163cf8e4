"""The frozen base model a branch trains against, loaded through ComfyUI as a library (devtools/host.py).

Training and sampling share one code path: the UNet is ComfyUI's own ``UNetModel`` from the user's checkpoint,
and the branch's residuals reach it through ``patching.brush_branch.inject_residuals``, the function the
``BrushBranchApply`` node's sampling wrapper calls. Text goes through the checkpoint's CLIP (ComfyUI tokenizer and
encoder), images through its VAE and latent format.

``spec`` names the base:
  * a checkpoint file (``.safetensors`` / ``.ckpt``: SD1.x, SD2.x or SDXL, inpainting or not);
  * a toy-world checkpoint (``toy_world.safetensors``, docs/toy-world.md), recognised by its metadata key
    ``kernels.toy_world.META_KEY`` and loaded like ToyWorldLoader loads it (``patching.toy_world.load_toy_world``):
    ComfyUI's SD1.5 model class at toy size, its SD1 CLIP with the small text encoder, the exact pixel VAE;
  * ``random:<family>[:<size>]`` (family sd15 | sd2 | sdxl, size tiny | full): ComfyUI's architectures with random
    weights (devtools/random_models.py), with a small random VAE for ``tiny``; for tests, benchmarks and dry runs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from faithful_inpaint.kernels import branch_losses as L
from faithful_inpaint.kernels import toy_world as ktw
from faithful_inpaint.patching import brush_branch as pbb
from faithful_inpaint.patching import prompt
from faithful_inpaint.patching.gradients import autograd_weights


def _start_host() -> None:
    """Start the ComfyUI host (devtools/host.py) once per process, before any ``comfy`` import."""
    from faithful_inpaint.devtools import host

    host.start()


def is_toy_checkpoint(path: str) -> bool:
    """A safetensors file carrying the toy world's metadata (written by training/toy_world.py); a toy file of another
    kind counts too, so that loading it names what it is."""
    return ktw.file_kind(path) is not None


@dataclass
class TextBatch:
    context: torch.Tensor                 # [B, T, C]
    actual_tokens: torch.Tensor           # bool [B, T]: word tokens (no SOT / EOT / padding), for ATAL
    pooled: Optional[torch.Tensor]        # [B, P] (SDXL's adm input), else None


class FrozenBase:
    """UNet + CLIP + VAE of one checkpoint, frozen, ready for branch training.

    ``inpaint``: the base must be an SD *inpainting* UNet (9 input channels; ``random:`` specs build one) instead of
    the plain 4-channel UNet a branch trains beside."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0,
                 inpaint: bool = False):
        _start_host()
        self.spec = spec
        self._toy_world = None                  # kernels.toy_world for a toy base: its VAE's mapping, computed directly
        if spec.startswith("random:"):
            from faithful_inpaint.devtools import random_models

            parts = spec.split(":")
            family = parts[1]
            size = parts[2] if len(parts) > 2 else "tiny"
            self.patcher = random_models.build_model(family, size, inpaint=inpaint, seed=seed)
            self.clip = random_models.build_clip(family, seed=seed)
            self.vae = random_models.build_vae(size, seed)
        elif is_toy_checkpoint(spec):
            from faithful_inpaint.patching.toy_world import load_toy_world

            self.patcher, self.clip, self.vae, _ = load_toy_world(spec)
            self._toy_world = ktw
        else:
            import comfy.sd

            self.patcher, self.clip, self.vae, _ = comfy.sd.load_checkpoint_guess_config(
                spec, output_vae=True, output_clip=True)
        base = self.patcher.model
        self.unet_config = dict(base.model_config.unet_config)
        if inpaint and tuple(getattr(base, "concat_keys", ())) != ("mask", "masked_image"):
            raise ValueError(f"{spec}: an SD inpainting checkpoint is needed (9 input channels: noise, mask, "
                             "masked-image latent); this is not one")
        if not inpaint and self.unet_config.get("in_channels", 4) != 4:
            raise ValueError(f"{spec}: a branch trains beside a plain 4-channel UNet (BrushNet's setting); this "
                             f"UNet takes {self.unet_config['in_channels']} input channels (an inpainting model)")
        self.unet = base.diffusion_model
        autograd_weights(self.unet)          # frozen weights autograd can use (random_models' are inference tensors)
        self.unet.requires_grad_(False)
        self.unet.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.latent_format = base.latent_format
        from comfy.model_base import ModelType

        self.prediction = "v" if base.model_type == ModelType.V_PREDICTION else "eps"
        sigmas = base.model_sampling.sigmas.float().cpu()
        self.alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)          # ComfyUI: sigma = sqrt((1 - abar) / abar)
        self.is_sdxl = self.unet_config.get("adm_in_channels") is not None
        self._base = base
        self._text_cache: dict[str, tuple] = {}

    # ---- weights for a new branch -----------------------------------------------------------------------------
    def unet_state_dict_diffusers(self) -> dict:
        return pbb.unet_state_dict_diffusers(self.patcher)

    # ---- text ---------------------------------------------------------------------------------------------------
    def encode_text(self, captions: list[str]) -> TextBatch:
        """Encode with the checkpoint's CLIP; each distinct caption once per process (an LRU of 4,096)."""
        contexts, tokens, pooled = [], [], []
        for text in captions:
            hit = self._text_cache.pop(text, None)
            if hit is None:
                comfy_tokens, _, words = prompt.token_positions(self.clip, text)
                with torch.no_grad():
                    ctx, pool = self.clip.encode_from_tokens(comfy_tokens, return_pooled=True)
                mask = torch.zeros(ctx.shape[1], dtype=torch.bool)
                mask[words] = True
                hit = (ctx[0].detach().clone().float().cpu(), mask,
                       None if pool is None else pool[0].detach().clone().float().cpu())
                if len(self._text_cache) >= 4096:
                    self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[text] = hit
            contexts.append(hit[0])
            tokens.append(hit[1])
            pooled.append(hit[2])
        length = max(c.shape[0] for c in contexts)
        context = torch.stack([_pad_tokens(c, length) for c in contexts]).to(self.device)
        actual = torch.stack([torch.nn.functional.pad(t, (0, length - t.shape[0])) for t in tokens]).to(self.device)
        pool = torch.stack(pooled).to(self.device) if self.is_sdxl else None
        return TextBatch(context, actual, pool)

    def adm(self, text: TextBatch, height: int, width: int) -> Optional[torch.Tensor]:
        """SDXL's y vector (pooled text + original/crop/target sizes = the image size, no crop); None otherwise."""
        if not self.is_sdxl:
            return None
        rows = [self._base.encode_adm(pooled_output=p[None].cpu(), width=width, height=height, crop_w=0, crop_h=0,
                                      target_width=width, target_height=height) for p in text.pooled]
        return torch.cat(rows).to(self.device)

    # ---- images -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the model's (scaled) latents [B, 4, H/8, W/8], float32 on ``device``.

        A toy base's VAE is an exact mapping (8 x 8 block mean, colour mix); it is computed directly here, equal to
        the VAE's output to 1e-4 (tests/test_toy_branch.py): the TAESD network that carries it costs ~0.35 s an
        image on one CPU core, ~11 s for the two encodes of a batch of 16, against ~1 s for the whole branch
        training step on the toy UNet (0.6 s on two cores)."""
        if self._toy_world is not None:
            return self._toy_latents(images).to(self.device)
        return self.latent_format.process_in(self.vae_encode(images)).detach().clone()

    @torch.no_grad()
    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the VAE's own latent (before the latent format's ``process_in``), float32 on
        ``device``; for a toy base its exact mapping, computed directly (see encode_images)."""
        if self._toy_world is not None:
            return self.latent_format.process_out(self._toy_latents(images)).to(self.device)
        return self.vae.encode(images.permute(0, 2, 3, 1).float().cpu()).float().to(self.device)

    def _toy_latents(self, images: torch.Tensor) -> torch.Tensor:
        cells = torch.nn.functional.avg_pool2d(images.float().cpu(), self._toy_world.CELL_PIXELS)
        return self._toy_world.cells_to_latent(cells)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> [B, 3, H, W] images in [0, 1] on the CPU (a toy base: its VAE's mapping, see encode_images)."""
        if self._toy_world is not None:
            cells = self._toy_world.latent_to_cells(latents.float().cpu())
            p = self._toy_world.CELL_PIXELS
            return cells.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        raw = self.latent_format.process_out(latents.float().cpu())
        return self.vae.decode(raw).float().permute(0, 3, 1, 2).clamp(0, 1).detach().clone()

    # ---- the diffusion objective --------------------------------------------------------------------------------
    def noise_latents(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, timesteps, x_t): fresh Gaussian noise, uniform timesteps, and ``x0`` noised to them."""
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), device=x0.device)
        return noise, t, L.add_noise(x0, noise, t, self.alphas_cumprod)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet learns to output at ``t``: the noise (eps models) or v (v-prediction models)."""
        return L.training_target(x0, noise, t, self.alphas_cumprod, self.prediction)

    # ---- the UNet with a branch --------------------------------------------------------------------------------
    def unet_forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                     y: Optional[torch.Tensor], branch_output=None, strength: float = 1.0) -> torch.Tensor:
        """One UNet call (eps or v output) with the branch injected through the nodes' own path
        (``patching.brush_branch.inject_residuals``: residuals and, for PainterNet, attention control points)."""
        x = x_t.to(self.dtype)
        kwargs = {"context": context.to(self.dtype), "y": None if y is None else y.to(self.dtype)}
        options = {}
        if branch_output is None:
            return self.unet(x, timesteps.float(), transformer_options=options, **kwargs)
        inject = pbb.inject_residuals
        with inject(self.unet, branch_output, strength, options) as patched:
            return self.unet(x, timesteps.float(), transformer_options=patched, **kwargs)

    def checkpoint_blocks(self) -> int:
        """Gradient checkpointing on the frozen UNet's blocks; returns how many blocks were wrapped.

        Input blocks and the middle block, and output blocks without an Upsample (the injection adds a residual
        inside those through a forward pre-hook that exists only during the call, so recomputing them in the
        backward pass would miss it). Each wrapped call runs on its own copy of transformer_options, taken when
        the block is entered, so a recomputation sees the same block ids and patches as the original call.
        """
        from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

        blocks = list(self.unet.input_blocks) + [self.unet.middle_block]
        blocks += [b for b in self.unet.output_blocks if not isinstance(b[-1], Upsample)]
        return checkpoint_blocks(blocks)


def checkpoint_blocks(blocks) -> int:
    """Run each of ``blocks`` (a UNet's ``TimestepEmbedSequential`` blocks) under gradient checkpointing, with its
    own copy of transformer_options (see :meth:`FrozenBase.checkpoint_blocks`); returns how many were wrapped."""
    blocks = list(blocks)
    for block in blocks:
        block.forward = functools.partial(_checkpointed_block_forward, block.forward)
    return len(blocks)


def _checkpointed_block_forward(forward, x, emb, context=None, transformer_options=None, *args, **kwargs):
    """TimestepEmbedSequential.forward under torch.utils.checkpoint (see FrozenBase.checkpoint_blocks)."""
    if not torch.is_grad_enabled() or transformer_options is None:
        return forward(x, emb, context, transformer_options or {}, *args, **kwargs)
    snapshot = dict(transformer_options)
    after: dict = {}

    def run(x, emb, context):
        options = dict(snapshot)
        out = forward(x, emb, context, options, *args, **kwargs)
        after.update(options)
        return out

    out = torch.utils.checkpoint.checkpoint(run, x, emb, context, use_reentrant=False)
    transformer_options.update(after)
    return out


def _pad_tokens(context: torch.Tensor, length: int) -> torch.Tensor:
    """Pad a [T, C] embedding to ``length`` tokens by repeating its last row (a padding token's embedding)."""
    if context.shape[0] == length:
        return context
    return torch.cat([context, context[-1:].expand(length - context.shape[0], -1)])
