"""Gradient passes (patching/gradients.py) through real ComfyUI UNets whose weights are inference tensors, with a
loss on captured cross-attention maps (the RASG / PILOT use); LoRA-patched models; the one-off weight conversion
leaves every model sharing the diffusion model bit-identical in output."""
import pytest
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.sd
from comfy.ldm.modules import attention
from faithful_inpaint.patching.attention_capture import AttentionRecorder
from faithful_inpaint.patching.gradients import (convert_inference_weights, enable_gradients, for_autograd,
                                                 gradient_pass)
from faithful_inpaint.devtools.random_models import build_model
from helpers import forward

INFERENCE_ERROR = "Inference tensors cannot be saved for backward"
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}


def case(family, inpaint=False, side=16):
    """A model built under inference mode and inference-mode inputs for a [cond, uncond] call."""
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        x = torch.randn(2, 4, side, side, generator=g)
        context = torch.randn(2, 77, CONTEXT_DIM[family], generator=g)
        concat = torch.randn(2, 5, side, side, generator=g) if inpaint else None
        y = torch.randn(2, 2816, generator=g) if family == "sdxl" else None
    return build_model(family, "tiny", inpaint=inpaint), x, context, concat, y


def load_for_sampling(model, shape):
    """What a sampling run does before its sampler starts: ComfyUI loads (and patches) the model through
    prepare_sampling, which runs the model's PREPARE_SAMPLING wrappers."""
    with torch.inference_mode():
        options = comfy.model_patcher.create_model_options_clone(model.model_options)
        comfy.sampler_helpers.prepare_model_patcher(model, {}, options)
        comfy.sampler_helpers.prepare_sampling(model, shape, {}, options)


def grad_forward(model, x, context, concat=None, y=None, cond_or_uncond=(0, 1), extra_args=None):
    """What a sampler does: a gradient pass around one model call; returns (output, leaf x)."""
    load_for_sampling(model, x.shape)
    with torch.inference_mode(), gradient_pass({"model_options": model.model_options, **(extra_args or {})}) as args:
        to = {**args["model_options"]["transformer_options"], "cond_or_uncond": list(cond_or_uncond)}
        x_in = x.detach().clone().requires_grad_(True)
        sigmas = torch.full((x.shape[0],), 2.0)
        to["sigmas"] = sigmas
        kwargs = {"c_concat": concat} if concat is not None else {}
        if y is not None:
            kwargs["y"] = y
        return model.model.apply_model(x_in, sigmas, c_crossattn=context, transformer_options=to, **kwargs), x_in


@pytest.mark.parametrize("family,inpaint", [("sd15", False), ("sd15", True), ("sdxl", False)])
def test_a_loss_on_captured_cross_attention_reaches_x_t(family, inpaint):
    model, x, context, concat, y = case(family, inpaint)
    recorder = AttentionRecorder(downsamples=(2, 4), probabilities=False, with_grad=True, cond_only=True)
    patched = recorder.install(enable_gradients(model))
    _, x_in = grad_forward(patched, x, context, concat, y, cond_or_uncond=(1, 0))
    with torch.inference_mode(False):
        loss = torch.stack([c.maps[..., 1:5].sigmoid().mean() for c in recorder.captures]).sum()
        (grad,) = torch.autograd.grad(loss, x_in)
    assert recorder.captures and all(c.kinds == (0,) for c in recorder.captures)
    assert torch.isfinite(grad).all()
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0  # only the conditional chunk (second) is scored


def test_without_enable_gradients_the_same_pass_fails_on_inference_weights():
    model, x, context, _, _ = case("sd15")
    assert next(model.model.parameters()).is_inference()
    recorder = AttentionRecorder(downsamples=(4,), with_grad=True)
    with pytest.raises(RuntimeError, match=INFERENCE_ERROR):
        out, x_in = grad_forward(recorder.install(model), x, context)
        with torch.inference_mode(False):
            torch.autograd.grad(out.square().mean(), x_in)


def test_gradient_pass_uses_pytorch_attention_for_the_pass_only(monkeypatch):
    model, x, context, _, _ = case("sd15", side=8)
    model = enable_gradients(model)
    calls = []
    pytorch_attention = attention.attention_pytorch
    monkeypatch.setattr(attention, "attention_pytorch", lambda *a, **k: calls.append(1) or pytorch_attention(*a, **k))
    with torch.inference_mode():
        extra_args = {"model_options": model.model_options, "denoise_mask": torch.ones(2, 1, 8, 8)}
        with gradient_pass(extra_args) as args:
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            assert not args["denoise_mask"].is_inference()
            assert args["model_options"]["transformer_options"]["optimized_attention_override"]
        assert torch.is_inference_mode_enabled()
    assert "optimized_attention_override" not in model.model_options["transformer_options"]
    assert extra_args["denoise_mask"].is_inference()
    out, x_in = grad_forward(model, x, context)
    with torch.inference_mode(False):
        (grad,) = torch.autograd.grad(out.square().mean(), x_in)
    assert calls and torch.isfinite(grad).all() and grad.abs().sum() > 0
    calls.clear()
    forward(model, x, 2.0, context)  # outside a pass: ComfyUI's own choice (attention_pytorch is not called by name)
    assert not calls


def weights(model):
    return dict(model.model.named_parameters())


