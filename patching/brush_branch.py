"""A BrushNet-style branch attached to a ModelPatcher clone: its residuals added to the UNet's hidden states.

Where the residuals go (BrushNet's UNet, matched to ComfyUI's UNetModel): down residual i after input block i,
before its skip is stored; the mid residual after the middle block; up residual j after each output block's
resnet(+attention) and, for blocks that end in an Upsample, another one after the Upsample.

How they get there. One DIFFUSION_MODEL wrapper (ComfyUI's public wrapper API) runs the branch once per UNet call
on the same rows (x[:, :4], the call's timesteps, its y vector) and then calls the UNet with
  * an ``input_block_patch`` (public; runs after each input block, before the skip is stored) for the down path;
  * an ``output_block_patch`` (public; sees h at the start of each output block) for the mid residual (block 0)
    and every up residual that falls between two output blocks;
  * two places no ComfyUI patch reaches: inside a block that ends in an Upsample (the residual goes BEFORE the
    upsample; ``forward_timestep_embed`` matches Upsample before it consults ``forward_timestep_embed_patch``) and
    after the last output block (nothing runs between it and ``self.out``). There, PyTorch forward pre-hooks on
    those few modules (SD1.5: three Upsamples and ``out``) are registered for the duration of the one call and
    removed in ``finally``; nothing else is touched. The patches ride on a per-call copy of transformer_options, so
    the clone's model_options and the original model never see them.
A PainterNet branch's Attention Control Points (``extras["acp"]``) ride on the same per-call options, as an
attention output patch (``patching.painternet.with_attention_control``): every branch family goes through this one
path. The branch is an additional model of the clone (``set_additional_models``), so ComfyUI loads and offloads it with
the UNet. Strength multiplies every residual; start/end are fractions of the schedule (``ScheduleWindow``); which
rows are conditional is read from ``transformer_options["cond_or_uncond"]``.

Shared injection path (sampling and training use the same function)::

    with inject_residuals(unet, branch_output, strength, transformer_options) as options:
        eps = unet(x, timesteps, context, y, transformer_options=options)

Loading (``load_branch``): a branch file, classified from its tensor names and metadata (kernels/brush_files.py),
built on the meta device and filled with strict key matching; PowerPaint's text encoder becomes a ComfyUI CLIP
plus its task-prompt vectors.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from faithful_inpaint.kernels import branch_families, brush_files
from faithful_inpaint.kernels import masks as mask_ops
from faithful_inpaint.kernels.batch import COND, chunks
from faithful_inpaint.kernels.brush_branch import LATENT_CHANNELS, BranchOutput
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.model_files import read_model_file
from faithful_inpaint.patching.painternet import with_attention_control
from faithful_inpaint.patching.schedule import ScheduleWindow

WRAPPER_KEY = "faithful_inpaint.brush_branch"


# --------------------------------------------------------------------------------------------------------------------
# Where the residuals go
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InjectionPlan:
    """Injection points of one UNet: counts and the modules that need a per-call hook."""
    n_down: int
    n_up: int
    # output block id -> index into BranchOutput.up added to h at the START of that block (-1: the mid residual)
    at_block_start: dict
    # (module, up index): residual added to the module's INPUT (Upsamples and the final ``out``)
    pre_hooks: tuple


def plan_for(unet) -> InjectionPlan:
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

    at_start = {0: -1}
    pre_hooks = []
    up = 0
    blocks = list(unet.output_blocks)
    for i, block in enumerate(blocks):
        upsample = block[-1] if isinstance(block[-1], Upsample) else None
        if upsample is not None:
            pre_hooks.append((upsample, up))      # after the resnet(+attention), before the upsample
            up += 1
        if i + 1 < len(blocks):
            at_start[i + 1] = up                  # after the block (after its upsample, if it has one)
        else:
            pre_hooks.append((unet.out, up))      # after the last block
        up += 1
    return InjectionPlan(len(unet.input_blocks), up, at_start, tuple(pre_hooks))


def _check(plan: InjectionPlan, output: BranchOutput) -> None:
    if len(output.down) != plan.n_down or len(output.up) != plan.n_up:
        raise ValueError(f"the branch gives {len(output.down)} down / {len(output.up)} up residuals, this UNet "
                         f"takes {plan.n_down} / {plan.n_up}: the branch was made for another architecture")


def _add(h: torch.Tensor, r: torch.Tensor, strength: float) -> torch.Tensor:
    if r.shape != h.shape:
        raise ValueError(f"a branch residual of shape {tuple(r.shape)} cannot be added to UNet features of shape "
                         f"{tuple(h.shape)}: the branch does not match this UNet")
    return h + (r * strength).to(device=h.device, dtype=h.dtype)


@contextlib.contextmanager
def inject_residuals(unet, output: BranchOutput, strength: float, transformer_options: dict,
                     plan: Optional[InjectionPlan] = None):
    """Yield transformer_options for ONE call of ``unet`` that add ``output`` x ``strength`` to its hidden states
    (and, for a PainterNet branch, its attention control points to the attention outputs).

    ``transformer_options`` is not modified (a copy with its own patch lists is yielded); the forward pre-hooks on
    the Upsample/out modules exist only inside the ``with`` block.
    """
    plan = plan or plan_for(unet)
    _check(plan, output)

    def down_patch(h, options):
        block = options.get("block")
        if block is not None and block[0] == "input":
            h = _add(h, output.down[block[1]], strength)
        return h

    def up_patch(h, hsp, options):
        block = options.get("block")
        if block is not None and block[0] == "output" and block[1] in plan.at_block_start:
            j = plan.at_block_start[block[1]]
            h = _add(h, output.mid if j < 0 else output.up[j], strength)
        return h, hsp

    options = dict(transformer_options)
    patches = {k: list(v) for k, v in transformer_options.get("patches", {}).items()}
    patches.setdefault("input_block_patch", []).append(down_patch)
    patches.setdefault("output_block_patch", []).append(up_patch)
    options["patches"] = patches

    handles = []
    try:
        for module, j in plan.pre_hooks:
            def hook(mod, args, kwargs, _r=output.up[j]):
                return (_add(args[0], _r, strength),) + tuple(args[1:]), kwargs

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield with_attention_control(output, strength, options)
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------------------------
# The branch during sampling
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class BranchConditioning:
    """What the branch sees besides the noisy latent (prepared by the node)."""
    masked_latent: torch.Tensor                 # [b, 4, h, w] masked-image latent, in the model's latent space
    keep_mask: torch.Tensor                     # [b, 1, h, w], 1 = known pixel
    # Branch-own text embeddings per kind (COND / UNCOND) [1, T, C]; None: the UNet's own context rows are used.
    context: Optional[dict] = None


@dataclass
class BrushBranchHooks:
    branch_patcher: object                      # comfy ModelPatcher around the branch nn.Module
    conditioning: BranchConditioning
    strength: float
    window: ScheduleWindow
    node: str = "BrushBranchApply"
    # Test hook: called with the BranchOutput of every call (after the strength is known, before injection).
    observer: Optional[Callable] = None
    _plan: dict = field(default_factory=dict)

    def install(self, model) -> None:
        """Attach to ``model`` (a ModelPatcher clone)."""
        import comfy.patcher_extension

        model.set_additional_models(WRAPPER_KEY, [self.branch_patcher])

        # A closure, not a bound method: clones deep-copy model_options-like containers.
        def diffusion_model_wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
            return self._run(executor, x, timesteps, context, y, control, transformer_options, **kwargs)

        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                   diffusion_model_wrapper)

    def _run(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        sigmas = transformer_options.get("sigmas")
        if self.strength == 0 or (sigmas is not None and not self.window.contains(sigmas)):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        unet = executor.class_obj
        # Guidance that differentiates the UNet w.r.t. x (RASG, PILOT) gets the residuals as constants: the branch's
        # weights are inference tensors, and its path is not what those objectives steer.
        with torch.no_grad():
            output = self.branch_output(x.detach(), timesteps, context, y,
                                        transformer_options.get("cond_or_uncond", [COND]))
        if self.observer is not None:
            self.observer(output)
        plan = self._plan.get(id(unet))
        if plan is None:
            plan = self._plan[id(unet)] = plan_for(unet)
        with inject_residuals(unet, output, self.strength, transformer_options, plan) as options:
            return executor(x, timesteps, context, y, control, options, **kwargs)

    def branch_output(self, x, timesteps, context, y, cond_or_uncond) -> BranchOutput:
        branch = self.branch_patcher.model
        p = next(branch.parameters())
        device, dtype = p.device, p.dtype
        batch, _, h, w = x.shape
        try:
            parts = chunks(list(cond_or_uncond), batch)
        except ValueError as err:
            raise NodeInputError(self.node, "model", str(err))
        per_chunk = batch // len(parts)
        masked, keep = self._inputs(per_chunk, h, w)
        masked = masked.repeat(len(parts), 1, 1, 1)
        keep = keep.repeat(len(parts), 1, 1, 1)
        ctx = context
        if self.conditioning.context is not None:
            ctx = torch.cat([self.conditioning.context[kind].expand(per_chunk, -1, -1) for kind, _ in parts])
        return branch(
            x[:, :LATENT_CHANNELS].to(device, dtype),
            masked.to(device, dtype),
            keep.to(device, dtype),
            timesteps.to(device),
            None if ctx is None else ctx.to(device, dtype),
            None if y is None else y.to(device, dtype),
        )

    def _inputs(self, per_chunk: int, h: int, w: int):
        c = self.conditioning
        masked = c.masked_latent
        if masked.shape[-2:] != (h, w):
            masked = torch.nn.functional.interpolate(masked, size=(h, w), mode="bilinear", align_corners=False)
        keep = c.keep_mask
        if keep.shape[-2:] != (h, w):
            keep = torch.nn.functional.interpolate(keep, size=(h, w), mode="nearest")
        try:
            masked = mask_ops.match_batch(masked, per_chunk)
            keep = mask_ops.match_batch(keep, per_chunk)
        except ValueError as err:
            raise NodeInputError(self.node, "image", f"{err} (the latent being sampled has {per_chunk}).")
        return masked, keep


# --------------------------------------------------------------------------------------------------------------------
# Host helpers: the branch as a ModelPatcher, the UNet's weights under diffusers names
# --------------------------------------------------------------------------------------------------------------------

def branch_patcher(branch: torch.nn.Module):
    """Wrap a branch module so ComfyUI's memory management loads and offloads it like the UNet."""
    import comfy.model_management
    import comfy.model_patcher

    offload = comfy.model_management.unet_offload_device()
    branch.to(offload)
    return comfy.model_patcher.ModelPatcher(branch, load_device=comfy.model_management.get_torch_device(),
                                           offload_device=offload)


