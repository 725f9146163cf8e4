"""Model calls with gradients w.r.t. x_t inside a ComfyUI sampler (RASG's guidance, PILOT's latent optimisation).

Two obstacles, one answer each:
1. Loaded weights are inference tensors (every loader runs under ``torch.inference_mode()``), which autograd cannot
   save for backward. ``enable_gradients(model)`` (on the MODEL, before sampling) adds a weight wrapper to every
   UNet weight and bias, as ComfyUI's own LoRA-training node does: a module with a weight function copies its
   weight in every forward, and a copy made outside inference mode is an ordinary tensor.
   Measured against converting the weights to ordinary tensors once (random-weight SD1.5, CPU, 2 threads, one
   32x32 latent, median of 4 interleaved runs on a quiet machine):
                                 plain    wrapped   converted
       full (860 M) forward      0.88 s   1.10 s    0.88 s     conversion once: 0.55 s
       full grad forward+back      -      3.15 s    2.03 s
       tiny (2.5 M) forward      0.083 s  0.083 s   0.081 s    conversion once: 0.007 s
       tiny grad forward+back      -      0.074 s   0.070 s
   The wrapper costs a copy of every weight per forward (+25% on CPU; on a GPU it is memory bandwidth, not measured here), and in a
   gradient pass those copies are kept for backward (+55% on CPU; peak memory + one weight copy, e.g. 1.7 GB for
   SD1.5 in fp16). Wrappers are kept anyway: conversion is undone whenever ComfyUI re-patches weights under
   inference mode (a LoRA, another clone's patches, a reload) and would have to hook every load and replace
   parameters of the model object other clones share; wrappers go through the public API, live on this clone
   only, and also cover low-VRAM loading, where weights are cast per forward.
2. The executor samples under ``torch.inference_mode()``, and fast attention kernels (sage, flash, xformers) have
   no backward. ``gradient_pass(extra_args)`` leaves inference mode, enables autograd and gives the model call
   arguments whose ``model_options`` select ComfyUI's PyTorch attention (``optimized_attention_override``, read
   by every ``optimized_attention`` call) for that call only; the sampler's own ``extra_args`` are not modified.

What the caller does, inside the ``with`` block: make x a leaf (``x.detach().clone().requires_grad_(True)``), call
the model with the yielded arguments and a sigma computed inside the block (``sigmas[i] * s_in``), build the loss
and take the gradient. Every other tensor made before the pass that meets x or the loss (a sigma tensor passed
as is, a mask, a reference latent) must go through ``for_autograd`` first, or autograd raises "Inference tensors
cannot be saved for backward". ControlNets and other additional models run in the pass would need their own
weights made usable the same way (not done here).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def _copy_weight(weight):
    # The wrapper's presence is what matters: it makes ComfyUI's cast copy the weight (see module docstring).
    return weight.detach()


def enable_gradients(model):
    """A clone of ``model`` (a ModelPatcher) whose UNet weights can take part in autograd. Idempotent."""
    clone = model.clone()
    unet = clone.get_model_object("diffusion_model")
    for name, module in unet.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for param, _ in module.named_parameters(recurse=False):
            key = f"diffusion_model.{name}.{param}"
            if _copy_weight not in clone.weight_wrapper_patches.get(key, []):
                clone.add_weight_wrapper(key, _copy_weight)
    return clone


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
