"""The toy-world demo: PAIntA's effect on the pack's own small 9-channel model, no download needed.

toy_world_demo.json: ToyWorldScene makes a 256 px scene of the prompt-neglect world (a textured background, a mask
covering part of a neighbour, a prompt naming an object absent from the scene); the prompt output feeds the positive
CLIPTextEncode and PAIntA through links, so a new seed brings its own prompt. The model is the one trained the way
Stable Inpainting was (toy_world_sd_inpaint.safetensors, docs/toy-world.md), which neglects the prompt as real
inpainting models do. The same latent, schedule and noise seed are sampled twice through InpaintModelConditioning
with DDIM: the plain model and the model with PAIntA. Each result is pasted into the scene inside the mask; one image
shows scene | mask | without PAIntA | with PAIntA. Values: 20 DDIM steps at CFG 4 (the CFG the toy trainer evaluates
at), PAIntA at H/16 and H/32 (the toy UNet's attention resolutions for 256 px, the paper's). RASG is left out
(docs/toy-world.md has its table); profi_painter.json is the paper's full pipeline for real checkpoints.

Overrides: --seed sets the scene and both samplers' noise together (scene N), --prompt replaces the scene's prompt
everywhere it is used. The model files come from the pack's toy/ folder, so --smoke generates nothing.
"""
from __future__ import annotations

from build import Graph, sample_custom, sampler_custom

CHECKPOINT = "toy_world_sd_inpaint.safetensors"   # the prompt-neglect world's model (docs/toy-world.md)
WORLD, KIND = "neglect", "nearby"
SEED = 10041           # scene 10041 (a "nearby" case of the 400 in docs/toy-world.md): without PAIntA the texture
                        # fills the hole; with it, the prompted object is painted
STEPS, CFG = 20, 4.0    # training/toy_world.py evaluates at CFG 4
PAINTA = [False, True, True, False, 0.0, 0.5, 0.7071, "area >= 0.5"]  # at_h8..at_h64, start, end, smoothing, layer mask


def linked_widget(g, node, name):
    """Give ``node`` an input slot for its widget ``name`` (the UI's "convert widget to input"), ready to link."""
    g.nodes[node - 1]["inputs"].append({"name": name, "type": "STRING", "link": None, "widget": {"name": name}})


def toy_world_demo(name):
    g = Graph("Toy world demo: with and without PAIntA, no download")
    loader = g.node("ToyWorldLoader", [CHECKPOINT], "Toy inpainting model (9-channel, prompt neglect; pack's toy/)",
                    outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], col=0, row=0)
    scene = g.node("ToyWorldScene", [SEED, "fixed", KIND, WORLD], "Scene, mask and prompt (prompt-neglect world)",
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
    # Two samplers on the same schedule, latent and noise seed: the plain model, and the model with PAIntA.
    sc, sched = sample_custom(g, (painta, 0), (cond, 0), (cond, 1), sampler, (cond, 2), STEPS,
                              f"Schedule ({STEPS} DDIM steps, both samplers)", seed=SEED, cfg=CFG)
    g.nodes[sc - 1]["title"] = f"Sample with PAIntA (CFG {CFG:g})"
    plain = sampler_custom(g, (loader, 0), (cond, 0), (cond, 1), sampler, sched, (cond, 2), SEED, CFG,
                           f"Sample without PAIntA (CFG {CFG:g})", row=2)
    pasted = {}
    for which, node, row in (("with", sc, 1), ("without", plain, 2)):
        dec = g.node("VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                     col=5, row=row)
        comp = g.node("ImageCompositeMasked", [0, 0, False], f"Paste into the scene ({which} PAIntA)",
                      inputs=[("destination", "IMAGE"), ("source", "IMAGE"), ("mask", "MASK")],
                      outputs=[("IMAGE", "IMAGE")], col=6, row=row)
        g.link(node, 0, dec, "samples"), g.link(loader, 2, dec, "vae")
        g.link(scene, 0, comp, "destination"), g.link(dec, 0, comp, "source"), g.link(scene, 1, comp, "mask")
        pasted[which] = comp
    save = g.node("SaveImage", ["toy-world-demo"], "Result (with PAIntA)", inputs=[("images", "IMAGE")], col=7,
                  row=1)
    g.link(pasted["with"], 0, save, "images")
    # Side by side for a person: scene | mask (white = inpaint) | without PAIntA | with PAIntA, 8 px white gaps.
    mask_image = g.node("MaskToImage", [], inputs=[("mask", "MASK")], outputs=[("IMAGE", "IMAGE")], col=5, row=3)
    strip, previous = None, (scene, 0)
    for title, source, col in (("Scene | mask", (mask_image, 0), 6), ("... | without PAIntA", (pasted["without"], 0), 7),
                               ("... | with PAIntA", (pasted["with"], 0), 8)):
        strip = g.node("ImageStitch", ["right", True, 8, "white"], title,
                       inputs=[("image1", "IMAGE"), ("image2", "IMAGE")], outputs=[("IMAGE", "IMAGE")], col=col, row=3)
        g.link(*previous, strip, "image1"), g.link(*source, strip, "image2")
        previous = (strip, 0)
    side_by_side = g.node("SaveImage", ["toy-world-demo-with-without-painta"], "Without and with PAIntA",
                          inputs=[("images", "IMAGE")], col=9, row=3)
    g.link(scene, 1, mask_image, "mask"), g.link(strip, 0, side_by_side, "images")
    g.save(name, {"overrides": {"prompt": [[pos, "text"], [painta, "prompt"]],
                                "negative": [[neg, "text"]],
                                "seed": [[scene, "seed"], [sc, "noise_seed"], [plain, "noise_seed"]],
                                "steps": [[sched, "steps"]]},
                  # no smoke models: the toy files are the pack's own; smoke runs only sample fewer steps
                  "smoke": {"steps": 2}},
           about="PAIntA's effect on the pack's own small 9-channel shapes-world model (toy/ folder), trained the way "
                 "Stable Inpainting was, so it neglects the prompt as real inpainting models do: nothing to download. "
                 "The scene node draws a 256 px scene on a textured background, a mask and a prompt naming an object "
                 "that is not in the scene. The same latent and noise are sampled twice, without and with PAIntA. "
                 "Press Run: the result and a scene | mask | without | with strip appear on the right.",
           settings=f"Toy model: DDIM {STEPS} steps at CFG {CFG:g} (the toy trainer's evaluation CFG); PAIntA at H/16 "
                    "and H/32 (the toy UNet's attention resolutions for 256 px, the paper's), first half of the "
                    "schedule. What PAIntA does on this model over 400 cases: docs/toy-world.md.")


def build():
    toy_world_demo("toy_world_demo.json")