def branch_dtype(load_device=None) -> torch.dtype:
    """The dtype ComfyUI would pick for a UNet of this size on the load device (fp16/bf16 on GPUs, fp32 on CPU)."""
    import comfy.model_management

    return comfy.model_management.unet_dtype(device=load_device)


def unet_state_dict_diffusers(model) -> dict:
    """The UNet weights of a ComfyUI MODEL under diffusers key names (for ``BrushBranch.from_unet``)."""
    import comfy.utils

    base = model.model
    unet_sd = base.diffusion_model.state_dict()
    d2l = comfy.utils.unet_to_diffusers(base.model_config.unet_config)
    return {dk: unet_sd[lk] for dk, lk in d2l.items() if lk in unet_sd}


# --------------------------------------------------------------------------------------------------------------------
# Loading branch files (BrushBranchLoader): public BrushNet / PowerPaint files and the pack's own (kernels/brush_files)
# --------------------------------------------------------------------------------------------------------------------

LOADER_NODE = "BrushBranchLoader"


# Branch kind (metadata ``faithful_inpaint.kind``) -> builder(config JSON) -> the branch module, one per family record.
BRANCH_FACTORIES: dict[str, Callable] = {f.kind: f.build for f in branch_families.FAMILIES}


@dataclass
class LoadedBranch:
    """What BrushBranchLoader hands to BrushBranchApply."""
    patcher: object                          # comfy ModelPatcher around the branch module
    kind: brush_files.FileKind
    name: str
    task_encoder: Optional[object] = None    # PowerPaint: ComfyUI CLIP built from its text encoder
    task_vectors: dict = field(default_factory=dict)   # PowerPaint: {"P_obj": [10, 768], ...}


