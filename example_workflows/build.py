"""Writes the bundled workflows (UI format, the JSON ComfyUI saves and users share) into example_workflows/.

    python example_workflows/build.py            # rewrites example_workflows/*.json
    python example_workflows/build.py --measure  # first asks the real UI for its node sizes (node_sizes.json) and
                                                 # takes a thumbnail of each workflow as it opens (<name>.jpg),
                                                 # then the README's screenshots (--screenshots: only those)
    python example_workflows/build.py --measure --only toy_world_demo   # the same for the named workflows only
                                                 # (the other sizes and thumbnails are kept)

Measure with each tested host's frontend, the newest first and the pinned host last (its frontend takes the
thumbnails): COMFYUI_PATH=<0.12.1> <its venv>/bin/python example_workflows/build.py --measure, then the same without
COMFYUI_PATH. A workflow opens at the sizes already measured and a frontend only ever enlarges a node, so each run
keeps what the other needed (frontend 1.37 of ComfyUI 0.12.1 wants up to 30 px more width than 1.32 of 0.3.75 for
long titles and combo values).

The JSON files are the product; this script keeps their variants (the paper's ablation rows) consistent and lays
them out: one group per stage (inputs, the mechanism, sampling, decode and paste), left to right, nodes stacked in
columns at the sizes the frontend gives them (node_sizes.json, measured in the browser: the frontend enlarges a node
saved smaller than it needs), a note with the paper's settings and the files to download, a saved view that opens on
the note and the inputs at a zoom where the canvas draws text, and the frontend's ``models`` property on every loader
of a public file (the UI offers the downloads). Each workflow declares the runner's override targets and smoke-mode
models in ``extra.faithful_inpaint`` (see headless/overrides.py).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # lets example_workflows/build_<mechanism>.py import these helpers as `build`

NEGATIVE = "blurry, low quality, deformed, watermark"
PROMPT = "a blue vase with flowers"
# The example inputs (example_inputs/, copied into ComfyUI's input/faithful-inpaint/ when the pack loads).
EXAMPLE_IMAGE, EXAMPLE_MASK = "faithful-inpaint/coffee.jpg", "faithful-inpaint/coffee_mask.png"
EXAMPLE_SUBJECT = "faithful-inpaint/chelsea_subject.jpg"
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SD15_INPAINT = "sd-v1-5-inpainting.safetensors"

# Every public file a workflow names: ComfyUI model folder and where to get it. Graph.node puts the matching entries
# in the loader's ``properties.models`` (the frontend's missing-models dialog) and the note lists them.
MODELS = {
    SD15_INPAINT: ("checkpoints", "https://huggingface.co/webui/stable-diffusion-inpainting/resolve/main/"
                                  "sd-v1-5-inpainting.safetensors"),
    SD15: ("checkpoints", "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                          "v1-5-pruned-emaonly-fp16.safetensors"),
    "x4-upscaler-ema.safetensors": ("checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-x4-upscaler/"
                                                   "resolve/main/x4-upscaler-ema.safetensors"),
    "control_v11p_sd15_canny_fp16.safetensors": ("controlnet", "https://huggingface.co/comfyanonymous/"
                                                 "ControlNet-v1-1_fp16_safetensors/resolve/main/"
                                                 "control_v11p_sd15_canny_fp16.safetensors"),
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": ("clip_vision", "https://huggingface.co/h94/IP-Adapter/resolve/"
                                                    "main/models/image_encoder/model.safetensors"),
    "ip-adapter_sd15.safetensors": ("ipadapter", "https://huggingface.co/h94/IP-Adapter/resolve/main/models/"
                                                 "ip-adapter_sd15.safetensors"),
    "ip-adapter-plus_sd15.safetensors": ("ipadapter", "https://huggingface.co/h94/IP-Adapter/resolve/main/models/"
                                                      "ip-adapter-plus_sd15.safetensors"),
    "brushnet/random_mask_brushnet_ckpt/diffusion_pytorch_model.safetensors": (
        "inpaint", "https://huggingface.co/LiuZichen/MagicQuill-models/resolve/main/inpaint/brushnet/"
                   "random_mask_brushnet_ckpt/diffusion_pytorch_model.safetensors"),
    "powerpaint/diffusion_pytorch_model.safetensors": (
        "inpaint", "https://huggingface.co/JunhaoZhuang/PowerPaint-v2-1/resolve/main/PowerPaint_Brushnet/"
                   "diffusion_pytorch_model.safetensors"),
    "powerpaint/pytorch_model.bin": (
        "inpaint", "https://huggingface.co/JunhaoZhuang/PowerPaint-v2-1/resolve/main/PowerPaint_Brushnet/"
                   "pytorch_model.bin"),
}
# Files this pack trains (no public download): the note says how to make them.
TRAINED = {
    "painternet_sd15.safetensors": ("inpaint", "training/train_branch.py --recipe painternet, docs/brush-branches.md"),
    "mtadiffusion_sd15.safetensors": ("inpaint", "training/train_branch.py --recipe mtadiffusion, "
                                                 "docs/brush-branches.md"),
    "refinenet_sd15-inpainting.safetensors": ("refinenet", "training/lar_gen.py --stage 2, docs/lar-gen.md"),
}

# Stages, left to right; each is a group. A node's stage follows its type unless the builder names one.
STAGES = {"inputs": "1. Inputs: model, image, mask, prompts", "mechanism": "2. {mechanism}",
          "sampling": "3. Sampling", "output": "4. Decode and paste", "upscale": "5. x4 super-resolution"}
STAGE_COLORS = {"inputs": "#3f789e", "mechanism": "#a1309b", "sampling": "#8A8", "output": "#b58b2a",
                "upscale": "#88A"}
STAGE_OF_TYPE = {
    **dict.fromkeys(("CheckpointLoaderSimple", "LoadImage", "LoadImageMask", "CLIPTextEncode", "ToyWorldLoader",
                     "ToyWorldScene", "CLIPVisionLoader", "ImagePromptAdapterLoader", "ControlNetLoader",
                     "BrushBranchLoader", "RefineNetLoader", "GrowMask", "InpaintCropAroundMask"), "inputs"),
    **dict.fromkeys(("InpaintModelConditioning", "VAEEncode", "SetLatentNoiseMask", "KSampler", "SamplerCustom",
                     "BasicScheduler", "KSamplerSelect", "RASGSampler", "PILOTSampler"), "sampling"),
    **dict.fromkeys(("VAEDecode", "ImageCompositeMasked", "SaveImage", "InpaintStitch", "ImageStitch", "MaskToImage",
                     "ImageBlur", "ImageToMask", "MaskComposite"), "output"),
}
TITLE_H, GAP_X, GAP_Y, GROUP_PAD, GROUP_HEAD = 30, 40, 30, 20, 50   # px, the frontend's title bar is 30 px
NOTE_SIZE = [460, 640]
VIEW_SCALE = 0.9            # the canvas stops drawing text below a 8 px font (LiteGraph.Canvas.MinFontSizeForLOD):
                            # 14 px node text needs a zoom of 0.58 or more
VIEW_OFFSET = [60, 110]    # graph units: the window's top-left corner shows graph point (-60, -110)
MIN_SIZE = [300, 60]
# Room beyond the measured minimum: prompt text boxes, image previews (loaders show their image; results appear in
# preview and save nodes after a run, which would otherwise grow over their neighbours).
TYPE_MIN = {"CLIPTextEncode": [300, 130], "LoadImage": [300, 340], "LoadImageMask": [300, 360],
            "PreviewImage": [300, 300], "SaveImage": [300, 320]}
THUMBNAIL_WIDTH, THUMBNAIL_CLIP = 480, {"x": 60, "y": 80, "width": 1280, "height": 800}
OUT = HERE                  # where save() writes (build_all(out) for the test that compares)
SIZES_FILE = HERE / "layout" / "node_sizes.json"   # not beside the workflows: ComfyUI lists every *.json there


def _measured_sizes() -> dict:
    return json.loads(SIZES_FILE.read_text()) if SIZES_FILE.exists() else {}


class Graph:
    """A UI-format graph: nodes with widget values and typed links; ``save`` lays them out by stage."""

    def __init__(self, mechanism: str):
        self.nodes, self.links, self.mechanism = [], [], mechanism
        self.layout_hints = {}

    def node(self, type_, widgets=(), title=None, inputs=(), outputs=(), col=0, row=0, stage=None):
        """Add a node; ``col``/``row`` order it inside its stage's group (columns left to right, rows downwards)."""
        nid = len(self.nodes) + 1
        node = {"id": nid, "type": type_, "pos": [0, 0], "size": [0, 0],
                "flags": {}, "order": nid - 1, "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
                "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        models = [{"name": v, "url": MODELS[v][1], "directory": MODELS[v][0]}
                  for v in widgets if isinstance(v, str) and v in MODELS]
        if models:
            node["properties"]["models"] = models
        self.nodes.append(node)
        self.layout_hints[nid] = (stage or STAGE_OF_TYPE.get(type_, "mechanism"), col, row)
        return nid

    def link(self, src, src_slot, dst, dst_input):
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(d["inputs"]) if inp["name"] == dst_input)
        lid = len(self.links) + 1
        typ = s["outputs"][src_slot]["type"]
        self.links.append([lid, src, src_slot, dst, slot, typ])
        s["outputs"][src_slot]["links"].append(lid)
        d["inputs"][slot]["link"] = lid

    def _layout(self):
        """Positions, sizes and one group per stage; returns the groups."""
        sizes = _measured_sizes()
        for node in self.nodes:
            key = f'{node["type"]}|{node.get("title", "")}'
            node["size"] = [max(a, b, c) for a, b, c in zip(sizes.get(key, MIN_SIZE), MIN_SIZE,
                                                           TYPE_MIN.get(node["type"], MIN_SIZE))]
        groups, x = [], GAP_X + NOTE_SIZE[0] + 2 * GAP_X
        top = 0
        for stage, title in STAGES.items():
            members = [n for n in self.nodes if self.layout_hints[n["id"]][0] == stage and n["type"] != "MarkdownNote"]
            if not members:
                continue
            columns = sorted({self.layout_hints[n["id"]][1] for n in members})
            x0, bottom = x, top + GROUP_HEAD
            x += GROUP_PAD
            for col in columns:
                in_col = sorted((n for n in members if self.layout_hints[n["id"]][1] == col),
                                key=lambda n: (self.layout_hints[n["id"]][2], n["id"]))
                y = top + GROUP_HEAD
                for n in in_col:
                    n["pos"] = [x, y + TITLE_H]
                    y += TITLE_H + n["size"][1] + GAP_Y
                bottom = max(bottom, y)
                x += max(n["size"][0] for n in in_col) + GAP_X
            x += GROUP_PAD - GAP_X
            groups.append({"id": len(groups) + 1, "title": title.format(mechanism=self.mechanism),
                           "bounding": [x0, top, x - x0, bottom - top], "color": STAGE_COLORS[stage],
                           "font_size": 24, "flags": {}})
            x += 2 * GAP_X
        return groups

    def note(self, about: str, settings: str):
        """The note every workflow opens on: what it does, the paper's settings, the files it needs."""
        files, trained = [], []
        for node in self.nodes:
            for value in node["widgets_values"]:
                if isinstance(value, str) and value in MODELS:
                    folder, url = MODELS[value]
                    files.append(f"- `models/{folder}/{value}`  \n  [download]({url})")
                elif isinstance(value, str) and value in TRAINED:
                    folder, how = TRAINED[value]
                    trained.append(f"- `models/{folder}/{value}`: trained with this pack, `{how}`")
        text = [f"## {self.mechanism}", about, "### Paper settings", settings]
        if files or trained:
            text += ["### Files to download", *dict.fromkeys(files), *dict.fromkeys(trained)]
        images = sorted({v for n in self.nodes if n["type"] in ("LoadImage", "LoadImageMask")
                         for v in n["widgets_values"][:1]})
        if images:
            text += ["### Example inputs", "Copied to `ComfyUI/input/` when the pack loads (photographs: CC0, "
                     "scikit-image samples). Pick your own image and mask (white = inpaint) in the loaders: "
                     + ", ".join(f"`{v}`" for v in images) + "."]
        nid = self.node("MarkdownNote", ["\n\n".join(text)], "Read me")
        node = self.nodes[nid - 1]
        node["size"], node["pos"] = list(NOTE_SIZE), [GAP_X, GROUP_HEAD + TITLE_H]
        node["color"], node["bgcolor"] = "#432", "#653"

    def save(self, name, extra, about="", settings=""):
        """Lay out, add the note and write ``example_workflows/<name>`` (``about``/``settings``: the note's text)."""
        groups = self._layout()
        self.note(about, settings)
        # the note and the inputs in view; the frontend's menus cover the window's top ~110 px and left ~60 px
        view = {"scale": VIEW_SCALE, "offset": VIEW_OFFSET}
        wf = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": groups, "config": {},
              "extra": {"ds": view, "faithful_inpaint": {"title": self.mechanism, **extra}}, "version": 0.4}
        (OUT / name).write_text(json.dumps(wf, indent=1) + "\n")


