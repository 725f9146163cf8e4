"""BrushNet and PowerPaint v2 workflows: an ordinary SD1.5 checkpoint plus a branch from models/inpaint.

brushnet.json: BrushBranchLoader (a public BrushNet SD1.5 file) + BrushBranchApply + KSampler, then the reference's
paste of the decoded image into the original inside the mask. The reference pastes inside the mask widened by its own
Gaussian blur (mask + blur(mask), 21 px kernel); those nodes are in the graph, bypassed, so the default keeps every
pixel outside the mask exactly (un-bypass "Soft paste" for the reference's soft edge). Values: the reference's
(UniPC, 50 steps, CFG 7.5, conditioning scale 1, the whole schedule).
powerpaint.json: the same with PowerPaint v2's branch, its text encoder (task prompts) and the task "text guided".
"""
from __future__ import annotations

from build import SD15, Graph, ksampler, loaders, overrides, save_result

BRUSHNET_FILE = "brushnet/random_mask_brushnet_ckpt/diffusion_pytorch_model.safetensors"
POWERPAINT_FILE = "powerpaint/diffusion_pytorch_model.safetensors"
POWERPAINT_TEXT_ENCODER = "powerpaint/pytorch_model.bin"


ABOUT = {
    "brushnet.json": ("BrushNet: a branch beside any SD1.5 checkpoint",
                      "BrushNet's dual branch (a copy of the UNet's encoder fed the masked image and the mask) adds "
                      "its features to an ordinary SD1.5 checkpoint, layer by layer; the result is pasted into the "
                      "original inside the mask (the reference's soft paste is in the graph, bypassed)."),
    "powerpaint.json": ("PowerPaint v2: BrushNet branch + task prompts",
                        "PowerPaint v2's BrushNet branch with its own text encoder and learned task prompts (here "
                        "\"text guided\"), beside an ordinary SD1.5 checkpoint."),
}
SETTINGS = "Reference values: UniPC 50 steps, CFG 7.5, conditioning scale 1 over the whole schedule."


def branch_workflow(name, branch_file, text_encoder, task):
    g = Graph(ABOUT[name][0])
    ids = loaders(g, SD15, "Load SD1.5 checkpoint (any fine-tune)")
    ckpt, image, mask = ids["ckpt"], ids["image"], ids["mask"]
    loader = g.node("BrushBranchLoader", [branch_file, text_encoder], "Load branch (models/inpaint)",
                    outputs=[("branch", "BRUSH_BRANCH")], col=1, row=3)
    apply = g.node("BrushBranchApply", [1.0, 0.0, 1.0, task, 1.0], "Apply branch (scale 1, whole schedule)",
                   inputs=[("model", "MODEL"), ("branch", "BRUSH_BRANCH"), ("vae", "VAE"), ("image", "IMAGE"),
                           ("mask", "MASK"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                   outputs=[("MODEL", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                            ("latent", "LATENT")], col=2, row=1)
    g.link(ckpt, 0, apply, "model"), g.link(loader, 0, apply, "branch"), g.link(ckpt, 2, apply, "vae")
    g.link(image, 0, apply, "image"), g.link(mask, 0, apply, "mask")
    g.link(ids["pos"], 0, apply, "positive"), g.link(ids["neg"], 0, apply, "negative")
    ks = ksampler(g, (apply, 0), (apply, 1), (apply, 2), (apply, 3), "Sampler (reference: UniPC 50, CFG 7.5)", col=3,
                  sampler="uni_pc", scheduler="normal")
    dec = g.node("VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 col=4, row=1)
    g.link(ks, 0, dec, "samples"), g.link(ckpt, 2, dec, "vae")
    # Paste mask = mask + GaussianBlur(mask, 21 x 21, sigma 3.5), clamped: the reference's 1 - (1 - m)(1 - blur(m)).
    as_image = g.node("MaskToImage", [], inputs=[("mask", "MASK")], outputs=[("IMAGE", "IMAGE")], col=3, row=3)
    blur = g.node("ImageBlur", [10, 3.5], "Blur mask (21 px, as the reference)", inputs=[("image", "IMAGE")],
                  outputs=[("IMAGE", "IMAGE")], col=4, row=3)
    back = g.node("ImageToMask", ["red"], inputs=[("image", "IMAGE")], outputs=[("MASK", "MASK")], col=5, row=3)
    union = g.node("MaskComposite", [0, 0, "add"], "Soft paste as the reference (bypassed: un-bypass to use)",
                   inputs=[("destination", "MASK"), ("source", "MASK")], outputs=[("MASK", "MASK")], col=5, row=2)
    # Bypassed by default (the mask passes through): the hard paste keeps every pixel outside the mask as it was.
    g.nodes[union - 1]["mode"] = 4
    g.link(mask, 0, as_image, "mask"), g.link(as_image, 0, blur, "image"), g.link(blur, 0, back, "image")
    g.link(mask, 0, union, "destination"), g.link(back, 0, union, "source")
    comp = g.node("ImageCompositeMasked", [0, 0, False], "Paste into the original",
                  inputs=[("destination", "IMAGE"), ("source", "IMAGE"), ("mask", "MASK")],
                  outputs=[("IMAGE", "IMAGE")], col=6, row=1)
    g.link(image, 0, comp, "destination"), g.link(dec, 0, comp, "source"), g.link(union, 0, comp, "mask")
    ids.update(seed=[[ks, "seed"]], steps=[[ks, "steps"]], result=comp)
    save_result(g, ids)
    ov = overrides(ids)
    ov["branch"] = [[loader, "branch_name"]]
    smoke = {"ckpt": "sd15", "image_size": [256, 256], "steps": 2}
    if text_encoder != "none":
        ov["powerpaint_text_encoder"] = [[loader, "powerpaint_text_encoder"]]
        smoke.update(branch="powerpaint_sd15", powerpaint_text_encoder="powerpaint_sd15_text_encoder")
    else:
        smoke["branch"] = "brushnet_sd15"
    g.save(name, {"overrides": ov, "smoke": smoke}, about=ABOUT[name][1], settings=SETTINGS)


def build():
    branch_workflow("brushnet.json", BRUSHNET_FILE, "none", "text guided")
    branch_workflow("powerpaint.json", POWERPAINT_FILE, POWERPAINT_TEXT_ENCODER, "text guided")
