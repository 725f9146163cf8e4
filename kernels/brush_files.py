"""What a branch weight file is, from its tensor names and shapes (and, for the pack's own files, its metadata).

Recognised:
  * public BrushNet (diffusers format, TencentARC/BrushNet): ``brushnet_down_blocks.N`` zero-convs, 9-channel
    ``conv_in``, no attention; SD1.5 (12 down / 15 up residuals) or SDXL (9 / 11, with ``add_embedding``);
  * public PowerPaint v2 (BrushNet_CA): the same plus cross-attention transformers in the branch;
  * the pack's own files: safetensors with ``faithful_inpaint.kind`` / ``faithful_inpaint.config`` metadata;
  * PowerPaint's text encoder (the CLIP whose token embedding carries the task prompts P_ctxt / P_shape / P_obj).
Anything else gets a description of what it looks like (a checkpoint, a ControlNet, an IP-Adapter, a LoRA ...),
so the node can say which loader the file belongs to.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from faithful_inpaint.kernels.branch_families import BY_KIND, FAMILIES, BranchFamily
from faithful_inpaint.kernels.brush_branch import BranchConfig

META_KIND = "faithful_inpaint.kind"
META_CONFIG = "faithful_inpaint.config"

# PowerPaint's learned task prompts: each placeholder is 10 vectors in the text encoder's token embedding.
POWERPAINT_TASK_TOKENS = ("P_ctxt", "P_shape", "P_obj")
_PP_EMBED_PREFIX = "text_model.embeddings.token_embedding.trainable_embeddings."

POWERPAINT_TEXT_ENCODER = "powerpaint_text_encoder"

# Kind -> name in labels: the branch families' (kernels/branch_families.py) and PowerPaint's text encoder.
KIND_NAMES = {**{f.kind: f.label for f in FAMILIES}, POWERPAINT_TEXT_ENCODER: "PowerPaint text encoder"}


@dataclass(frozen=True)
class FileKind:
    kind: str                     # a branch family's kind (kernels/branch_families.py) | "powerpaint_text_encoder"
    family: str                   # "sd15" | "sdxl" (the base model family it pairs with)
    config: Optional[str] = None  # branch config JSON (own files) or None (public files: preset by structure)
    public: bool = True

    @property
    def label(self) -> str:
        fam = {"sd15": "SD1.5", "sdxl": "SDXL"}.get(self.family, self.family)
        name = KIND_NAMES.get(self.kind, self.kind)
        return f"{name} {fam}" + ("" if self.public else " (trained with this pack)")

    @property
    def branch_family(self) -> Optional[BranchFamily]:
        """The family's record; None for the text encoder and for kinds this version of the pack does not know."""
        return BY_KIND.get(self.kind)

    def branch_config(self) -> BranchConfig:
        record = self.branch_family
        if self.config is not None:
            return record.parse_config(self.config) if record else BranchConfig.from_json(self.config)
        if record and self.family in record.public:
            return record.public[self.family]
        return BranchConfig.sdxl() if self.family == "sdxl" else BranchConfig.sd15()


class UnknownBranchFile(ValueError):
    """Not a branch file; the message says what the file looks like."""


def classify(shapes: dict[str, tuple], metadata: Optional[dict] = None) -> FileKind:
    """The kind of a file given {key: shape} and its safetensors metadata (None for pickles)."""
    metadata = metadata or {}
    if META_KIND in metadata:
        kind = metadata[META_KIND]
        config = metadata.get(META_CONFIG)
        family = "sd15"
        if config:
            family = json.loads(config).get("family", "sd15")
        return FileKind(kind, family, config, public=False)

    n_down = _count(shapes, "brushnet_down_blocks.")
    if n_down and "conv_in_condition.weight" in shapes:
        attention = any(".attentions." in k for k in shapes)
        if n_down == 12 and not any(k.startswith("add_embedding.") for k in shapes):
            return FileKind("powerpaint" if attention else "brushnet", "sd15")
        if n_down == 9 and not attention:
            return FileKind("brushnet", "sdxl")
        raise UnknownBranchFile(f"a BrushNet-like branch with {n_down} down residuals"
                                f"{' and cross-attention' if attention else ''}, a layout this node does not know "
                                "(known: BrushNet SD1.5 / SDXL, PowerPaint v2 SD1.5)")
    if any(k.startswith(_PP_EMBED_PREFIX) for k in shapes):
        return FileKind(POWERPAINT_TEXT_ENCODER, "sd15")
    raise UnknownBranchFile(describe(shapes))


def powerpaint_task_keys() -> dict[str, str]:
    return {t: _PP_EMBED_PREFIX + t for t in POWERPAINT_TASK_TOKENS}


def _count(shapes, prefix) -> int:
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def describe(shapes: dict[str, tuple]) -> str:
    """A short human description of what a non-branch file looks like."""
    keys = list(shapes)

    def has(*prefixes):
        return any(k.startswith(prefixes) for k in keys)

    ctx = None
    for k, s in shapes.items():
        if k.endswith("attn2.to_k.weight") and len(s) == 2:
            ctx = s[1]
            break
    family = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}.get(ctx, "Stable Diffusion")
    if has("model.diffusion_model."):
        conv = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
        inpaint = " inpainting" if conv and len(conv) == 4 and conv[1] == 9 else ""
        return f"this is an {family}{inpaint} checkpoint: load it with Load Checkpoint"
    if has("control_model.", "input_hint_block.", "controlnet_cond_embedding.", "controlnet_down_blocks."):
        return "this is a ControlNet: load it with Load ControlNet Model"
    if has("image_proj.", "ip_adapter."):
        return "this is an IP-Adapter: load it with an IP-Adapter loader"
    if any("lora_up" in k or "lora_down" in k or "lora_A" in k or "lora_B" in k for k in keys):
        return "this is a LoRA: load it with Load LoRA"
    if has("vision_model.", "visual."):
        return "this is a CLIP vision model: load it with Load CLIP Vision"
    if has("text_model.", "cond_stage_model.", "conditioner."):
        return "this is a text encoder (CLIP): load it with Load CLIP"
    if has("encoder.down.", "decoder.up.", "first_stage_model.", "encoder.conv_in."):
        return "this is a VAE: load it with Load VAE"
    if has("input_blocks.", "down_blocks.", "conv_in."):
        return f"this is a bare {family} UNet (no branch zero-convs): load it with Load Diffusion Model"
    sample = ", ".join(keys[:3])
    return f"an unrecognised file ({len(keys)} tensors, e.g. {sample})"


def save_branch_file(path, state_dict: dict, kind: str, config_json: str, metadata: Optional[dict] = None,
                     dtype=None) -> None:
    """Write one of the pack's own branch files that BrushBranchLoader recognises: safetensors (written to a
    temporary file, then renamed: a killed write leaves no half file), the tensors on the CPU (in ``dtype`` if
    given), metadata ``faithful_inpaint.kind`` / ``.config`` plus ``metadata``."""
    import os

    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp, metadata={META_KIND: kind, META_CONFIG: config_json, **(metadata or {})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