def _peek(path: str, node: str, input_name: str):
    """({key: shape}, metadata) of a safetensors file from its header alone (a wrong 7 GB file fails at once);
    None for other formats, which have to be read whole."""
    if not path.endswith((".safetensors", ".sft")):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, (f.metadata() or {})
    except Exception as err:
        raise NodeInputError(node, input_name, f"cannot read {os.path.basename(path)}: {err}") from err


def _classify(shapes: dict, metadata: dict, path: str, input_name: str) -> brush_files.FileKind:
    try:
        kind = brush_files.classify(shapes, metadata)
    except brush_files.UnknownBranchFile as err:
        raise NodeInputError(LOADER_NODE, input_name, f"{os.path.basename(path)} is not a BrushNet/PowerPaint "
                             f"branch: {err}.") from None
    if not kind.public and not path.endswith(".safetensors"):
        raise NodeInputError(LOADER_NODE, input_name, "the pack's own branch files are safetensors only.")
    return kind


def _kind_of(path: str, input_name: str) -> brush_files.FileKind:
    peeked = _peek(path, LOADER_NODE, input_name)
    if peeked is None:
        sd, metadata = read_model_file(path, LOADER_NODE, input_name)
        peeked = ({k: tuple(v.shape) for k, v in sd.items()}, metadata)
        del sd
    return _classify(*peeked, path, input_name)


