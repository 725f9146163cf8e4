"""ComfyUI's ControlNet inside the gradient passes of PILOT (every inner step) and RASG: the control is applied to
the conditioning with ComfyUI's own ControlNetApplyAdvanced, its weights are inference tensors in their own
ModelPatcher (as ControlNetLoader leaves them), and its residuals are recomputed from the current x_t with autograd."""
import pytest
import torch

import comfy.controlnet
import comfy.model_management
import comfy.sample
import comfy.samplers
import nodes
from comfy.cldm.cldm import ControlNet
from faithful_inpaint.kernels import pilot as pilot_math
from faithful_inpaint.kernels import rasg as rasg_math
from faithful_inpaint.patching import pilot, rasg
from faithful_inpaint.devtools.random_models import randomise, build_model, unet_config

WORDS = [1, 2, 3]
LATENT = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))


def build_controlnet(family="sd15", seed=7):
    """A tiny random ControlNet matching the tiny UNet of ``family``, built under inference mode as ComfyUI's
    ControlNetLoader builds one (ComfyUI's cldm architecture and ControlNet wrapper, its own ModelPatcher)."""
    import comfy.ops

    cfg = unet_config(family, "tiny")
    cfg.pop("out_channels")
    with torch.inference_mode():
        net = ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **cfg)
        randomise(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=comfy.model_management.get_torch_device())


@pytest.fixture(scope="module")
def control():
    return build_controlnet()


def square(side=16):
    m = torch.zeros(1, 1, side, side)
    m[..., side // 4:3 * side // 4, side // 4:3 * side // 4] = 1
    return m


def conds(control_net=None, strength=1.0):
    g = torch.Generator().manual_seed(0)
    pos, neg = [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.zeros(1, 77, 768), {}]]
    if control_net is None:
        return pos, neg
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(9))     # IMAGE at 8x the latent
    with torch.inference_mode():
        return nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control_net, hint, strength, 0.0, 1.0)


def sample(model, sampler, positive, negative, steps=2):
    noise = torch.randn(LATENT.shape, generator=torch.Generator().manual_seed(1))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, 5.0, sampler, sigmas, positive, negative, LATENT,
                                          noise_mask=square(), seed=1, disable_pbar=True)


def spy_control_calls(monkeypatch, control_net):
    """(grad enabled, x requires grad) of every forward of the ControlNet's network."""
    calls = []
    net = control_net.control_model
    forward = net.forward

    def spy(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), kwargs["x"].requires_grad))
        return forward(*args, **kwargs)

    monkeypatch.setattr(net, "forward", spy)
    return calls


def spy_gradients(monkeypatch, module, name, position):
    """The gradient argument (at ``position``) of every call of ``module.name``."""
    grads = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        grads.append(args[position].detach().clone())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return grads


def test_pilot_inner_steps_recompute_the_control_with_gradients(control, monkeypatch):
    sd15 = build_model("sd15")
    assert all(p.is_inference() for p in control.control_model.parameters())      # as ControlNetLoader leaves them
    prepared = pilot.install(sd15, WORDS)
    sampler = comfy.samplers.KSAMPLER(pilot.sample_pilot, extra_options={"every": 10, "inner_steps": 3})
    plain_pos, plain_neg = conds()
    pos, neg = conds(control)
    euler = comfy.samplers.ksampler("euler")
    reference_with_control = sample(sd15, euler, pos, neg)

    calls = spy_control_calls(monkeypatch, control)
    grads = spy_gradients(monkeypatch, pilot_math, "momentum_step", 1)
    out = sample(prepared, sampler, pos, neg)
    assert torch.isfinite(out).all()
    assert calls[:3] == [(True, True)] * 3          # step 0: three inner steps, each its own control residuals
    assert all(not grad for grad, _ in calls[3:]) and len(calls) == 5       # then one plain call per step
    with_control = grads[:]
    grads.clear()
    sample(prepared, sampler, plain_pos, plain_neg)
    assert len(with_control) == len(grads) == 3
    # the ControlNet's effect is part of the gradient of every inner step
    for a, b in zip(with_control, grads):
        assert torch.isfinite(a).all() and not torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    # the control model's weights are ordinary tensors now, and the ControlNet gives exactly its old results
    assert not any(p.is_inference() for p in control.control_model.parameters())
    monkeypatch.undo()
    assert torch.equal(sample(sd15, euler, pos, neg), reference_with_control)


def test_rasg_gradient_includes_the_control(control, monkeypatch):
    sd15 = build_model("sd15", inpaint=True)
    prepared = rasg.install(sd15, WORDS)
    sampler = comfy.samplers.KSAMPLER(rasg.sample_rasg, extra_options={"eta": 0.15})
    calls = spy_control_calls(monkeypatch, control)
    grads = spy_gradients(monkeypatch, rasg_math, "standardised", 0)

    def gradient(positive, negative):
        grads.clear()
        sample(prepared, sampler, positive, negative)
        return grads[0]

    strong, weak = gradient(*conds(control, 1.0)), gradient(*conds(control, 0.5))
    assert (True, True) in calls                    # the guided call ran the ControlNet with autograd
    plain = gradient(*conds())
    assert torch.isfinite(strong).all()
    assert not torch.allclose(strong, plain, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(strong, weak, rtol=1e-3, atol=1e-6)
