"""The toy-world demo: PAIntA on the pack's own small 9-channel shapes-world model, no download needed.

toy_world_demo.json: ToyWorldScene makes a 256 px scene, a mask beside another object ("nearby": the case where
plain inpainting extends the neighbour) and a prompt naming a different colour and shape; the prompt output feeds
the positive CLIPTextEncode and PAIntA through links, so a new seed brings its own prompt. The 9-channel toy model
inpaints through InpaintModelConditioning with DDIM, the result is pasted into the scene inside the mask, and a
second image shows scene | mask | result side by side. Values: 20 DDIM steps at CFG 4 (the CFG the toy trainer
evaluates at), PAIntA at H/16 and H/32 (the toy UNet's attention resolutions for 256 px, the paper's). RASG is left
out: in the toy world its standardised gradient leaves a high-frequency pattern in the hole (docs/toy-world.md,
evidence), so the demo would show noise; profi_painter.json is the paper's full pipeline for real checkpoints.

Overrides: --seed sets the scene and the sampler noise together (scene N), --prompt replaces the scene's prompt
everywhere it is used. The model files come from the pack's toy/ folder, so --smoke generates nothing.
"""
from __future__ import annotations

from build import Graph, sample_custom

CHECKPOINT = "toy_world_inpaint.safetensors"
SEED = 1                # scene 1: the prompt asks for a blue triangle beside a green circle
STEPS, CFG = 20, 4.0    # training/toy_world.py evaluates at CFG 4
PAINTA = [False, True, True, False, 0.0, 0.5, 0.7071, "area >= 0.5"]  # at_h8..at_h64, start, end, smoothing, layer mask


def linked_widget(g, node, name):
    """Give ``node`` an input slot for its widget ``name`` (the UI's "convert widget to input"), ready to link."""
    g.nodes[node - 1]["inputs"].append({"name": name, "type": "STRING", "link": None, "widget": {"name": name}})


def toy_world_demo(name):
    g = Graph("Toy world demo: PAIntA, no download")
    loader = g.node("ToyWorldLoader", [CHECKPOINT], "Toy world model (9-channel, pack's toy/ folder)",
                    outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], col=0, row=0)
    scene = g.node("ToyWorldScene", [SEED, "fixed", "nearby"], "Scene, mask and prompt (nearby object)",
                   outputs=[("image", "IMAGE"), ("mask", "MASK"), ("prompt", "STRING"), ("caption", "STRING"),
                            ("subject", "IMAGE")], col=0, row=1)
    pos = g.node("CLIPTextEncode", [""], "Prompt (from the scene)", inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], col=1, row=0)
    neg = g.node("CLIPTextEncode", [""], "Negative (empty)", inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], col=1, row=1)
    cond = g.node("InpaintModelConditioning", [True], inputs=[("positive", "CONDITIONING"),
                  ("negative", "CONDITIONING"), ("vae", "VAE"), ("pixels", "IMAGE"), ("mask", "MASK")],
                  outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
                  col=2, row=1)
    painta = g.node("PAIntAPatch", [""] + PAINTA, "PAIntA", inputs=[("model", "MODEL"), ("clip", "CLIP"),
                    ("mask", "MASK")], outputs=[("MODEL", "MODEL"), ("mask_levels", "IMAGE")], col=2, row=0)
    sampler = g.node("KSamplerSelect", ["ddim"], "DDIM", outputs=[("SAMPLER", "SAMPLER")], col=3, row=2)
    for node, text in ((pos, "text"), (painta, "prompt")):
        linked_widget(g, node, text)
        g.link(scene, 2, node, text)
    g.link(loader, 1, pos, "clip"), g.link(loader, 1, neg, "clip")
    g.link(pos, 0, cond, "positive"), g.link(neg, 0, cond, "negative"), g.link(loader, 2, cond, "vae")
    g.link(scene, 0, cond, "pixels"), g.link(scene, 1, cond, "mask")
    g.link(loader, 0, painta, "model"), g.link(loader, 1, painta, "clip"), g.link(scene, 1, painta, "mask")
    sc, sched = sample_custom(g, (painta, 0), (cond, 0), (cond, 1), sampler, (cond, 2), STEPS,
                              f"Schedule ({STEPS} DDIM steps)", seed=SEED, cfg=CFG)
    dec = g.node("VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 col=5, row=1)
    comp = g.node("ImageCompositeMasked", [0, 0, False], "Paste into the scene",
                  inputs=[("destination", "IMAGE"), ("source", "IMAGE"), ("mask", "MASK")],
                  outputs=[("IMAGE", "IMAGE")], col=6, row=1)
    save = g.node("SaveImage", ["toy-world-demo"], "Result", inputs=[("images", "IMAGE")], col=7, row=1)
    g.link(sc, 0, dec, "samples"), g.link(loader, 2, dec, "vae")
    g.link(scene, 0, comp, "destination"), g.link(dec, 0, comp, "source"), g.link(scene, 1, comp, "mask")
    g.link(comp, 0, save, "images")
    # Before / after for a person: scene | mask (white = inpaint) | result, 8 px white gaps.
    mask_image = g.node("MaskToImage", [], inputs=[("mask", "MASK")], outputs=[("IMAGE", "IMAGE")], col=5, row=2)
    with_mask = g.node("ImageStitch", ["right", True, 8, "white"], "Scene | mask",
                       inputs=[("image1", "IMAGE"), ("image2", "IMAGE")], outputs=[("IMAGE", "IMAGE")], col=6, row=2)
    with_result = g.node("ImageStitch", ["right", True, 8, "white"], "Scene | mask | result",
                         inputs=[("image1", "IMAGE"), ("image2", "IMAGE")], outputs=[("IMAGE", "IMAGE")],
                         col=7, row=2)
    side_by_side = g.node("SaveImage", ["toy-world-demo-before-after"], "Before and after",
                          inputs=[("images", "IMAGE")], col=8, row=2)
    g.link(scene, 1, mask_image, "mask"), g.link(scene, 0, with_mask, "image1")
    g.link(mask_image, 0, with_mask, "image2"), g.link(with_mask, 0, with_result, "image1")
    g.link(comp, 0, with_result, "image2"), g.link(with_result, 0, side_by_side, "images")
    g.save(name, {"overrides": {"prompt": [[pos, "text"], [painta, "prompt"]],
                                "negative": [[neg, "text"]], "seed": [[scene, "seed"], [sc, "noise_seed"]],
                                "steps": [[sched, "steps"]]},
                  # no smoke models: the toy files are the pack's own; smoke runs only sample fewer steps
                  "smoke": {"steps": 2}},
           about="PAIntA on the pack's own small 9-channel shapes-world model (toy/ folder): nothing to download. "
                 "The scene node draws a 256 px scene, a mask beside another object and a prompt naming a different "
                 "colour and shape; change the seed for a new scene and prompt. Press Run: the result and a "
                 "scene | mask | result strip appear on the right.",
           settings=f"Toy model: DDIM {STEPS} steps at CFG {CFG:g} (the toy trainer's evaluation CFG); PAIntA at H/16 "
                    "and H/32 (the toy UNet's attention resolutions for 256 px, the paper's), first half of the "
                    "schedule. RASG is left out here (docs/toy-world.md).")


def build():
    toy_world_demo("toy_world_demo.json")
