"""Writes the bundled workflows (UI format, the JSON ComfyUI saves and users share).

    python workflows/build.py        # rewrites workflows/*.json

The JSON files are the product; this script keeps their variants (the paper's ablation rows) consistent. Each
workflow declares the runner's override targets and smoke-mode models in ``extra.faithful_inpaint``
(see headless/overrides.py).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # lets workflows/build_<mechanism>.py import these helpers as `build`

NEGATIVE = "blurry, low quality, deformed, watermark"
PROMPT = "a blue vase with flowers"


class Graph:
    """Minimal UI-format graph: nodes with widget values, typed links, positions laid out left to right."""

    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, widgets=(), title=None, inputs=(), outputs=(), col=0, row=0):
        nid = len(self.nodes) + 1
        node = {"id": nid, "type": type_, "pos": [40 + 340 * col, 40 + 230 * row], "size": [300, 180],
                "flags": {}, "order": nid - 1, "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
                "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return nid

    def link(self, src, src_slot, dst, dst_input):
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(d["inputs"]) if inp["name"] == dst_input)
        lid = len(self.links) + 1
        typ = s["outputs"][src_slot]["type"]
        self.links.append([lid, src, src_slot, dst, slot, typ])
        s["outputs"][src_slot]["links"].append(lid)
        d["inputs"][slot]["link"] = lid

    def save(self, name, extra):
        wf = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": [], "config": {}, "extra": {"faithful_inpaint": extra}, "version": 0.4}
        (HERE / name).write_text(json.dumps(wf, indent=1) + "\n")


def loaders(g, ckpt_name, ckpt_title, prompt=PROMPT):
    """Checkpoint, image, mask (white = inpaint) and the two prompts, as every workflow here starts."""
    ckpt = g.node("CheckpointLoaderSimple", [ckpt_name], ckpt_title,
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], col=0, row=0)
    image = g.node("LoadImage", ["example.png", "image"], "Image", outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                   col=0, row=1)
    mask = g.node("LoadImageMask", ["example_mask.png", "red", "image"], "Mask (white = inpaint)",
                  outputs=[("MASK", "MASK")], col=0, row=2)
    pos = g.node("CLIPTextEncode", [prompt], "Prompt", inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], col=1, row=0)
    neg = g.node("CLIPTextEncode", [NEGATIVE], "Negative", inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], col=1, row=1)
    g.link(ckpt, 1, pos, "clip"), g.link(ckpt, 1, neg, "clip")
    return {"ckpt": ckpt, "image": image, "mask": mask, "pos": pos, "neg": neg, "prompt_targets": [[pos, "text"]]}


def sample_custom(g, model_src, pos_src, neg_src, sampler, latent_src, steps, title, seed=7, cfg=7.5):
    """BasicScheduler (ddim_uniform) + SamplerCustom around ``sampler`` (the papers' CFG 7.5 and the pack's seed 7
    unless given); returns (SamplerCustom, scheduler)."""
    sched = g.node("BasicScheduler", ["ddim_uniform", steps, 1.0], title, inputs=[("model", "MODEL")],
                   outputs=[("SIGMAS", "SIGMAS")], col=3, row=3)
    sc = g.node("SamplerCustom", [True, seed, "fixed", cfg], f"Sample (CFG {cfg:g})",
                inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                outputs=[("output", "LATENT"), ("denoised_output", "LATENT")], col=4, row=1)
    g.link(*model_src, sched, "model")
    g.link(*model_src, sc, "model"), g.link(*pos_src, sc, "positive"), g.link(*neg_src, sc, "negative")
    g.link(sampler, 0, sc, "sampler"), g.link(sched, 0, sc, "sigmas"), g.link(*latent_src, sc, "latent_image")
    return sc, sched


def ksampler(g, model, positive, negative, latent, title, col, sampler="ddim", scheduler="ddim_uniform"):
    """A KSampler at the papers' settings (50 steps, CFG 7.5, seed 7), its inputs linked from (node, slot) sources."""
    ks = g.node("KSampler", [7, "fixed", 50, 7.5, sampler, scheduler, 1.0], title,
                inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")], col=col, row=1)
    g.link(*model, ks, "model"), g.link(*positive, ks, "positive"), g.link(*negative, ks, "negative")
    g.link(*latent, ks, "latent_image")
    return ks


def decode_and_paste(g, latent_src, vae_src, image, mask):
    """VAEDecode, then the result pasted into the original inside the mask; returns the composite node."""
    dec = g.node("VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 col=5, row=1)
    g.link(*latent_src, dec, "samples"), g.link(*vae_src, dec, "vae")
    comp = g.node("ImageCompositeMasked", [0, 0, False], "Paste into the original",
                  inputs=[("destination", "IMAGE"), ("source", "IMAGE"), ("mask", "MASK")],
                  outputs=[("IMAGE", "IMAGE")], col=6, row=1)
    g.link(image, 0, comp, "destination"), g.link(dec, 0, comp, "source"), g.link(mask, 0, comp, "mask")
    return comp


def inpaint_stage(g, painta: bool, rasg: bool | None, prompt_suffix=""):
    """Stage 1 of every inpainting workflow. rasg=None: a plain KSampler graph; False/True: SamplerCustom with
    DDIM or the RASG sampler (the paper's table 2 rows). Returns the node ids later stages and overrides need."""
    ids = loaders(g, "sd-v1-5-inpainting.safetensors", "Load inpainting checkpoint", PROMPT + prompt_suffix)
    ckpt, image, mask, pos, neg = (ids[k] for k in ("ckpt", "image", "mask", "pos", "neg"))
    grow = g.node("GrowMask", [1, True], "Dilate mask 1 px (as the reference)", inputs=[("mask", "MASK")],
                  outputs=[("MASK", "MASK")], col=1, row=2)
    ids["grow"] = grow
    cond = g.node("InpaintModelConditioning", [True], inputs=[("positive", "CONDITIONING"),
                  ("negative", "CONDITIONING"), ("vae", "VAE"), ("pixels", "IMAGE"), ("mask", "MASK")],
                  outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
                  col=2, row=1)
    g.link(mask, 0, grow, "mask")
    g.link(pos, 0, cond, "positive"), g.link(neg, 0, cond, "negative"), g.link(ckpt, 2, cond, "vae")
    g.link(image, 0, cond, "pixels"), g.link(grow, 0, cond, "mask")
    model_src = (ckpt, 0)
    if painta:
        pa = g.node("PAIntAPatch", [PROMPT, False, True, True, False, 0.0, 0.5, 0.7071, "area >= 0.5"], "PAIntA",
                    inputs=[("model", "MODEL"), ("clip", "CLIP"), ("mask", "MASK")],
                    outputs=[("MODEL", "MODEL"), ("mask_levels", "IMAGE")], col=2, row=0)
        g.link(*model_src, pa, "model"), g.link(ckpt, 1, pa, "clip"), g.link(grow, 0, pa, "mask")
        prev = g.node("PreviewImage", [], "PAIntA mask levels", inputs=[("images", "IMAGE")], col=3, row=0)
        g.link(pa, 1, prev, "images")
        model_src = (pa, 0)
        ids["prompt_targets"].append([pa, "prompt"])
    if rasg is None:
        ks = ksampler(g, model_src, (cond, 0), (cond, 1), (cond, 2), "Sampler (paper: DDIM 50, CFG 7.5)", col=3)
        ids.update(seed=[[ks, "seed"]], steps=[[ks, "steps"]], latent=(ks, 0))
    else:
        if rasg:
            guide = g.node("RASGGuidance", [PROMPT, "1/32 (paper)", "area >= 0.5"], "RASG guidance",
                           inputs=[("model", "MODEL"), ("clip", "CLIP")], outputs=[("MODEL", "MODEL")], col=3, row=0)
            g.link(*model_src, guide, "model"), g.link(ckpt, 1, guide, "clip")
            model_src = (guide, 0)
            ids["prompt_targets"].append([guide, "prompt"])
            sampler = g.node("RASGSampler", [0.15, "paper (eq. 11)", 0.0, 1.0], "RASG sampler (eta 0.15)",
                             outputs=[("SAMPLER", "SAMPLER")], col=3, row=2)
        else:
            sampler = g.node("KSamplerSelect", ["ddim"], "DDIM", outputs=[("SAMPLER", "SAMPLER")], col=3, row=2)
        sc, sched = sample_custom(g, model_src, (cond, 0), (cond, 1), sampler, (cond, 2), 50,
                                  "Schedule (paper: 50 DDIM steps)")
        ids.update(seed=[[sc, "noise_seed"]], steps=[[sched, "steps"]], latent=(sc, 0))
    comp = decode_and_paste(g, ids["latent"], (ckpt, 2), image, grow)
    ids["result"] = comp
    return ids


def overrides(ids, ckpt_targets=None):
    return {"prompt": ids["prompt_targets"], "negative": [[ids["neg"], "text"]], "seed": ids["seed"],
            "steps": ids["steps"], "image": [[ids["image"], "image"]], "mask": [[ids["mask"], "image"]],
            "ckpt": ckpt_targets or [[ids["ckpt"], "ckpt_name"]]}


def save_result(g, ids, col=7):
    save = g.node("SaveImage", ["faithful-inpaint"], "Result", inputs=[("images", "IMAGE")], col=col, row=1)
    g.link(ids["result"], 0, save, "images")


def single_stage(name, painta, rasg):
    g = Graph()
    ids = inpaint_stage(g, painta, rasg)
    save_result(g, ids)
    g.save(name, {"overrides": overrides(ids),
                  "smoke": {"ckpt": "sd15_inpaint", "image_size": [256, 256], "steps": 2}})


def profi_painter_hd(name):
    """Appendix E: the image is inpainted at a quarter of its size, then upscaled x4 with the inpainting-specialised
    conditional super-resolution (512 px -> 2048 px for the paper's sizes)."""
    g = Graph()
    ids = inpaint_stage(g, painta=True, rasg=True)
    # Stage 1 works on the image and mask scaled to a quarter; the originals feed the upscaler.
    image_links = [l for l in g.links if l[1] == ids["image"]]
    small = g.node("ImageScaleBy", ["area", 0.25], "Image / 4", inputs=[("image", "IMAGE")],
                   outputs=[("IMAGE", "IMAGE")], col=1, row=3)
    grow_small = g.node("ImageToMask", ["red"], "Mask / 4", inputs=[("image", "IMAGE")],
                        outputs=[("MASK", "MASK")], col=2, row=3)
    mask_img = g.node("MaskToImage", [], inputs=[("mask", "MASK")], outputs=[("IMAGE", "IMAGE")], col=1, row=4)
    mask_small = g.node("ImageScaleBy", ["area", 0.25], "Mask image / 4", inputs=[("image", "IMAGE")],
                        outputs=[("IMAGE", "IMAGE")], col=2, row=4)
    g.link(ids["image"], 0, small, "image")
    for link in image_links:  # every stage-1 consumer of the image now reads the small one
        _relink(g, link, small, 0)
    grow_links = [l for l in g.links if l[1] == ids["grow"]]
    g.link(ids["grow"], 0, mask_img, "mask"), g.link(mask_img, 0, mask_small, "image")
    g.link(mask_small, 0, grow_small, "image")
    for link in grow_links:
        _relink(g, link, grow_small, 0)
    x4 = g.node("CheckpointLoaderSimple", ["x4-upscaler-ema.safetensors"], "Load SD x4 upscaler",
                outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], col=5, row=3)
    hr_pos = g.node("CLIPTextEncode", [PROMPT + ", high resolution professional photo"], "Upscaler prompt",
                    inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], col=6, row=3)
    hr_neg = g.node("CLIPTextEncode", [NEGATIVE], "Upscaler negative", inputs=[("clip", "CLIP")],
                    outputs=[("CONDITIONING", "CONDITIONING")], col=6, row=4)
    g.link(x4, 1, hr_pos, "clip"), g.link(x4, 1, hr_neg, "clip")
    sr = g.node("InpaintConditionalUpscale", [7, "fixed", 20, 7.5, 20, 19, 19, 48, 32, "auto", 512],
                "Inpainting-specialised x4 super-resolution",
                inputs=[("model", "MODEL"), ("vae", "VAE"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("image", "IMAGE"), ("mask", "MASK"), ("low_res", "IMAGE")],
                outputs=[("IMAGE", "IMAGE"), ("blend_masks", "IMAGE")], col=7, row=2)
    g.link(x4, 0, sr, "model"), g.link(x4, 2, sr, "vae"), g.link(hr_pos, 0, sr, "positive")
    g.link(hr_neg, 0, sr, "negative"), g.link(ids["image"], 0, sr, "image"), g.link(ids["grow"], 0, sr, "mask")
    g.link(ids["result"], 0, sr, "low_res")
    low = g.node("PreviewImage", [], "Low-resolution result", inputs=[("images", "IMAGE")], col=7, row=0)
    g.link(ids["result"], 0, low, "images")
    ids["result"] = sr
    save_result(g, ids, col=8)
    ov = overrides(ids, ckpt_targets=[[ids["ckpt"], "ckpt_name"], [x4, "ckpt_name"]])
    ov["upscale_steps"] = [[sr, "steps"]]
    g.save(name, {"overrides": ov, "smoke": {"ckpt": ["sd15_inpaint", "sd_x4_upscaler"], "image_size": [256, 256],
                                             "steps": 2, "upscale_steps": 2}})


def pilot_start(g):
    """The start of every PILOT graph: a plain SD1.5 checkpoint and the image encoded with its noise mask (the known
    image PILOT reads, ComfyUI's 1 = regenerate)."""
    ids = loaders(g, "v1-5-pruned-emaonly.safetensors", "Load plain SD1.5 checkpoint")
    ckpt, image, mask = ids["ckpt"], ids["image"], ids["mask"]
    enc = g.node("VAEEncode", [], inputs=[("pixels", "IMAGE"), ("vae", "VAE")], outputs=[("LATENT", "LATENT")],
                 col=1, row=2)
    noise_mask = g.node("SetLatentNoiseMask", [], inputs=[("samples", "LATENT"), ("mask", "MASK")],
                        outputs=[("LATENT", "LATENT")], col=2, row=2)
    g.link(image, 0, enc, "pixels"), g.link(ckpt, 2, enc, "vae")
    g.link(enc, 0, noise_mask, "samples"), g.link(mask, 0, noise_mask, "mask")
    ids["noise_mask"] = noise_mask
    return ids


def pilot_finish(g, ids, guide, sampler, positive, negative):
    """The end of every PILOT graph: SamplerCustom (100 DDIM steps, as the reference), decode, paste, save; returns
    the overrides with the inner-step count that smoke runs lower."""
    sc, sched = sample_custom(g, (guide, 0), positive, negative, sampler, (ids["noise_mask"], 0), 100,
                              "Schedule (reference: 100 DDIM steps)")
    ids.update(seed=[[sc, "noise_seed"]], steps=[[sched, "steps"]],
               result=decode_and_paste(g, (sc, 0), (ids["ckpt"], 2), ids["image"], ids["mask"]))
    ids["prompt_targets"].append([guide, "prompt"])
    save_result(g, ids)
    ov = overrides(ids)
    ov["pilot_inner_steps"] = [[sampler, "inner_steps"]]
    return ov


def pilot_text(name):
    """PILOT (text-guided): a plain SD1.5 checkpoint, the encoded image with its noise mask, the PILOT model patch and
    the PILOT sampler (reference: 100 DDIM steps, optimise every 10 steps with 10 inner steps, lr 0.025, gamma 1)."""
    g = Graph()
    ids = pilot_start(g)
    guide = g.node("PILOTGuidance", [PROMPT, True, "reference (bilinear, = 1)"], "PILOT guidance",
                   inputs=[("model", "MODEL"), ("clip", "CLIP")], outputs=[("MODEL", "MODEL")], col=2, row=0)
    sampler = g.node("PILOTSampler", ["reference", 10, 10, 0.025, 0.007, 150.0, 1.0, 0.7, "binary (reference)"],
                     "PILOT sampler (reference text config)", outputs=[("SAMPLER", "SAMPLER")], col=3, row=2)
    g.link(ids["ckpt"], 0, guide, "model"), g.link(ids["ckpt"], 1, guide, "clip")
    ov = pilot_finish(g, ids, guide, sampler, (ids["pos"], 0), (ids["neg"], 0))
    # smoke: one inner step keeps the end-to-end run on random full-size weights (CPU) short
    g.save(name, {"overrides": ov, "smoke": {"ckpt": "sd15", "image_size": [256, 256], "steps": 2,
                                             "pilot_inner_steps": 1}})


def _relink(g, link, new_src, new_slot):
    """Point an existing link at another source output."""
    old_src, old_slot = link[1], link[2]
    g.nodes[old_src - 1]["outputs"][old_slot]["links"].remove(link[0])
    link[1], link[2] = new_src, new_slot
    link[5] = g.nodes[new_src - 1]["outputs"][new_slot]["type"]
    g.nodes[new_src - 1]["outputs"][new_slot]["links"].append(link[0])


def main():
    single_stage("painta_inpaint.json", painta=True, rasg=None)
    # ProFI-Painter and the rows of the paper's table 2 (ablation): base, PAIntA only, RASG only, both.
    single_stage("profi_painter.json", painta=True, rasg=True)
    single_stage("profi_painter_ablation_base.json", painta=False, rasg=False)
    single_stage("profi_painter_ablation_painta.json", painta=True, rasg=False)
    single_stage("profi_painter_ablation_rasg.json", painta=False, rasg=True)
    profi_painter_hd("profi_painter_hd.json")
    pilot_text("pilot_text.json")
    # Each further mechanism keeps its graphs in workflows/build_<mechanism>.py with a build() of its own.
    for path in sorted(HERE.glob("build_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build()


if __name__ == "__main__":
    main()