def load_branch(path: str, text_encoder_path: Optional[str] = None) -> LoadedBranch:
    """Read a branch file (and, for PowerPaint, its text encoder) and build the branch, strict key matching."""
    kind = _kind_of(path, "branch_name")
    if kind.kind == "powerpaint_text_encoder":
        raise NodeInputError(LOADER_NODE, "branch_name", f"{os.path.basename(path)} is PowerPaint's text encoder; "
                             "choose it as powerpaint_text_encoder and the PowerPaint branch as branch_name.")
    task_prompt = kind.branch_family is not None and kind.branch_family.task_prompt      # PowerPaint's task prompts
    if task_prompt and text_encoder_path is None:
        raise NodeInputError(LOADER_NODE, "powerpaint_text_encoder", "a PowerPaint branch needs its text encoder "
                             "(PowerPaint_Brushnet/pytorch_model.bin, next to the branch in models/inpaint): it "
                             "carries the task prompts.")
    factory = BRANCH_FACTORIES.get(kind.kind)
    if factory is None:
        raise NodeInputError(LOADER_NODE, "branch_name", f"{os.path.basename(path)} is a '{kind.kind}' branch, a "
                             "recipe this version of the pack does not know (update the pack).")
    sd, _ = read_model_file(path, LOADER_NODE, "branch_name")
    with torch.device("meta"):
        module = factory(kind.config if kind.config is not None else kind.branch_config().to_json())
    dtype = branch_dtype()
    try:
        module.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as err:
        raise NodeInputError(LOADER_NODE, "branch_name", f"{os.path.basename(path)} looks like {kind.label} but "
                             f"its tensors do not match that architecture: {str(err)[:400]}") from None
    module.eval().requires_grad_(False)
    loaded = LoadedBranch(branch_patcher(module), kind, os.path.basename(path))
    if task_prompt:
        loaded.task_encoder, loaded.task_vectors = load_powerpaint_text_encoder(text_encoder_path)
    return loaded


