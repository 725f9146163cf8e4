"""Inpainting branches that run beside a frozen UNet and add residuals to its hidden states (BrushNet family).

BrushNet (Ju et al. 2024) copies the UNet without its attention layers, widens conv_in to 9 channels
(noisy latent 4 + masked-image latent 4 + mask 1) and puts a zero-initialised 1x1 convolution on every feature the
copy produces: after conv_in and each down resnet / downsampler (SD1.5: 12), after the middle block (1), after each
up resnet and each upsampler (SD1.5: 15). Each of those outputs, times a conditioning scale, is ADDED to the hidden
states of the main UNet at the same place (not to its skips, unlike ControlNet). The branch's up path is a real
decoder with its own skips (from the branch's own down path). PowerPaint v2 ("BrushNet_CA") is the same branch
keeping the cross-attention transformers (task prompts reach it through them).

Module and parameter names follow the public diffusers-format files (``conv_in_condition``, ``time_embedding.linear_1``,
``down_blocks.0.resnets.0.conv1``, ``brushnet_down_blocks.3``, ``brushnet_mid_block``, ``brushnet_up_blocks.14``,
``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` ...), so those files load with strict key matching.

Contract (shared with the other branch families, see ``BranchOutput``)::

    branch(noisy_latent [B,4,h,w], masked_image_latent [B,4,h,w], keep_mask [B,1,h,w], timesteps [B],
           context [B,T,C], y=None [B, adm]) -> BranchOutput(down, mid, up, extras)

keep_mask is 1 on KNOWN pixels (BrushNet's convention). Residuals are returned unscaled; the strength is applied
where they are injected. No ComfyUI import here: the reusable blocks (``ResnetBlock``, ``Downsample``,
``Upsample``, ``TimestepEmbedding``, ``Transformer2D``, ``zero_conv``) serve every branch family of the pack.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

LATENT_CHANNELS = 4
MASK_CHANNELS = 1


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BranchConfig:
    """Shape of a branch; mirrors the UNet it is copied from (ComfyUI's unet_config names where they exist)."""
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    context_dim: int = 768
    adm_in_channels: Optional[int] = None        # SDXL: 2816 (pooled text + size/crop embeddings), else None
    # Cross-attention transformers per level (0 = none). BrushNet: all zero. PowerPaint v2 keeps the UNet's.
    transformer_depth: tuple[int, ...] = (0, 0, 0, 0)
    transformer_depth_middle: int = 0
    num_heads: int = 8                            # used when num_head_channels is -1
    num_head_channels: int = -1                   # SDXL / SD2: 64
    use_linear_in_transformer: bool = False       # SDXL / SD2: linear proj_in / proj_out
    conditioning_channels: int = LATENT_CHANNELS + MASK_CHANNELS   # masked-image latent + mask
    norm_groups: int = 32
    family: str = "sd15"                          # the base family the branch pairs with: "sd15" | "sdxl"

    # ---- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def sd15(cls, cross_attention: bool = False) -> "BranchConfig":
        cfg = cls()
        return cfg.with_cross_attention((1, 1, 1, 0), 1) if cross_attention else cfg

    @classmethod
    def sdxl(cls) -> "BranchConfig":
        return cls(channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2), context_dim=2048, adm_in_channels=2816,
                   transformer_depth=(0, 0, 0), num_heads=-1, num_head_channels=64, use_linear_in_transformer=True,
                   family="sdxl")

    @classmethod
    def tiny(cls, family: str = "sd15", cross_attention: bool = False) -> "BranchConfig":
        """Matches devtools/random_models.py's tiny UNets (same block layout, few channels)."""
        if family == "sd15":
            cfg = cls(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1),
                      transformer_depth=(0, 0, 0), num_heads=4)
            return cfg.with_cross_attention((1, 1, 1), 1) if cross_attention else cfg
        if family == "sdxl":
            cfg = cls(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1), context_dim=2048,
                      adm_in_channels=2816, transformer_depth=(0, 0, 0), num_heads=-1, num_head_channels=64,
                      use_linear_in_transformer=True, family="sdxl")
            return cfg.with_cross_attention((0, 1, 2), 1) if cross_attention else cfg
        raise ValueError(f"unknown family {family!r}; expected 'sd15' or 'sdxl'")

    @classmethod
    def from_unet_config(cls, unet_config: dict, cross_attention: bool = False) -> "BranchConfig":
        """The branch matching a ComfyUI ``unet_config`` (comfy.model_detection's dict)."""
        levels = len(unet_config["channel_mult"])
        nres = unet_config["num_res_blocks"]
        nres = tuple(nres) if isinstance(nres, (list, tuple)) else (nres,) * levels
        # ComfyUI lists transformer_depth per input block (num_res_blocks entries per level).
        td = list(unet_config.get("transformer_depth", [0] * sum(nres)))
        per_level, i = [], 0
        for n in nres:
            per_level.append(max(td[i:i + n], default=0))
            i += n
        cfg = cls(
            model_channels=unet_config["model_channels"],
            channel_mult=tuple(unet_config["channel_mult"]),
            num_res_blocks=nres,
            context_dim=unet_config.get("context_dim") or 768,
            adm_in_channels=unet_config.get("adm_in_channels"),
            transformer_depth=(0,) * levels,
            num_heads=unet_config.get("num_heads", -1),
            num_head_channels=unet_config.get("num_head_channels", -1),
            use_linear_in_transformer=bool(unet_config.get("use_linear_in_transformer", False)),
            family="sdxl" if unet_config.get("context_dim") == 2048 else "sd15",
        )
        if cross_attention:
            cfg = cfg.with_cross_attention(tuple(per_level), int(unet_config.get("transformer_depth_middle", 1)))
        return cfg

    def with_cross_attention(self, depth: tuple[int, ...], middle: int) -> "BranchConfig":
        return replace(self, transformer_depth=tuple(depth), transformer_depth_middle=middle)

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def cross_attention(self) -> bool:
        return any(self.transformer_depth) or self.transformer_depth_middle > 0

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer of ``channels`` width."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    def residual_channels(self) -> tuple[list[int], int, list[int]]:
        """Widths of the (down, mid, up) residuals, in injection order."""
        mc, mult, nres = self.model_channels, self.channel_mult, self.num_res_blocks
        down = [mc]
        for lvl, m in enumerate(mult):
            down += [mc * m] * nres[lvl]
            if lvl < len(mult) - 1:
                down.append(mc * m)
        up = []
        for lvl in reversed(range(len(mult))):
            up += [mc * mult[lvl]] * (nres[lvl] + 1)
            if lvl > 0:
                up.append(mc * mult[lvl])
        return down, mc * mult[-1], up

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BranchConfig":
        data = json.loads(text)
        for k in ("channel_mult", "num_res_blocks", "transformer_depth"):
            if k in data:
                data[k] = tuple(data[k])
        return cls(**data)


