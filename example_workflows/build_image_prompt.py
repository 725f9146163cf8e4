"""Image-prompt workflows (LAR-Gen's decoupled image-prompt attention, IP-Adapter files).

pilot_image_prompt.json: PILOT with an image prompt on a plain SD1.5 checkpoint. The subject image goes through
ComfyUI's CLIP vision loader and the pack's IP-Adapter loader into "Apply image prompt" (beta 0.6, the whole
schedule, over the whole image as the reference applies its IP-Adapter); PILOT guidance then prepares that model,
so every inner optimisation step of the PILOT sampler runs the image-prompt attention too. Values: the reference's
IP-Adapter configuration of PILOT (configs/ipa_step100.yaml: 100 DDIM steps, optimise every 10 steps with 10 inner
steps, lr 0.03, first-step lr 0.007, coef 150, gamma 0.8, IP scale 0.6, semantic boundary control on). Runner:
``--image`` / ``--mask`` the scene, ``--subject`` the subject image (smoke runs generate one); in the UI pick the
subject in "Subject image".
"""
from __future__ import annotations

from build import EXAMPLE_SUBJECT, PROMPT, Graph, pilot_finish, pilot_start


def pilot_image_prompt(name):
    g = Graph("PILOT with an image prompt (IP-Adapter)")
    ids = pilot_start(g)
    ckpt = ids["ckpt"]
    clip_vision = g.node("CLIPVisionLoader", ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"],
                         "Load CLIP vision (ViT-H-14)", outputs=[("CLIP_VISION", "CLIP_VISION")], col=0, row=3)
    adapter = g.node("ImagePromptAdapterLoader", ["ip-adapter_sd15.safetensors"], "Load IP-Adapter (SD1.5)",
                     outputs=[("adapter", "IMAGE_PROMPT_ADAPTER")], col=0, row=4)
    subject = g.node("LoadImage", [EXAMPLE_SUBJECT, "image"], "Subject image",
                     outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], col=1, row=4)
    apply = g.node("ImagePromptApply", [0.6, 0.0, 1.0, "text + image"], "Apply image prompt (beta 0.6, whole image)",
                   inputs=[("model", "MODEL"), ("adapter", "IMAGE_PROMPT_ADAPTER"), ("clip_vision", "CLIP_VISION"),
                           ("image", "IMAGE"), ("attn_mask", "MASK"), ("clip", "CLIP")],
                   outputs=[("MODEL", "MODEL")], col=2, row=3)
    guide = g.node("PILOTGuidance", [PROMPT, True, "reference (bilinear, = 1)"], "PILOT guidance",
                   inputs=[("model", "MODEL"), ("clip", "CLIP")], outputs=[("MODEL", "MODEL")], col=3, row=0)
    sampler = g.node("PILOTSampler", ["reference", 10, 10, 0.03, 0.007, 150.0, 0.8, 0.7, "binary (reference)"],
                     "PILOT sampler (reference IP-Adapter config)", outputs=[("SAMPLER", "SAMPLER")], col=3, row=2)
    g.link(ckpt, 0, apply, "model"), g.link(adapter, 0, apply, "adapter"), g.link(clip_vision, 0, apply, "clip_vision")
    g.link(subject, 0, apply, "image")
    g.link(apply, 0, guide, "model"), g.link(ckpt, 1, guide, "clip")
    ov = pilot_finish(g, ids, guide, sampler, (ids["pos"], 0), (ids["neg"], 0))
    ov["subject"] = [[subject, "image"]]
    ov["clip_vision"] = [[clip_vision, "clip_name"]]
    ov["ipadapter"] = [[adapter, "adapter_name"]]
    ov["beta"] = [[apply, "beta"]]
    # smoke: one inner step keeps the end-to-end run on random full-size weights (CPU) short
    g.save(name, {"overrides": ov, "smoke": {"ckpt": "sd15", "clip_vision": "clip_vision_h",
                                             "ipadapter": "ipadapter_sd15", "image_size": [256, 256], "steps": 2,
                                             "pilot_inner_steps": 1}},
           about="PILOT with an image prompt on a plain SD1.5 checkpoint: the subject image goes through CLIP vision "
                 "and an IP-Adapter into the decoupled image-prompt attention, confined to the mask; every inner "
                 "optimisation step of the PILOT sampler runs it too.",
           settings="Reference IP-Adapter configuration: DDIM 100 steps, CFG 7.5, optimise every 10 steps with 10 "
                    "inner steps, lr 0.03 (first step 0.01), coefficient 150, gamma 0.8; image prompt beta 1.")


def build():
    pilot_image_prompt("pilot_image_prompt.json")
