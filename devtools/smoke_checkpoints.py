"""Random-weight model files with the REAL key names and shapes ("smoke models").

THE OUTPUTS ARE RANDOM WEIGHTS: every image made with these files is noise. They exist so that workflows can be run
end to end (smoke mode of the headless runner, tests, benchmarks of speed and memory) on machines that have no
model weights: ComfyUI's own loader nodes (CheckpointLoaderSimple, ControlNetLoader, CLIPVisionLoader ...) read
these files and detect their architecture exactly as they would for the real downloads, because the key names,
shapes and file layout are the real ones.

How the layouts are obtained:
  * checkpoints, ControlNet, CLIP vision: ComfyUI's own classes are instantiated on the ``meta`` device (no memory,
    no time) and asked for the state dict they would save (``BaseModel.state_dict_for_saving``, which applies the
    same key conversions as ``comfy.sd.save_checkpoint``: original LDM layout, ``model.diffusion_model.*``,
    ``cond_stage_model.*`` / ``conditioner.embedders.*``, ``first_stage_model.*``);
  * IP-Adapter and BrushNet (not part of ComfyUI): built from their documented, public layouts; the BrushNet
    branch reuses ComfyUI's diffusers<->LDM key map of the UNet it copies;
  * the pack's own RefineNet file (LAR-Gen): kernels/refinenet.py's format (metadata with its config), the UNet's
    cross-attention shapes taken from ComfyUI's SD1.5 UNet on the ``meta`` device.
Values: one seeded block of Gaussian noise is sliced at a per-key offset, scaled by 1/sqrt(fan_in) for matrices and
convolutions, ~1 for norm weights, ~0 for biases, so forward passes stay finite. Files are float16 and are written
tensor by tensor with a small streaming safetensors writer (memory stays around the largest tensor).

Public API:
  KINDS                                   supported kinds, in priority order
  folder_for(kind) -> str                 ComfyUI models sub-folder ("checkpoints", "controlnet", ...)
  filename_for(kind) -> str               file name inside that folder (as ComfyUI's loader combos list it)
  write_model_file(kind, path, seed=0)    writes one .safetensors file, returns its Path
  write_layout_file(kind, path)           the same keys and shapes with all-zero weights, sparse (no disk)
  ensure_smoke_models(models_dir, kinds)  writes missing files into models_dir/<folder>/, returns {kind: filename}
  default_models_dir() -> Path            <repo>/.smoke/models, or $FAITHFUL_SMOKE_DIR
  register_model_folders(models_dir, kinds)  adds models_dir/<folder> to ComfyUI's folder_paths (in-process hosts)
  layout(kind) -> {key: (shape, dtype)}   the layout of a kind without writing anything

ComfyUI must be importable (``devtools.host.start()``) before any file is generated.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable

import torch

from faithful_inpaint.kernels import branch_families, brush_files
from faithful_inpaint.kernels import refinenet as rn
from faithful_inpaint.devtools.random_models import SD_VAE_DDCONFIG, UNET_CONFIGS
from faithful_inpaint.kernels.brush_branch import BranchConfig

# Bump when a layout or the value recipe changes: cached files with another version are regenerated.
SMOKE_FORMAT_VERSION = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent

_POOL_SIZE = 1 << 22  # 4 Mi random values per seed; larger tensors are tiled from it.


# --------------------------------------------------------------------------------------------------------------------
# Layouts: each builder returns an ordered {key: tensor}; meta tensors are filled with random values when written,
# real (non-meta) tensors such as position_ids are written as they are.
# --------------------------------------------------------------------------------------------------------------------

# UNet configs as comfy.model_detection derives them from the real files, and SD's VAE.
_UNET_SD15, _UNET_SDXL = UNET_CONFIGS["sd15"], UNET_CONFIGS["sdxl"]

# stabilityai/stable-diffusion-x4-upscaler (x4-upscaler-ema): attention on the 3 lower levels, no self-attention
# except on the lowest one, noise-level class embedding (1000 classes), OpenCLIP-H context.
_UNET_X4 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 7, "model_channels": 256, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 1, 1, 1, 1], "channel_mult": [1, 2, 2, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 1024, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], "num_classes": 1000,
    "disable_self_attentions": [True, True, True, False],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _meta_sd(module: torch.nn.Module) -> dict:
    return dict(module.state_dict())


def _vae_sd(ch_mult=(1, 2, 4, 4)) -> dict:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = dict(SD_VAE_DDCONFIG, ch_mult=list(ch_mult))
    with torch.device("meta"):
        return _meta_sd(AutoencoderKL(ddconfig=ddconfig, embed_dim=4))


def _checkpoint_sd(model_config, clip_sd: dict, vae_sd: dict) -> dict:
    """A checkpoint's keys as ComfyUI saves them: the model config's own key conversions for the UNet, CLIP and VAE
    (what ``state_dict_for_saving`` applies; its signature changed after ComfyUI 0.3.75, theirs did not)."""
    # No meta device context here: some model classes build numpy schedules at init (SD_X4Upscaler); the UNet itself
    # honours device="meta".
    model = model_config.get_model({}, device="meta")
    sd = model_config.process_unet_state_dict_for_saving(model.diffusion_model.state_dict())
    sd.update(model_config.process_clip_state_dict_for_saving(clip_sd))
    sd.update(model_config.process_vae_state_dict_for_saving(vae_sd))
    return sd


def _sd15_layout(inpaint: bool) -> dict:
    import comfy.sd1_clip
    import comfy.supported_models as sm

    cfg = dict(_UNET_SD15, in_channels=9 if inpaint else 4)
    with torch.device("meta"):
        clip_sd = _meta_sd(comfy.sd1_clip.SD1ClipModel(device="meta"))
    sd = _checkpoint_sd(sm.SD15(cfg), clip_sd, _vae_sd())
    # Real SD1.5 files carry the CLIP position ids (int64); ComfyUI ignores them, loaders of other tools expect them.
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return sd


def _sdxl_layout() -> dict:
    import comfy.sdxl_clip
    import comfy.supported_models as sm

    with torch.device("meta"):
        clip_sd = _meta_sd(comfy.sdxl_clip.SDXLClipModel(device="meta"))
    return _checkpoint_sd(sm.SDXL(dict(_UNET_SDXL)), clip_sd, _vae_sd())


def _x4_layout() -> dict:
    import comfy.supported_models as sm
    import comfy.text_encoders.sd2_clip

    with torch.device("meta"):
        clip_sd = _meta_sd(comfy.text_encoders.sd2_clip.SD2ClipModel(device="meta"))
    mc = sm.SD_X4Upscaler(dict(_UNET_X4))
    return _checkpoint_sd(mc, clip_sd, _vae_sd(ch_mult=(1, 2, 4)))


def _controlnet_sd15_layout() -> dict:
    import comfy.cldm.cldm
    import comfy.ops

    cfg = dict(_UNET_SD15)
    cfg.pop("out_channels")
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="meta",
                                         **cfg)
    return {"control_model." + k: v for k, v in net.state_dict().items()}


def _clip_vision_layout(config_name: str) -> dict:
    import comfy.clip_vision
    import comfy.ops

    cfg_path = Path(comfy.clip_vision.__file__).resolve().parent / config_name
    config = json.loads(cfg_path.read_text())
    model_class = comfy.clip_vision.IMAGE_ENCODERS[config.get("model_type", "clip_vision_model")]
    with torch.device("meta"):
        model = model_class(config, torch.float16, "meta", comfy.ops.manual_cast)
    return _meta_sd(model)


def _meta(*shape) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def _ipadapter_cross_attn_dims(family: str) -> list[int]:
    """Inner widths of the cross-attention layers in diffusers' attention-processor order (down, up, mid)."""
    if family == "sd15":
        down = [320, 320, 640, 640, 1280, 1280]
        up = [1280] * 3 + [640] * 3 + [320] * 3
        mid = [1280]
    elif family == "sdxl":
        down = [640] * 4 + [1280] * 20          # down_blocks.1: 2 attentions x 2 layers; .2: 2 x 10
        up = [1280] * 30 + [640] * 6            # up_blocks.0: 3 x 10; up_blocks.1: 3 x 2
        mid = [1280] * 10
    else:
        raise ValueError(family)
    return down + up + mid


