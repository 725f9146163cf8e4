"""Writes the bundled workflows (UI format, the JSON ComfyUI saves and users share).

    python workflows/build.py        # rewrites workflows/*.json

The JSON files are the product; this script keeps their variants (the paper's ablation rows) consistent. Each
workflow declares the runner's override targets and smoke-mode models in ``extra.faithful_inpaint``
(see headless/overrides.py).
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

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


def inpaint_graph(painta: bool, sampler: str = "ddim", scheduler: str = "ddim_uniform"):
    """SD1.5 inpainting checkpoint -> InpaintModelConditioning -> [PAIntA] -> KSampler -> decode -> composite."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ["sd-v1-5-inpainting.safetensors"], "Load inpainting checkpoint",
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], col=0, row=0)
    image = g.node("LoadImage", ["example.png", "image"], "Image", outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                   col=0, row=1)
    mask = g.node("LoadImageMask", ["example_mask.png", "red", "image"], "Mask (white = inpaint)",
                  outputs=[("MASK", "MASK")], col=0, row=2)
    grow = g.node("GrowMask", [1, True], "Dilate mask 1 px (as the reference)", inputs=[("mask", "MASK")],
                  outputs=[("MASK", "MASK")], col=1, row=2)
    pos = g.node("CLIPTextEncode", [PROMPT], "Prompt", inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], col=1, row=0)
    neg = g.node("CLIPTextEncode", [NEGATIVE], "Negative", inputs=[("clip", "CLIP")],
                 outputs=[("CONDITIONING", "CONDITIONING")], col=1, row=1)
    cond = g.node("InpaintModelConditioning", [True], inputs=[("positive", "CONDITIONING"),
                  ("negative", "CONDITIONING"), ("vae", "VAE"), ("pixels", "IMAGE"), ("mask", "MASK")],
                  outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
                  col=2, row=1)
    for a, b in [(ckpt, pos), (ckpt, neg)]:
        g.link(a, 1, b, "clip")
    g.link(mask, 0, grow, "mask")
    g.link(pos, 0, cond, "positive"), g.link(neg, 0, cond, "negative"), g.link(ckpt, 2, cond, "vae")
    g.link(image, 0, cond, "pixels"), g.link(grow, 0, cond, "mask")
    model_src = (ckpt, 0)
    targets_prompt = [[pos, "text"]]
    if painta:
        pa = g.node("PAIntAPatch", [PROMPT, False, True, True, False, 0.0, 0.5, 0.7071], "PAIntA",
                    inputs=[("model", "MODEL"), ("clip", "CLIP"), ("mask", "MASK")],
                    outputs=[("MODEL", "MODEL"), ("mask_levels", "IMAGE")], col=2, row=0)
        g.link(ckpt, 0, pa, "model"), g.link(ckpt, 1, pa, "clip"), g.link(grow, 0, pa, "mask")
        prev = g.node("PreviewImage", [], "PAIntA mask levels", inputs=[("images", "IMAGE")], col=3, row=0)
        g.link(pa, 1, prev, "images")
        model_src = (pa, 0)
        targets_prompt.append([pa, "prompt"])
    ks = g.node("KSampler", [7, "fixed", 50, 7.5, sampler, scheduler, 1.0], "Sampler (paper: DDIM 50, CFG 7.5)",
                inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")], col=3, row=1)
    g.link(model_src[0], model_src[1], ks, "model")
    g.link(cond, 0, ks, "positive"), g.link(cond, 1, ks, "negative"), g.link(cond, 2, ks, "latent_image")
    dec = g.node("VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 col=4, row=1)
    g.link(ks, 0, dec, "samples"), g.link(ckpt, 2, dec, "vae")
    comp = g.node("ImageCompositeMasked", [0, 0, False], "Paste into the original",
                  inputs=[("destination", "IMAGE"), ("source", "IMAGE"), ("mask", "MASK")],
                  outputs=[("IMAGE", "IMAGE")], col=5, row=1)
    g.link(image, 0, comp, "destination"), g.link(dec, 0, comp, "source"), g.link(grow, 0, comp, "mask")
    save = g.node("SaveImage", ["faithful-inpaint"], "Result", inputs=[("images", "IMAGE")], col=6, row=1)
    g.link(comp, 0, save, "images")
    extra = {
        "overrides": {"prompt": targets_prompt, "negative": [[neg, "text"]], "seed": [[ks, "seed"]],
                      "steps": [[ks, "steps"]], "image": [[image, "image"]], "mask": [[mask, "image"]],
                      "ckpt": [[ckpt, "ckpt_name"]]},
        "smoke": {"ckpt": "sd15_inpaint", "image_size": [256, 256], "steps": 2},
    }
    return g, extra


def main():
    g, extra = inpaint_graph(painta=True)
    g.save("painta_inpaint.json", extra)


if __name__ == "__main__":
    main()
