"""PILOT workflows beyond the text-guided one (that one, pilot_text.json, is written by build.py).

pilot_controlnet.json: PILOT with ComfyUI's own ControlNet on a plain SD1.5 checkpoint. The control image is the
Canny edge map of the input image (swap the Canny node for any control image: a scribble or edge map of the object
you want); ControlNetApplyAdvanced puts the ControlNet into both conditionings, and PILOT's inner optimisation steps
recompute its residuals from the current latent. Values: the reference's ControlNet configuration (100 DDIM steps,
optimise every 10 steps with 10 inner steps, lr 0.03, first-step lr 0.01, coef 150, gamma 0.8, control scale 1,
semantic boundary control on).
"""
from __future__ import annotations

from build import PROMPT, Graph, pilot_finish, pilot_start


def pilot_controlnet(name):
    g = Graph("PILOT + ControlNet (Canny)")
    ids = pilot_start(g)
    ckpt, image = ids["ckpt"], ids["image"]
    control_net = g.node("ControlNetLoader", ["control_v11p_sd15_canny_fp16.safetensors"], "Load ControlNet (SD1.5)",
                         outputs=[("CONTROL_NET", "CONTROL_NET")], col=1, row=3, stage="inputs")
    edges = g.node("Canny", [0.4, 0.8], "Control image (Canny edges of the input)", inputs=[("image", "IMAGE")],
                   outputs=[("IMAGE", "IMAGE")], col=1, row=4)
    apply = g.node("ControlNetApplyAdvanced", [1.0, 0.0, 1.0], "Apply ControlNet (scale 1)",
                   inputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                           ("control_net", "CONTROL_NET"), ("image", "IMAGE")],
                   outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")], col=2, row=3)
    guide = g.node("PILOTGuidance", [PROMPT, True, "reference (bilinear, = 1)"], "PILOT guidance",
                   inputs=[("model", "MODEL"), ("clip", "CLIP")], outputs=[("MODEL", "MODEL")], col=2, row=0)
    sampler = g.node("PILOTSampler", ["reference", 10, 10, 0.03, 0.01, 150.0, 0.8, 0.7, "binary (reference)"],
                     "PILOT sampler (reference ControlNet config)", outputs=[("SAMPLER", "SAMPLER")], col=3, row=2)
    g.link(image, 0, edges, "image")
    g.link(ids["pos"], 0, apply, "positive"), g.link(ids["neg"], 0, apply, "negative")
    g.link(control_net, 0, apply, "control_net"), g.link(edges, 0, apply, "image")
    g.link(ckpt, 0, guide, "model"), g.link(ckpt, 1, guide, "clip")
    ov = pilot_finish(g, ids, guide, sampler, (apply, 0), (apply, 1))
    ov["controlnet"] = [[control_net, "control_net_name"]]
    # smoke: one inner step keeps the end-to-end run on random full-size weights (CPU) short
    g.save(name, {"overrides": ov, "smoke": {"ckpt": "sd15", "controlnet": "controlnet_sd15",
                                             "image_size": [256, 256], "steps": 2, "pilot_inner_steps": 1}},
           about="PILOT with ComfyUI's own ControlNet on a plain SD1.5 checkpoint. The control image is the Canny "
                 "edge map of the input (swap in any control image: a scribble or edge map of the object you want); "
                 "PILOT's inner optimisation steps recompute the ControlNet residuals from the current latent.",
           settings="Reference ControlNet configuration: DDIM 100 steps, CFG 7.5, optimise every 10 steps with 10 "
                    "inner steps, lr 0.03 (first step 0.01), coefficient 150, gamma 0.8, control scale 1, semantic "
                    "boundary control on.")


def build():
    pilot_controlnet("pilot_controlnet.json")