def test_conversion_once_per_run_changes_no_output_and_leaves_models_usable():
    model, x, context, _, _ = case("sd15", side=8)
    before = forward(model, x, 2.0, context)
    enabled = enable_gradients(enable_gradients(model))
    kind = comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING
    assert model.get_all_wrappers(kind) == [] and len(enabled.get_all_wrappers(kind)) == 1
    assert len(enabled.model_options["transformer_options"]["patches"]["input_block_patch_after_skip"]) == 1
    assert "patches" not in model.model_options["transformer_options"]
    assert all(w.is_inference() for w in weights(model).values())
    out, x_in = grad_forward(enabled, x, context)
    with torch.inference_mode(False):
        (grad,) = torch.autograd.grad(out.square().mean(), x_in)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # The diffusion model is shared by every clone: its weights are now ordinary tensors with the same values,
    # so the original, and the prepared clone outside a pass, compute bit-identical outputs.
    assert not any(w.is_inference() for w in weights(model).values())
    assert torch.equal(forward(model, x, 2.0, context), before)
    assert torch.equal(forward(enabled, x, 2.0, context), before)
    assert convert_inference_weights([model]) == 0                     # nothing left: a later run pays nothing


def random_lora(model, rank=2, seed=4):
    """A LoRA state dict (kohya names) for every linear weight of the model's UNet, as a LoRA file holds."""
    import comfy.lora

    g = torch.Generator().manual_seed(seed)
    sd = {}
    params = weights(model)
    for lora_key, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        w = params.get(target if isinstance(target, str) else "")
        if not lora_key.startswith("lora_unet_") or w is None or w.dim() != 2:
            continue
        sd[f"{lora_key}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.15
        sd[f"{lora_key}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.15
        sd[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    assert sd
    return sd


def test_a_lora_patched_model_takes_gradients_and_every_model_stays_exact():
    model, x, context, _, _ = case("sd15", side=8)
    with torch.inference_mode():                                       # LoraLoader runs under inference mode
        lora, _ = comfy.sd.load_lora_for_models(model, None, random_lora(model), 1.0, 0.0)
    base_out, lora_out = forward(model, x, 2.0, context), forward(lora, x, 2.0, context)
    assert not torch.allclose(base_out, lora_out)
    grads = {}
    for name, m in (("base", model), ("lora", lora), ("base again", model)):
        out, x_in = grad_forward(enable_gradients(m), x, context)
        with torch.inference_mode(False):
            (grads[name],) = torch.autograd.grad(out.square().mean(), x_in)
        torch.testing.assert_close(out.detach(), base_out if name != "lora" else lora_out, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(grads["lora"]).all() and not torch.allclose(grads["lora"], grads["base"])
    assert torch.equal(grads["base"], grads["base again"])
    # ComfyUI's unpatching put its backups back: both models give exactly their outputs from before
    assert torch.equal(forward(model, x, 2.0, context), base_out)
    assert torch.equal(forward(lora, x, 2.0, context), lora_out)


def test_uncaptured_maps_are_detached_and_inference_tensors_are_copied_for_autograd():
    model, x, context, _, _ = case("sd15", side=8)
    recorder = AttentionRecorder(downsamples=(1,), with_grad=False)
    grad_forward(recorder.install(enable_gradients(model)), x, context)
    assert recorder.captures and not any(c.maps.requires_grad for c in recorder.captures)
    with torch.inference_mode():
        mask = torch.ones(3)
    with gradient_pass():
        leaf = torch.ones(3, requires_grad=True)
        with pytest.raises(RuntimeError, match=INFERENCE_ERROR):
            (leaf * mask).sum().backward()
        (leaf * for_autograd({"m": [mask]})["m"][0]).sum().backward()
    assert torch.equal(leaf.grad, torch.ones(3))


def test_a_guided_sampler_runs_gradient_passes_inside_comfyui_sampling_with_a_denoise_mask():
    """The consumers' pattern: a KSAMPLER function taking d(loss)/d(x_t) every step, under the executor's inference
    mode, through CFG and KSamplerX0Inpaint (denoise mask: no gradient reaches the kept region)."""
    import comfy.sample
    import comfy.samplers

    recorder = AttentionRecorder(downsamples=(4,), probabilities=False, with_grad=True, cond_only=True)
    grads = []

    def guided(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            recorder.clear()
            with gradient_pass(extra_args) as args:
                x_in = x.detach().clone().requires_grad_(True)
                denoised = model(x_in, sigmas[i] * s_in, **args)
                loss = torch.stack([c.maps.sigmoid().mean() for c in recorder.captures]).sum()
                (grad,) = torch.autograd.grad(loss, x_in)
            grads.append(grad)
            x = denoised.detach() + (x - denoised.detach()) * sigmas[i + 1] / sigmas[i] - 0.01 * grad
        return x

    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        model = recorder.install(enable_gradients(build_model("sd15", "tiny")))
        positive, negative = ([[torch.randn(1, 77, 768, generator=g), {}]] for _ in range(2))
        noise, mask = torch.randn(1, 4, 8, 8, generator=g), torch.zeros(1, 1, 8, 8)
        mask[..., 2:6, 2:6] = 1
        out = comfy.sample.sample_custom(model, noise, 5.0, comfy.samplers.KSAMPLER(guided), torch.tensor([5.0, 2.0, 0.0]),
                                         positive, negative, torch.zeros(1, 4, 8, 8), noise_mask=mask, seed=0)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert len(grads) == 2 and recorder.captures
    for grad in grads:
        assert torch.isfinite(grad).all() and grad[..., 2:6, 2:6].abs().sum() > 0
        assert grad.masked_fill(mask.bool(), 0).abs().sum() == 0