def loaders(g, ckpt_name, ckpt_title, prompt=PROMPT):
    """Checkpoint, image, mask (white = inpaint) and the two prompts, as every workflow here starts."""
    ckpt = g.node("CheckpointLoaderSimple", [ckpt_name], ckpt_title,
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], col=0, row=0)
    image = g.node("LoadImage", [EXAMPLE_IMAGE, "image"], "Image", outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                   col=0, row=1)
    mask = g.node("LoadImageMask", [EXAMPLE_MASK, "red", "image"], "Mask (white = inpaint)",
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
    g.link(*model_src, sched, "model")
    sc = sampler_custom(g, model_src, pos_src, neg_src, sampler, sched, latent_src, seed, cfg)
    return sc, sched


def sampler_custom(g, model_src, pos_src, neg_src, sampler, sigmas, latent_src, seed, cfg, title=None, row=1):
    """A SamplerCustom on the sigmas of node ``sigmas``, its inputs linked from (node, slot) sources."""
    sc = g.node("SamplerCustom", [True, seed, "fixed", cfg], title or f"Sample (CFG {cfg:g})",
                inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                outputs=[("output", "LATENT"), ("denoised_output", "LATENT")], col=4, row=row)
    g.link(*model_src, sc, "model"), g.link(*pos_src, sc, "positive"), g.link(*neg_src, sc, "negative")
    g.link(sampler, 0, sc, "sampler"), g.link(sigmas, 0, sc, "sigmas"), g.link(*latent_src, sc, "latent_image")
    return sc


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
    ids = loaders(g, SD15_INPAINT, "Load inpainting checkpoint", PROMPT + prompt_suffix)
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


def save_result(g, ids, col=7, stage=None):
    save = g.node("SaveImage", ["faithful-inpaint"], "Result", inputs=[("images", "IMAGE")], col=col, row=1,
                  stage=stage)
    g.link(ids["result"], 0, save, "images")


PROFI_SETTINGS = ("SD1.5 inpainting checkpoint, 512 px. DDIM 50 steps, CFG 7.5 (seed 7 here). PAIntA at the H/16 and "
                  "H/32 self-attention layers, in the first half of the schedule (start 0, end 0.5), attention "
                  "smoothing 0.7071. RASG: eta 0.15, its gradient standardised (eq. 11), on the H/32 cross-attention. "
                  "The mask is dilated 1 px and the result pasted into the original inside it, as the reference code.")
SINGLE_STAGE = {  # (painta, rasg): the note's title and what the graph does
    (True, None): ("PAIntA on an inpainting checkpoint",
                   "Prompt-aware introverted attention (PAIntA, ProFI-Painter / HD-Painter sec. 3.1) patched into an "
                   "SD1.5 inpainting checkpoint: the hole's self-attention to the known region is scaled by how well "
                   "that region matches the prompt, so the prompt is drawn instead of a copy of the surroundings. "
                   "Plain KSampler."),
    (True, True): ("ProFI-Painter: PAIntA + RASG",
                   "The paper's full method (HD-Painter sec. 3): PAIntA in the model, RASG (reweighting attention "
                   "score guidance) in the sampler, which steers each DDIM step towards the prompt's cross-attention "
                   "inside the mask."),
    (False, False): ("ProFI-Painter ablation: base",
                     "Table 2, first row: the inpainting checkpoint with plain DDIM, neither PAIntA nor RASG. Compare "
                     "with the other ablation workflows on the same seed."),
    (True, False): ("ProFI-Painter ablation: PAIntA only",
                    "Table 2: PAIntA in the model, plain DDIM sampling."),
    (False, True): ("ProFI-Painter ablation: RASG only",
                    "Table 2: RASG sampling on the unpatched inpainting checkpoint."),
}


def single_stage(name, painta, rasg):
    title, about = SINGLE_STAGE[(painta, rasg)]
    g = Graph(title)
    ids = inpaint_stage(g, painta, rasg)
    save_result(g, ids)
    g.save(name, {"overrides": overrides(ids),
                  "smoke": {"ckpt": "sd15_inpaint", "image_size": [256, 256], "steps": 2}},
           about=about, settings=PROFI_SETTINGS)


def profi_painter_hd(name):
    """Appendix E: the image is inpainted at a quarter of its size, then upscaled x4 with the inpainting-specialised
    conditional super-resolution (512 px -> 2048 px for the paper's sizes)."""
    g = Graph("ProFI-Painter HD: PAIntA + RASG, then x4")
    ids = inpaint_stage(g, painta=True, rasg=True)
    # Stage 1 works on the image and mask scaled to a quarter; the originals feed the upscaler.
    image_links = [l for l in g.links if l[1] == ids["image"]]
    small = g.node("ImageScaleBy", ["area", 0.25], "Image / 4", inputs=[("image", "IMAGE")],
                   outputs=[("IMAGE", "IMAGE")], col=1, row=3, stage="inputs")
    grow_small = g.node("ImageToMask", ["red"], "Mask / 4", inputs=[("image", "IMAGE")],
                        outputs=[("MASK", "MASK")], col=2, row=3, stage="inputs")
    mask_img = g.node("MaskToImage", [], inputs=[("mask", "MASK")], outputs=[("IMAGE", "IMAGE")], col=1, row=4,
                      stage="inputs")
    mask_small = g.node("ImageScaleBy", ["area", 0.25], "Mask image / 4", inputs=[("image", "IMAGE")],
                        outputs=[("IMAGE", "IMAGE")], col=2, row=4, stage="inputs")
    g.link(ids["image"], 0, small, "image")
    for link in image_links:  # every stage-1 consumer of the image now reads the small one
        _relink(g, link, small, 0)
    grow_links = [l for l in g.links if l[1] == ids["grow"]]
    g.link(ids["grow"], 0, mask_img, "mask"), g.link(mask_img, 0, mask_small, "image")
    g.link(mask_small, 0, grow_small, "image")
    for link in grow_links:
        _relink(g, link, grow_small, 0)
    x4 = g.node("CheckpointLoaderSimple", ["x4-upscaler-ema.safetensors"], "Load SD x4 upscaler",
                outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], col=5, row=3, stage="upscale")
    hr_pos = g.node("CLIPTextEncode", [PROMPT + ", high resolution professional photo"], "Upscaler prompt",
                    inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")], col=5, row=4,
                    stage="upscale")
    hr_neg = g.node("CLIPTextEncode", [NEGATIVE], "Upscaler negative", inputs=[("clip", "CLIP")],
                    outputs=[("CONDITIONING", "CONDITIONING")], col=5, row=5, stage="upscale")
    g.link(x4, 1, hr_pos, "clip"), g.link(x4, 1, hr_neg, "clip")
    sr = g.node("InpaintConditionalUpscale", [7, "fixed", 20, 7.5, 20, 19, 19, 48, 32, "auto", 512],
                "Inpainting-specialised x4 super-resolution",
                inputs=[("model", "MODEL"), ("vae", "VAE"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("image", "IMAGE"), ("mask", "MASK"), ("low_res", "IMAGE")],
                outputs=[("IMAGE", "IMAGE"), ("blend_masks", "IMAGE")], col=7, row=2, stage="upscale")
    g.link(x4, 0, sr, "model"), g.link(x4, 2, sr, "vae"), g.link(hr_pos, 0, sr, "positive")
    g.link(hr_neg, 0, sr, "negative"), g.link(ids["image"], 0, sr, "image"), g.link(ids["grow"], 0, sr, "mask")
    g.link(ids["result"], 0, sr, "low_res")
    low = g.node("PreviewImage", [], "Low-resolution result", inputs=[("images", "IMAGE")], col=6, row=0,
                 stage="output")
    g.link(ids["result"], 0, low, "images")
    ids["result"] = sr
    save_result(g, ids, col=8, stage="upscale")
    ov = overrides(ids, ckpt_targets=[[ids["ckpt"], "ckpt_name"], [x4, "ckpt_name"]])
    ov["upscale_steps"] = [[sr, "steps"]]
    g.save(name, {"overrides": ov, "smoke": {"ckpt": ["sd15_inpaint", "sd_x4_upscaler"], "image_size": [256, 256],
                                             "steps": 2, "upscale_steps": 2}},
           about="Appendix E: the image and mask are scaled to a quarter, inpainted with PAIntA + RASG, then brought "
                 "back to full size by the inpainting-specialised x4 super-resolution (SD x4 upscaler; the known "
                 "region is blended back in at every step, then Poisson-blended).",
           settings=PROFI_SETTINGS + " Upscaler: DDIM 20 steps, CFG 7.5, noise level 20, the prompt + \", high "
                    "resolution professional photo\"; blend mask dilated 19 px and blurred 19 px, Poisson blend "
                    "region dilated 48 px (the reference's values).")


PILOT_TEXT_SETTINGS = ("Reference text configuration: DDIM 100 steps, CFG 7.5, optimise every 10 steps with 10 inner "
                       "steps, lr 0.025 (first step 0.008), coefficient 150, gamma 1.")


def pilot_start(g):
    """The start of every PILOT graph: a plain SD1.5 checkpoint and the image encoded with its noise mask (the known
    image PILOT reads, ComfyUI's 1 = regenerate)."""
    ids = loaders(g, SD15, "Load plain SD1.5 checkpoint")
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
    g = Graph("PILOT: text-guided latent optimisation")
    ids = pilot_start(g)
    guide = g.node("PILOTGuidance", [PROMPT, True, "reference (bilinear, = 1)"], "PILOT guidance",
                   inputs=[("model", "MODEL"), ("clip", "CLIP")], outputs=[("MODEL", "MODEL")], col=2, row=0)
    sampler = g.node("PILOTSampler", ["reference", 10, 10, 0.025, 0.007, 150.0, 1.0, 0.7, "binary (reference)"],
                     "PILOT sampler (reference text config)", outputs=[("SAMPLER", "SAMPLER")], col=3, row=2)
    g.link(ids["ckpt"], 0, guide, "model"), g.link(ids["ckpt"], 1, guide, "clip")
    ov = pilot_finish(g, ids, guide, sampler, (ids["pos"], 0), (ids["neg"], 0))
    # smoke: one inner step keeps the end-to-end run on random full-size weights (CPU) short
    g.save(name, {"overrides": ov, "smoke": {"ckpt": "sd15", "image_size": [256, 256], "steps": 2,
                                             "pilot_inner_steps": 1}},
           about="PILOT on a plain (4-channel) SD1.5 checkpoint: no inpainting model. During sampling the latent is "
                 "optimised so the known region matches the image and the hole follows the prompt's "
                 "cross-attention (semantic centralisation), then DDIM continues from it.",
           settings=PILOT_TEXT_SETTINGS)


def _relink(g, link, new_src, new_slot):
    """Point an existing link at another source output."""
    old_src, old_slot = link[1], link[2]
    g.nodes[old_src - 1]["outputs"][old_slot]["links"].remove(link[0])
    link[1], link[2] = new_src, new_slot
    link[5] = g.nodes[new_src - 1]["outputs"][new_slot]["type"]
    g.nodes[new_src - 1]["outputs"][new_slot]["links"].append(link[0])


def build_all(out: Path = HERE):
    """Write every bundled workflow into ``out``."""
    global OUT
    OUT = Path(out)
    single_stage("painta_inpaint.json", painta=True, rasg=None)
    # ProFI-Painter and the rows of the paper's table 2 (ablation): base, PAIntA only, RASG only, both.
    single_stage("profi_painter.json", painta=True, rasg=True)
    single_stage("profi_painter_ablation_base.json", painta=False, rasg=False)
    single_stage("profi_painter_ablation_painta.json", painta=True, rasg=False)
    single_stage("profi_painter_ablation_rasg.json", painta=False, rasg=True)
    profi_painter_hd("profi_painter_hd.json")
    pilot_text("pilot_text.json")
    # Each further mechanism keeps its graphs in example_workflows/build_<mechanism>.py with a build() of its own.
    for path in sorted(HERE.glob("build_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build()


def measure_and_photograph(only=None):
    """Open every workflow (``only``: those of these stems) in the real UI: record the size the frontend gives each
    node (after the example images load: image loaders grow to show them) in node_sizes.json, rebuild, then save a
    thumbnail of each workflow as it opens (<name>.jpg, what the template browser shows)."""
    sys.path.insert(0, str(HERE.parent))
    from io import BytesIO

    from PIL import Image

    from faithful_inpaint.headless.browser import (QUIET_SETTINGS, ComfyServer, close_dialogs, graph_state,
                                                   load_workflow, ui_page)

    with ComfyServer() as server:
        server.set_settings({**QUIET_SETTINGS, "Comfy.Workflow.ShowMissingModelsWarning": False})
        with ui_page(server.url) as page:
            paths = [p for p in sorted(HERE.glob("*.json")) if only is None or p.stem in only]
            sizes = {} if only is None else _measured_sizes()      # a partial run keeps the other sizes
            for path in paths:
                workflow = json.loads(path.read_text())
                keys = {n["id"]: f'{n["type"]}|{n.get("title", "")}' for n in workflow["nodes"]}
                load_workflow(page, workflow, path.name)
                page.wait_for_timeout(1500)
                for n in graph_state(page)["nodes"]:
                    key = keys[n["id"]]
                    size = [int(-(-v // 10) * 10) for v in n["size"]]    # rounded up to 10 px
                    sizes[key] = [max(a, b) for a, b in zip(sizes.get(key, size), size)]
            sizes.pop("MarkdownNote|Read me", None)
            SIZES_FILE.parent.mkdir(exist_ok=True)
            SIZES_FILE.write_text(json.dumps(dict(sorted(sizes.items())), indent=1) + "\n")
            build_all()
            for path in paths:
                load_workflow(page, json.loads(path.read_text()), path.name)
                page.wait_for_timeout(1500)
                close_dialogs(page)
                # the canvas without the side bar and the top menus
                shot = Image.open(BytesIO(page.screenshot(clip=THUMBNAIL_CLIP))).convert("RGB")
                shot = shot.resize((THUMBNAIL_WIDTH, round(shot.height * THUMBNAIL_WIDTH / shot.width)), Image.LANCZOS)
                title = json.loads(path.read_text())["extra"]["faithful_inpaint"]["title"]
                _title_banner(shot, title).save(path.with_suffix(".jpg"), quality=85)


def _title_banner(image, title):
    """The workflow's title across the thumbnail's top: the template browser shows only the file name."""
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(image)
    size = 26
    font = ImageFont.load_default(size=size)
    while draw.textlength(title, font=font) > image.width - 24 and size > 12:
        size -= 2
        font = ImageFont.load_default(size=size)
    draw.rectangle([0, 0, image.width, 52], fill=(20, 24, 32))
    draw.text((12, 26), title, font=font, fill=(240, 240, 240), anchor="lm")
    return image


README_SHOTS = HERE.parent / "docs" / "images"


def readme_screenshots(page):
    """docs/images/ui_workflow.png (profi_painter.json as it opens, the missing-models dialog closed) and
    docs/images/ui_template_browser.png (Workflow > Browse Templates on the pack's category)."""
    from faithful_inpaint.headless.browser import close_dialogs, load_workflow, open_template_browser

    path = HERE / "profi_painter.json"
    load_workflow(page, json.loads(path.read_text()), path.name)
    page.wait_for_timeout(2000)
    close_dialogs(page)
    page.screenshot(path=str(README_SHOTS / "ui_workflow.png"))
    open_template_browser(page)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(README_SHOTS / "ui_template_browser.png"))
    close_dialogs(page)


def screenshots_only():
    sys.path.insert(0, str(HERE.parent))
    from faithful_inpaint.headless.browser import QUIET_SETTINGS, ComfyServer, ui_page

    with ComfyServer() as server:
        server.set_settings(QUIET_SETTINGS)
        with ui_page(server.url) as page:
            readme_screenshots(page)


def main():
    args = sys.argv[1:]
    only = set(args[args.index("--only") + 1].split(",")) if "--only" in args else None
    if "--measure" in args:
        build_all()
        measure_and_photograph(only)
    build_all()
    if ("--measure" in args and only is None) or "--screenshots" in args:
        screenshots_only()


if __name__ == "__main__":
    main()