def load_powerpaint_text_encoder(path: str):
    """PowerPaint's text encoder as a ComfyUI CLIP plus its task-prompt vectors.

    The public file is a CLIPTextModel state dict whose token embedding is wrapped: ``...token_embedding.wrapped``
    holds the ordinary vocabulary, ``...token_embedding.trainable_embeddings.P_ctxt`` (and P_shape, P_obj) the 10
    learned vectors of each task prompt. The vocabulary goes back to the plain key; the task vectors are spliced
    into the token sequence when a task prompt is encoded (ComfyUI's embedding-token path).
    """
    import comfy.sd
    import folder_paths

    kind = _kind_of(path, "powerpaint_text_encoder")
    if kind.kind != "powerpaint_text_encoder":
        raise NodeInputError(LOADER_NODE, "powerpaint_text_encoder", f"{os.path.basename(path)} is {kind.label}, "
                             "not PowerPaint's text encoder (PowerPaint_Brushnet/pytorch_model.bin of PowerPaint v2).")
    sd, _ = read_model_file(path, LOADER_NODE, "powerpaint_text_encoder")
    vectors = {t: sd.pop(k).float() for t, k in brush_files.powerpaint_task_keys().items() if k in sd}
    missing = set(brush_files.POWERPAINT_TASK_TOKENS) - set(vectors)
    if missing:
        raise NodeInputError(LOADER_NODE, "powerpaint_text_encoder", f"the text encoder lacks the task prompts "
                             f"{sorted(missing)}.")
    wrapped = "text_model.embeddings.token_embedding.wrapped.weight"
    if wrapped in sd:
        sd["text_model.embeddings.token_embedding.weight"] = sd.pop(wrapped)
    _check_text_transformer(sd, os.path.basename(path))
    clip = comfy.sd.load_text_encoder_state_dicts(state_dicts=[sd], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return clip, vectors


def _check_text_transformer(sd: dict, name: str) -> None:
    """PowerPaint's text encoder must hold the whole CLIP-L text transformer, as ComfyUI's SD1 CLIP names it: ComfyUI
    would load a partial one without a word and encode with uninitialised weights."""
    import comfy.sd1_clip

    prefix = "clip_l.transformer."
    with torch.device("meta"):
        reference = comfy.sd1_clip.SD1ClipModel(device="meta").state_dict()
    expected = {k[len(prefix):]: tuple(v.shape) for k, v in reference.items() if k.startswith(prefix + "text_model.")}
    missing = sorted(k for k in expected if k not in sd)
    wrong = sorted(k for k in expected if k in sd and tuple(sd[k].shape) != expected[k])
    if missing or wrong:
        what = (f"{len(missing)} of the {len(expected)} tensors of the CLIP-L text transformer are missing "
                f"(e.g. {missing[:3]})" if missing else "")
        what += ("; " if missing and wrong else "") + (f"{len(wrong)} have the wrong shape (e.g. {wrong[0]}: "
                                                       f"{tuple(sd[wrong[0]].shape)}, expected {expected[wrong[0]]})"
                                                       if wrong else "")
        raise NodeInputError(LOADER_NODE, "powerpaint_text_encoder", f"{name} is not a complete PowerPaint text "
                             f"encoder: {what}. Use PowerPaint_Brushnet/pytorch_model.bin of PowerPaint v2.")


def encode_task_prompt(clip, vectors: dict, task: str) -> torch.Tensor:
    """[1, 77, 768] embedding of a task prompt ("P_obj" ...; "" = the empty prompt) through PowerPaint's encoder.

    The prompt is the start token, the task's learned vectors, the end token, padding: how PowerPaint's tokenizer
    wrapper expands its placeholder into 10 tokens.
    """
    tokens = clip.tokenize("")
    if task:
        seq = tokens["l"][0]
        entry = seq[1]
        vecs = vectors[task]
        new = [seq[0]] + [(vecs[i],) + tuple(entry[1:]) for i in range(vecs.shape[0])]
        new += seq[1:len(seq) - vecs.shape[0]]
        tokens["l"][0] = new
    return clip.encode_from_tokens(tokens, return_pooled=False)