def _ipadapter_layout(family: str, plus: bool) -> dict:
    """IP-Adapter file: image_proj.* (projection of the CLIP-vision output) + ip_adapter.<2n+1>.to_{k,v}_ip.weight."""
    ctx = {"sd15": 768, "sdxl": 2048}[family]
    sd = {}
    if plus:
        # Resampler (16 query tokens) over the penultimate hidden states of CLIP ViT-H (width 1280).
        dim, depth, heads, dim_head, emb, ff = 768, 4, 12, 64, 1280, 4
        inner = heads * dim_head
        sd["image_proj.latents"] = _meta(1, 16, dim)
        sd["image_proj.proj_in.weight"] = _meta(dim, emb)
        sd["image_proj.proj_in.bias"] = _meta(dim)
        sd["image_proj.proj_out.weight"] = _meta(ctx, dim)
        sd["image_proj.proj_out.bias"] = _meta(ctx)
        sd["image_proj.norm_out.weight"] = _meta(ctx)
        sd["image_proj.norm_out.bias"] = _meta(ctx)
        for i in range(depth):
            p = f"image_proj.layers.{i}."
            for n in ("norm1", "norm2"):
                sd[p + f"0.{n}.weight"] = _meta(dim)
                sd[p + f"0.{n}.bias"] = _meta(dim)
            sd[p + "0.to_q.weight"] = _meta(inner, dim)
            sd[p + "0.to_kv.weight"] = _meta(2 * inner, dim)
            sd[p + "0.to_out.weight"] = _meta(dim, inner)
            sd[p + "1.0.weight"] = _meta(dim)
            sd[p + "1.0.bias"] = _meta(dim)
            sd[p + "1.1.weight"] = _meta(dim * ff, dim)
            sd[p + "1.3.weight"] = _meta(dim, dim * ff)
    else:
        # Linear projection of the pooled image embedding (ViT-H: 1024, ViT-bigG: 1280) into 4 context tokens.
        emb = {"sd15": 1024, "sdxl": 1280}[family]
        sd["image_proj.proj.weight"] = _meta(4 * ctx, emb)
        sd["image_proj.proj.bias"] = _meta(4 * ctx)
        sd["image_proj.norm.weight"] = _meta(ctx)
        sd["image_proj.norm.bias"] = _meta(ctx)
    for n, hidden in enumerate(_ipadapter_cross_attn_dims(family)):
        sd[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = _meta(hidden, ctx)
        sd[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = _meta(hidden, ctx)
    return sd


def _brushnet_layout(family: str, cross_attention: bool = False) -> dict:
    """Diffusers-format BrushNet branch: the UNet without attention, 9-channel input conv, zero-conv outputs.

    Key names and shapes come from ComfyUI's diffusers->LDM map of the UNet the branch copies (SD1.5: 322 keys);
    the input conv is ``conv_in_condition`` (BrushNetModel's name for it, the key in the public files).
    ``cross_attention``: PowerPaint v2's BrushNet_CA, which keeps the UNet's transformers (down levels 0-2, the
    middle block, up levels 1-3 for SD1.5) and otherwise has the same keys.
    """
    import comfy.supported_models as sm
    import comfy.utils

    base = {"sd15": _UNET_SD15, "sdxl": _UNET_SDXL}[family]
    cfg = dict(base, in_channels=9)
    mc = {"sd15": sm.SD15, "sdxl": sm.SDXL}[family](cfg)
    with torch.device("meta"):
        unet_sd = mc.get_model({}, device="meta").diffusion_model.state_dict()
    d2l = comfy.utils.unet_to_diffusers(cfg)
    keep = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.resnets.", "up_blocks.")
    sd = {}
    for dk in sorted(d2l, key=_diffusers_key_order):
        if not dk.startswith(keep) and not (cross_attention and dk.startswith("mid_block.attentions.")):
            continue
        if ".attentions." in dk and not cross_attention:
            continue
        lk = d2l[dk]
        if lk in unet_sd:
            sd[dk.replace("conv_in.", "conv_in_condition.", 1) if dk.startswith("conv_in.") else dk] = unet_sd[lk]
    # Residual widths (conv_in, each resnet, each downsampler; middle; up path), as the branch model computes them.
    down, top, up = BranchConfig.from_unet_config(base).residual_channels()
    for i, c in enumerate(down):
        sd[f"brushnet_down_blocks.{i}.weight"] = _meta(c, c, 1, 1)
        sd[f"brushnet_down_blocks.{i}.bias"] = _meta(c)
    sd["brushnet_mid_block.weight"] = _meta(top, top, 1, 1)
    sd["brushnet_mid_block.bias"] = _meta(top)
    for i, c in enumerate(up):
        sd[f"brushnet_up_blocks.{i}.weight"] = _meta(c, c, 1, 1)
        sd[f"brushnet_up_blocks.{i}.bias"] = _meta(c)
    return sd


def _powerpaint_text_encoder_layout() -> dict:
    """PowerPaint v2's text encoder (PowerPaint_Brushnet/pytorch_model.bin): a CLIP ViT-L text model
    (transformers key names) whose token embedding is wrapped, with 10 learned vectors for each task prompt."""
    import comfy.sd1_clip

    with torch.device("meta"):
        clip_sd = _meta_sd(comfy.sd1_clip.SD1ClipModel(device="meta"))
    sd = {}
    for k, v in clip_sd.items():
        if not k.startswith("clip_l.transformer.text_model."):
            continue
        k = k[len("clip_l.transformer."):]
        if k == "text_model.embeddings.token_embedding.weight":
            k = "text_model.embeddings.token_embedding.wrapped.weight"
        sd[k] = v
    sd["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    for task in ("P_ctxt", "P_shape", "P_obj"):
        sd[f"text_model.embeddings.token_embedding.trainable_embeddings.{task}"] = _meta(10, 768)
    return sd


def _diffusers_key_order(k: str):
    return [int(p) if p.isdigit() else p for p in k.split(".")]


def _refinenet_parts() -> tuple[dict, dict]:
    """(tensors, metadata) of the pack's RefineNet file for SD1.5 inpainting with CLIP ViT-H (LAR-Gen stage-2
    export): the detail-encoder MLP and every cross-attention weight of the UNet (kernels/refinenet.py)."""
    import comfy.supported_models as sm

    config = rn.RefineNetConfig(clip_dim=1280, context_dim=768, unet_in_channels=9)
    with torch.device("meta"):
        encoder = rn.DetailEncoder(config).state_dict()
    unet = sm.SD15(dict(_UNET_SD15, in_channels=9)).get_model({}, device="meta").diffusion_model.state_dict()
    return rn.state_dict_for_file(config, encoder, {k: v for k, v in unet.items() if rn.is_trained_in_stage2(k)})


def _branch_layout(family: branch_families.BranchFamily, file: branch_families.SmokeFile) -> dict:
    """A branch family's smoke file: the public (diffusers) layout of a family that has public files, with or without
    cross-attention as its preset for that base; else the pack's own file (tensors only, see _own_branch_parts)."""
    if family.public:
        return _brushnet_layout(file.base, cross_attention=family.public[file.base].cross_attention)
    return _own_branch_parts(family, file.base)[0]


def _own_branch_parts(family: branch_families.BranchFamily, base: str = "sd15") -> tuple[dict, dict]:
    """(tensors, metadata) of the pack's own branch file of ``family`` made for ``base`` (docs/brush-branches.md): the
    branch module's state dict (kernels/painternet.py, kernels/mtadiffusion.py) and its kind/config metadata."""
    config = family.config_for(dict({"sd15": _UNET_SD15, "sdxl": _UNET_SDXL}[base], in_channels=9))
    with torch.device("meta"):
        branch = family.build(config.to_json())
    return dict(branch.state_dict()), {brush_files.META_KIND: family.kind, brush_files.META_CONFIG: config.to_json()}


def _branch_kinds() -> dict:
    """The smoke kinds of every branch family's files (kernels/branch_families.py), in the families' order."""
    kinds = {}
    for family in branch_families.FAMILIES:
        for file in family.smoke:
            own = None if family.public else (lambda f=family, b=file.base: _own_branch_parts(f, b)[1])
            kinds[file.name] = _Kind("inpaint", file.filename, lambda f=family, x=file: _branch_layout(f, x),
                                     revision=file.revision, metadata=own)
    return kinds


# --------------------------------------------------------------------------------------------------------------------
# Kinds
# --------------------------------------------------------------------------------------------------------------------

class _Kind:
    # revision: bump for one kind whose layout changed, so only its cached files are regenerated.
    # metadata: extra safetensors metadata of the kind's real files (the pack's own formats carry their config).
    def __init__(self, folder: str, filename: str, layout: Callable[[], dict], revision: int = 1,
                 metadata: Callable[[], dict] | None = None):
        self.folder, self.filename, self.layout, self.revision = folder, filename, layout, revision
        self.metadata = metadata


_SPECS: dict[str, _Kind] = {
    "sd15": _Kind("checkpoints", "smoke-random_sd15.safetensors", lambda: _sd15_layout(False)),
    "sd15_inpaint": _Kind("checkpoints", "smoke-random_sd15-inpainting.safetensors", lambda: _sd15_layout(True)),
    "sdxl": _Kind("checkpoints", "smoke-random_sdxl-base.safetensors", _sdxl_layout),
    "sd_x4_upscaler": _Kind("checkpoints", "smoke-random_x4-upscaler.safetensors", _x4_layout),
    "controlnet_sd15": _Kind("controlnet", "smoke-random_control_sd15.safetensors", _controlnet_sd15_layout),
    "clip_vision_h": _Kind("clip_vision", "smoke-random_CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                           lambda: _clip_vision_layout("clip_vision_config_h.json")),
    "ipadapter_sd15": _Kind("ipadapter", "smoke-random_ip-adapter_sd15.safetensors",
                            lambda: _ipadapter_layout("sd15", plus=False)),
    "ipadapter_sd15_plus": _Kind("ipadapter", "smoke-random_ip-adapter-plus_sd15.safetensors",
                                 lambda: _ipadapter_layout("sd15", plus=True)),
    "clip_vision_g": _Kind("clip_vision", "smoke-random_CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
                           lambda: _clip_vision_layout("clip_vision_config_g.json")),
    "ipadapter_sdxl": _Kind("ipadapter", "smoke-random_ip-adapter_sdxl.safetensors",
                            lambda: _ipadapter_layout("sdxl", plus=False)),
    "powerpaint_sd15_text_encoder": _Kind("inpaint", "smoke-random_powerpaint_v2_text_encoder.safetensors",
                                          _powerpaint_text_encoder_layout),
    "refinenet_sd15": _Kind("refinenet", "smoke-random_refinenet_sd15-inpainting.safetensors",
                            lambda: _refinenet_parts()[0], metadata=lambda: _refinenet_parts()[1]),
    **_branch_kinds(),
}

KINDS: tuple[str, ...] = tuple(_SPECS)


def _spec(kind: str) -> _Kind:
    try:
        return _SPECS[kind]
    except KeyError:
        raise ValueError(f"unknown smoke model kind {kind!r}; expected one of {KINDS}") from None


def folder_for(kind: str) -> str:
    """The ComfyUI models sub-folder (folder_paths name) where a user would put this kind of file."""
    return _spec(kind).folder


def filename_for(kind: str) -> str:
    """The file name inside :func:`folder_for` (what ComfyUI's loader combos list)."""
    return _spec(kind).filename


def layout(kind: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype as written)} of a kind, without writing anything (cheap: meta tensors)."""
    out = {}
    for k, t in _spec(kind).layout().items():
        out[k] = (tuple(t.shape), _out_dtype(t))
    return out


def default_models_dir() -> Path:
    """Shared cache of generated files: $FAITHFUL_SMOKE_DIR, else <repo>/.smoke/models (gitignored)."""
    env = os.environ.get("FAITHFUL_SMOKE_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".smoke" / "models"


# --------------------------------------------------------------------------------------------------------------------
# Values and the streaming writer
# --------------------------------------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    if t.device.type == "meta" or t.is_floating_point():
        return torch.float16
    return t.dtype


class _Filler:
    """Deterministic cheap pseudo-random values: slices of one seeded Gaussian block."""

    def __init__(self, seed: int):
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        pool = torch.randn(_POOL_SIZE, generator=g)
        self.pool = torch.cat([pool, pool])  # any window of _POOL_SIZE values is contiguous

    def noise(self, key: str, n: int) -> torch.Tensor:
        off = zlib.crc32(f"{self.seed}:{key}".encode()) % _POOL_SIZE
        if n <= _POOL_SIZE:
            return self.pool[off:off + n]
        reps = -(-n // _POOL_SIZE)
        return self.pool[off:off + _POOL_SIZE].repeat(reps)[:n]

    def make(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            return t.contiguous().to(_out_dtype(t))
        shape = tuple(t.shape)
        n = math.prod(shape)
        if n == 0:
            return torch.empty(shape, dtype=torch.float16)
        x = self.noise(key, n)
        leaf = key.rsplit(".", 1)[-1]
        if len(shape) >= 2:
            fan_in = shape[-1] if shape[0] == 1 else n // shape[0]
            x = x * (1.0 / math.sqrt(max(fan_in, 1)))
        elif len(shape) == 1 and leaf in ("weight", "gamma", "scale", "lambda1"):
            x = x * 0.02 + 1.0   # norm weights (every 1-D weight in these layouts is a norm or a layer scale)
        elif leaf == "logit_scale":
            x = torch.full_like(x, math.log(100.0))
        else:
            x = x * 0.02         # biases, class embeddings
        return x.to(torch.float16).reshape(shape)


def _write_safetensors(path: Path, tensors: dict, filler: _Filler | None, metadata: dict) -> None:
    """Stream a safetensors file: header from the shapes, then each tensor as it is generated (``filler`` None: all
    zeros, left as a hole in a sparse file, so the file takes almost no disk)."""
    header = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    order = list(tensors)
    for k in order:
        t = tensors[k]
        dt = _out_dtype(t)
        nbytes = math.prod(t.shape) * torch.empty((), dtype=dt).element_size()
        header[k] = {"dtype": _ST_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        if filler is None:
            f.truncate(f.tell() + offset)
            return
        for k in order:
            v = filler.make(k, tensors[k])
            assert list(v.shape) == header[k]["shape"], k
            if v.numel():
                f.write(v.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _read_metadata(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
        size = path.stat().st_size
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size != 8 + n + end:
            return None  # truncated
        return header.get("__metadata__", {})
    except (OSError, ValueError, struct.error):
        return None


def write_model_file(kind: str, path, seed: int = 0) -> Path:
    """Write the random-weight file of ``kind`` to ``path`` (atomically) and return the path.

    The file has the real key names, shapes and layout of that kind of model; its weights are random (images: noise).
    """
    spec = _spec(kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = spec.layout()
    meta = {"format": "pt", "faithful_inpaint_smoke": "random weights, outputs are noise", "kind": kind,
            "seed": seed, "smoke_format_version": SMOKE_FORMAT_VERSION,
            "layout_revision": spec.revision}
    if spec.metadata is not None:
        meta.update(spec.metadata())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with torch.inference_mode():
            _write_safetensors(tmp, tensors, _Filler(seed), meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_layout_file(kind: str, path) -> Path:
    """A file of ``kind`` with its real keys, shapes and header but all-zero weights, sparse on disk: for what reads
    only what a file is (its keys and shapes), not its weights, without writing gigabytes (SDXL: 6.9 GB)."""
    spec = _spec(kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "faithful_inpaint_smoke": "all-zero weights (layout only)", "kind": kind}
    if spec.metadata is not None:
        meta.update(spec.metadata())
    _write_safetensors(path, spec.layout(), None, meta)
    return path


def is_current(kind: str, path) -> bool:
    """True when ``path`` is a complete smoke file of ``kind`` written by this version of the generator."""
    meta = _read_metadata(Path(path))
    return (bool(meta) and meta.get("kind") == kind and meta.get("smoke_format_version") == SMOKE_FORMAT_VERSION
            and meta.get("layout_revision", "1") == str(_spec(kind).revision))


def ensure_smoke_models(models_dir=None, kinds: Iterable[str] = ("sd15_inpaint",)) -> dict[str, str]:
    """Make sure the smoke files of ``kinds`` exist under ``models_dir/<folder_for(kind)>/`` and return
    ``{kind: filename}`` with the filename relative to that folder, exactly as ComfyUI's loader combos list it.

    Existing complete files of the current format are reused (a cache keyed by file name); others are (re)written.
    ``models_dir`` defaults to :func:`default_models_dir`.
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    out = {}
    for kind in kinds:
        spec = _spec(kind)
        path = root / spec.folder / spec.filename
        if not is_current(kind, path):
            write_model_file(kind, path)
        out[kind] = spec.filename
    return out


def register_model_folders(models_dir=None, kinds: Iterable[str] = KINDS) -> None:
    """Add ``models_dir/<folder_for(kind)>`` to ComfyUI's ``folder_paths`` search paths (for an in-process host whose
    base directory is elsewhere), so loader nodes list and find the smoke files. Folders ComfyUI does not know by
    default (``ipadapter``, ``inpaint``) are registered with ComfyUI's usual model extensions, as their packs do."""
    import folder_paths

    if isinstance(kinds, str):
        kinds = (kinds,)
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    for folder in sorted({folder_for(k) for k in kinds}):
        path = str(root / folder)
        if folder not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[folder] = ([path], set(folder_paths.supported_pt_extensions))
        else:
            folder_paths.add_model_folder_path(folder, path)


def main(argv=None) -> int:
    """``python -m faithful_inpaint.devtools.smoke_checkpoints [--models-dir DIR] [KIND ...]``: write (or reuse) smoke files."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kinds", nargs="*", default=["sd15", "sd15_inpaint"], help=f"any of {', '.join(KINDS)}; 'all'")
    parser.add_argument("--models-dir", default=None, help="ComfyUI models folder (default: "
                        "$FAITHFUL_SMOKE_DIR or <repo>/.smoke/models)")
    args = parser.parse_args(argv)
    kinds = KINDS if args.kinds == ["all"] else tuple(args.kinds)
    from faithful_inpaint.devtools import host

    host.start()
    root = Path(args.models_dir) if args.models_dir else default_models_dir()
    for kind in kinds:
        t = time.perf_counter()
        name = ensure_smoke_models(root, [kind])[kind]
        path = root / folder_for(kind) / name
        print(f"{kind:22s} {folder_for(kind)}/{name}  {path.stat().st_size / 2**20:8.0f} MiB  "
              f"{time.perf_counter() - t:6.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
