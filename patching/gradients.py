"""Model calls with gradients w.r.t. x_t inside a ComfyUI sampler (RASG's guidance, PILOT's latent optimisation).

Two obstacles, one answer each:
1. Loaded weights are inference tensors (every loader runs under ``torch.inference_mode()``, and ComfyUI patches
   weights, e.g. LoRAs, under it too), which autograd cannot save for backward. ``enable_gradients(model)`` (on the
   MODEL, before sampling) returns a clone with a PREPARE_SAMPLING wrapper (ComfyUI's public wrapper API): once per
   sampling run, right after ComfyUI has loaded and patched the model and the additional models of the run (the
   ControlNets of the conditioning, GLIGEN, models other nodes attached with ``set_additional_models`` or declared
   by their patches' ``models()``), ``convert_inference_weights`` replaces each of their inference-tensor
   parameters and buffers on the device they run on by an ordinary tensor with the same values. Nothing is restored
   afterwards because nothing behavioural changed: every clone sharing the diffusion model computes bit-identical
   outputs with the converted tensors, and a later load or re-patch under inference mode is converted again by the
   next run. Weights kept on another device (low-VRAM partial loading) are skipped: ComfyUI copies them to the
   compute device in every forward, inside the gradient pass. Why this and not a weight wrapper, with measurements:
   docs/gradients.md.
2. The executor samples under ``torch.inference_mode()``, and fast attention kernels (sage, flash, xformers) have
   no backward. ``gradient_pass(extra_args)`` leaves inference mode, enables autograd and gives the model call
   arguments whose ``model_options`` select ComfyUI's PyTorch attention (``optimized_attention_override``, read
   by every ``optimized_attention`` call) for that call only; the sampler's own ``extra_args`` are not modified.

What the caller does, inside the ``with`` block: make x a leaf (``x.detach().clone().requires_grad_(True)``), call
the model with the yielded arguments and a sigma computed inside the block (``sigmas[i] * s_in``), build the loss
and take the gradient. Every other tensor made before the pass that meets x or the loss (a sigma tensor passed
as is, a mask, a reference latent) must go through ``for_autograd`` first, or autograd raises "Inference tensors
cannot be saved for backward". A ControlNet in the conditioning runs inside the same model call (ComfyUI's
calc_cond_batch recomputes its residuals from the current x), so its effect is part of the gradient; ComfyUI adds
those residuals to the UNet's stored skip connections in place, so ``enable_gradients`` also installs an
``input_block_patch_after_skip`` that, during a pass only, hands the next block a copy of the stored skip.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

WRAPPER_KEY = "faithful_inpaint_gradients"


def enable_gradients(model):
    """A clone of ``model`` (a ModelPatcher) whose sampling runs convert the inference-tensor weights of the model
    and of the run's additional models (ControlNets ...) once, after loading. Idempotent."""
    import comfy.patcher_extension

    clone = model.clone()
    kind = comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING
    if _convert_after_loading not in clone.get_wrappers(kind, WRAPPER_KEY):
        clone.add_wrapper_with_key(kind, WRAPPER_KEY, _convert_after_loading)
    patches = clone.model_options.get("transformer_options", {}).get("patches", {})
    if _separate_skip not in patches.get("input_block_patch_after_skip", []):
        clone.set_model_input_block_patch_after_skip(_separate_skip)
    return clone


def _separate_skip(h, transformer_options):
    """In a gradient pass, the next input block gets a copy of the hidden state whose original was just stored as
    a skip connection: ComfyUI adds ControlNet residuals to the stored skips in place (``hsp += ctrl``), which
    autograd refuses for a tensor the next block saved for backward. Outside a pass it returns ``h`` itself."""
    return h.clone() if h.requires_grad else h


def _convert_after_loading(executor, model, noise_shape, conds, *args, **kwargs):
    real_model, conds, additional_models = executor(model, noise_shape, conds, *args, **kwargs)
    # the models ComfyUI has just loaded: this one, the run's additional models, those its patches declare
    convert_inference_weights([model, *additional_models, *model.model_patches_models()])
    return real_model, conds, additional_models


def convert_inference_weights(patchers: Iterable) -> int:
    """``autograd_weights`` on each ModelPatcher's model, for the tensors on the patcher's load device. Returns how
    many were replaced; 0 when there is nothing left to do, so calling it again is cheap."""
    replaced = 0
    for patcher in patchers:
        module = getattr(patcher, "model", None)
        if isinstance(module, torch.nn.Module):
            replaced += autograd_weights(module, torch.device(getattr(patcher, "load_device", "cpu")))
    return replaced


def autograd_weights(module: torch.nn.Module, device: torch.device | None = None) -> int:
    """Replace every inference-tensor parameter and buffer of ``module`` (on ``device``, or anywhere) by an ordinary
    tensor with the same values that autograd can use; shared tensors stay shared, parameters do not require grad.
    Returns how many were replaced."""
    replaced = 0
    with torch.inference_mode(False):
        copies = {}
        for sub in module.modules():
            for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                if not tensor.is_inference() or (device is not None and not _on(tensor, device)):
                    continue
                if id(tensor) not in copies:
                    data = tensor.detach().clone()
                    copies[id(tensor)] = (torch.nn.Parameter(data, requires_grad=False)
                                          if isinstance(tensor, torch.nn.Parameter) else data)
                    replaced += 1
                setattr(sub, name, copies[id(tensor)])
    return replaced


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


def for_autograd(value):
    """``value`` with every inference tensor replaced by an ordinary copy (tensors in dicts, lists and tuples
    too). Call it inside ``gradient_pass``: a copy made in inference mode is an inference tensor again."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {k: for_autograd(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(for_autograd(v) for v in value)
    return value


def _pytorch_attention(func, *args, **kwargs):
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def with_pytorch_attention(model_options: dict) -> dict:
    """A copy of ``model_options`` whose model calls use ComfyUI's PyTorch attention (it has a backward)."""
    options = dict(model_options)
    options["transformer_options"] = {**options.get("transformer_options", {}),
                                      "optimized_attention_override": _pytorch_attention}
    return options


@contextmanager
def gradient_pass(extra_args: dict | None = None) -> Iterator[dict]:
    """Autograd on despite the executor's inference mode; yields the keyword arguments for the model call:
    ``extra_args`` (the sampler's: model_options, seed, denoise_mask, ...) with PyTorch attention selected and
    its tensors made usable in autograd. Use a model prepared with ``enable_gradients``."""
    with torch.inference_mode(False), torch.enable_grad():
        args = {k: for_autograd(v) for k, v in (extra_args or {}).items() if k != "model_options"}
        args["model_options"] = with_pytorch_attention((extra_args or {}).get("model_options", {}))
        yield args