@dataclass
class BranchOutput:
    """What a branch hands to the injection: unscaled residuals in injection order, plus family-specific extras.

    down: one per UNet input block (ComfyUI's input_blocks order), added to the hidden states after that block.
    mid: added after the middle block. up: one per up-path resnet(+attention) output and per upsampler output,
    diffusers order. extras: e.g. attention features (PainterNet) or an edge map (MTADiffusion).
    """
    down: list[torch.Tensor]
    mid: torch.Tensor
    up: list[torch.Tensor]
    extras: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Reusable blocks (diffusers parameter names)
# --------------------------------------------------------------------------------------------------------------------

def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosines first (diffusers' flip_sin_to_cos=True, shift 0 == ComfyUI's / LDM's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None].to(h.dtype)
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


def zero_conv(ch: int) -> nn.Conv2d:
    """1x1 convolution initialised to zero: a new branch starts by adding nothing (BrushNet / ControlNet)."""
    conv = nn.Conv2d(ch, ch, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (to_q, to_k, to_v, to_out.0)."""

    def __init__(self, dim: int, context_dim: Optional[int], heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.0 = GEGLU, net.1 = dropout (no parameters), net.2 = output projection: diffusers' indices.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """Spatial transformer (diffusers Transformer2DModel): norm, proj_in, transformer_blocks, proj_out, residual."""

    def __init__(self, ch: int, context_dim: Optional[int], depth: int, heads: int, head_dim: int, linear: bool,
                 groups: int = 32, out_channels: Optional[int] = None):
        super().__init__()
        inner = heads * head_dim
        self.linear = linear
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if linear else nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, context_dim, heads, head_dim) for _ in range(depth)])
        out = out_channels or ch
        self.proj_out = nn.Linear(inner, out) if linear else nn.Conv2d(inner, out, 1)

    def attend(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        """norm, proj_in, the blocks, proj_out: what the transformer adds to ``x`` ([B, out_channels, h, w])."""
        h, w = x.shape[-2:]
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = rearrange(y, "b c h w -> b (h w) c")
        if self.linear:
            y = self.proj_in(y)
        for blk in self.transformer_blocks:
            y = blk(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = rearrange(y, "b (h w) c -> b c h w", h=h, w=w)
        if not self.linear:
            y = self.proj_out(y)
        return y

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + self.attend(x, context)


# --------------------------------------------------------------------------------------------------------------------
# The branch
# --------------------------------------------------------------------------------------------------------------------

class _Level(nn.Module):
    """One resolution level of the branch: resnets, optional transformers, optional down/upsampler."""

    def __init__(self, resnets, attentions, sampler_name: Optional[str], sampler: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        else:
            self.attentions = None
        self.sampler_name = sampler_name
        if sampler_name:
            setattr(self, sampler_name, nn.ModuleList([sampler]))

    @property
    def sampler(self) -> Optional[nn.Module]:
        return getattr(self, self.sampler_name)[0] if self.sampler_name else None


class BrushBranch(nn.Module):
    """BrushNet (attention-free) or PowerPaint v2 / BrushNet_CA (with cross-attention), by ``config``."""

    def __init__(self, config: BranchConfig):
        super().__init__()
        self.config = cfg = config
        mc, temb = cfg.model_channels, cfg.time_embed_dim
        g = cfg.norm_groups
        # BrushNetModel's name for its 9-channel input conv (the key in the public files).
        self.conv_in_condition = nn.Conv2d(LATENT_CHANNELS + cfg.conditioning_channels, mc, 3, padding=1)
        self.time_embedding = TimestepEmbedding(mc, temb)
        if cfg.adm_in_channels:
            self.add_embedding = TimestepEmbedding(cfg.adm_in_channels, temb)

        def transformers(ch, depth, n):
            if not depth:
                return None
            heads, hd = cfg.heads_for(ch)
            return [Transformer2D(ch, cfg.context_dim, depth, heads, hd, cfg.use_linear_in_transformer, g)
                    for _ in range(n)]

        levels = len(cfg.channel_mult)
        self.down_blocks = nn.ModuleList()
        ch = mc
        for lvl, m in enumerate(cfg.channel_mult):
            out = mc * m
            n = cfg.num_res_blocks[lvl]
            resnets = [ResnetBlock(ch if i == 0 else out, out, temb, g) for i in range(n)]
            last = lvl == levels - 1
            self.down_blocks.append(_Level(resnets, transformers(out, cfg.transformer_depth[lvl], n),
                                           None if last else "downsamplers", None if last else Downsample(out)))
            ch = out
        top = mc * cfg.channel_mult[-1]
        self.mid_block = _Level([ResnetBlock(top, top, temb, g), ResnetBlock(top, top, temb, g)],
                                transformers(top, cfg.transformer_depth_middle, 1), None, None)

        down_ch, _, up_ch = cfg.residual_channels()
        skips = list(down_ch)
        self.up_blocks = nn.ModuleList()
        for lvl in reversed(range(levels)):
            out = mc * cfg.channel_mult[lvl]
            n = cfg.num_res_blocks[lvl] + 1
            resnets = []
            for _ in range(n):
                resnets.append(ResnetBlock(ch + skips.pop(), out, temb, g))
                ch = out
            first = lvl == 0
            self.up_blocks.append(_Level(resnets, transformers(out, cfg.transformer_depth[lvl], n),
                                         None if first else "upsamplers", None if first else Upsample(out)))

        self.brushnet_down_blocks = nn.ModuleList([zero_conv(c) for c in down_ch])
        self.brushnet_mid_block = zero_conv(top)
        self.brushnet_up_blocks = nn.ModuleList([zero_conv(c) for c in up_ch])

    # ---- construction from a base UNet -----------------------------------------------------------------------
    @classmethod
    def from_unet(cls, unet_state_dict: dict, config: BranchConfig) -> "BrushBranch":
        """A new branch initialised from a base UNet (diffusers key names), as BrushNet's training starts.

        Every branch parameter whose name and shape exist in the UNet is copied (the attention-free branch simply
        has no attention keys; the branch's mid block takes the UNet's two mid resnets). The input conv gets the
        UNet's conv_in weights (its first 4 input channels: the noisy latent) on both the noisy-latent and the
        masked-image-latent channels and zero on the mask channel, as BrushNet's from_unet does; every zero-conv
        stays zero, so the new branch adds nothing until trained.
        """
        branch = cls(config)
        own = branch.state_dict()
        with torch.no_grad():
            for name, p in own.items():
                if name.startswith(("brushnet_", "conv_in_condition.")):
                    continue
                src = unet_state_dict.get(name)
                if src is not None and tuple(src.shape) == tuple(p.shape):
                    p.copy_(src.to(p.dtype))
            w = unet_state_dict["conv_in.weight"][:, :LATENT_CHANNELS]
            conv = branch.conv_in_condition
            conv.weight.zero_()
            conv.weight[:, :LATENT_CHANNELS].copy_(w)
            conv.weight[:, LATENT_CHANNELS:2 * LATENT_CHANNELS].copy_(w)
            conv.bias.copy_(unet_state_dict["conv_in.bias"])
        return branch

    # ---- forward ---------------------------------------------------------------------------------------------
    def embed_time(self, timesteps: torch.Tensor, y: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        emb = self.time_embedding(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.adm_in_channels:
            if y is None:
                raise ValueError("this branch pairs with an SDXL UNet and needs its y (adm) vector")
            emb = emb + self.add_embedding(y.to(dtype))
        return emb

    def forward(self, noisy_latent: torch.Tensor, masked_image_latent: torch.Tensor, keep_mask: torch.Tensor,
                timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None) -> BranchOutput:
        dtype = self.conv_in_condition.weight.dtype
        x = torch.cat([noisy_latent, masked_image_latent, keep_mask], dim=1).to(dtype)
        if context is not None:
            context = context.to(dtype)
        emb = self.embed_time(timesteps, y, dtype)

        h = self.conv_in_condition(x)
        feats = [h]
        for level in self.down_blocks:
            for i, res in enumerate(level.resnets):
                h = res(h, emb)
                if level.attentions is not None:
                    h = level.attentions[i](h, context)
                feats.append(h)
            if level.sampler is not None:
                h = level.sampler(h)
                feats.append(h)

        mid = self.mid_block
        h = mid.resnets[0](h, emb)
        if mid.attentions is not None:
            h = mid.attentions[0](h, context)
        h = mid.resnets[1](h, emb)
        mid_out = h

        skips = list(feats)
        ups = []
        for level in self.up_blocks:
            for i, res in enumerate(level.resnets):
                h = res(torch.cat([h, skips.pop()], dim=1), emb)
                if level.attentions is not None:
                    h = level.attentions[i](h, context)
                ups.append(h)
            if level.sampler is not None:
                h = level.sampler(h, size=tuple(skips[-1].shape[-2:]))
                ups.append(h)

        return BranchOutput(
            down=[conv(f) for conv, f in zip(self.brushnet_down_blocks, feats)],
            mid=self.brushnet_mid_block(mid_out),
            up=[conv(f) for conv, f in zip(self.brushnet_up_blocks, ups)],
        )


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------

def keep_mask_at(regenerate_mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """BrushNet's mask channel from a [B, H, W] or [B, 1, H, W] mask with 1 = regenerate: 1 = known, at h x w.

    The reference resizes the binary mask to latent size with nearest-neighbour interpolation.
    """
    m = regenerate_mask if regenerate_mask.dim() == 4 else regenerate_mask[:, None]
    m = F.interpolate(m.float(), size=(height, width), mode="nearest")
    return 1.0 - (m > 0.5).float()


def masked_image(image: torch.Tensor, regenerate_mask: torch.Tensor) -> torch.Tensor:
    """The image the branch sees: [B, H, W, 3] in [0, 1] with the region to regenerate set to black (the reference
    multiplies the image by the inverted binary mask before VAE encoding)."""
    m = regenerate_mask if regenerate_mask.dim() == 3 else regenerate_mask[:, 0]
    m = F.interpolate(m[:, None].float(), size=image.shape[1:3], mode="nearest")[:, 0]
    return image * (1.0 - (m > 0.5).float())[..., None].to(image.dtype)
