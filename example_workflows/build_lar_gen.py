"""LAR-Gen workflows (text + subject-image inpainting: Locate, Assign, Refine).

lar_gen.json (text + image): the paper's zoom-in first: "Inpaint Crop Around Mask" cuts a context window around the
mask and resizes it to SD1.5's working size (512 px long side); the crop goes through InpaintModelConditioning into
an SD1.5 *inpainting* checkpoint (Locate: the 9-channel concatenation), whose MODEL gets the image prompt ("Apply
image prompt", beta 0.3 as with RefineNet in the paper, the IP-Adapter-plus projection the paper uses: Assign) and
RefineNet ("Apply RefineNet": Refine); KSampler (DDIM, 50 steps, CFG 7.5: the paper's w), VAE decode, and "Inpaint
Stitch" puts the window back (feather 0: only the masked pixels change, the rest of the image is the original bit for
bit).

lar_gen_image_only.json: the same with mode "image only" (the conditional half's text is the empty prompt).
lar_gen_text_only.json: mode "text only" (the null image, as when training drops the image prompt) and no RefineNet
(it has no subject to refine).

Runner overrides: --image / --mask the scene, --subject the subject image (smoke runs generate one).
"""
from __future__ import annotations

from build import EXAMPLE_SUBJECT, SD15_INPAINT, Graph, ksampler, loaders, overrides, save_result

SUBJECT_PROMPT = "a tabby cat sitting on the table"
BETA_WITH_REFINENET = 0.3       # LAR-Gen sec. 4.4 / 6.2: beta 0.3 in stage 2 (with RefineNet)


TITLES = {"text + image": "LAR-Gen: text + subject image", "image only": "LAR-Gen: subject image only",
          "text only": "LAR-Gen: text only"}
ABOUT = {
    "text + image": "LAR-Gen (Locate, Assign, Refine): a window around the mask is cut out and resized (zoom-in), "
                    "inpainted by an SD1.5 inpainting checkpoint (Locate) with the subject image as an image prompt "
                    "(Assign: IP-Adapter-plus attention) and RefineNet's subject details (Refine), then stitched "
                    "back so only the masked pixels change.",
    "image only": "LAR-Gen with the subject image alone: the conditional half's text is the empty prompt.",
    "text only": "LAR-Gen with the text alone: the null image prompt (as when training drops the image) and no "
                 "RefineNet (no subject to refine).",
}
SETTINGS = ("SD1.5 inpainting checkpoint, zoom-in crop to 512 px (32 px context), DDIM 50 steps, CFG 7.5 (the "
            "paper's w), image-prompt beta 0.3 with RefineNet (sec. 4.4 / 6.2), 1 without.")


def lar_gen(name, mode):
    g = Graph(TITLES[mode])
    ids = loaders(g, SD15_INPAINT, "Load inpainting checkpoint (SD1.5)",
                  "" if mode == "image only" else SUBJECT_PROMPT)
    ckpt, image, mask, pos, neg = (ids[k] for k in ("ckpt", "image", "mask", "pos", "neg"))
    crop = g.node("InpaintCropAroundMask", [32, 512], "Zoom in: crop around the mask",
                  inputs=[("image", "IMAGE"), ("mask", "MASK")],
                  outputs=[("image", "IMAGE"), ("mask", "MASK"), ("stitch", "FAITHFUL_STITCH")], col=1, row=2)
    g.link(image, 0, crop, "image"), g.link(mask, 0, crop, "mask")
    cond = g.node("InpaintModelConditioning", [True], inputs=[("positive", "CONDITIONING"),
                  ("negative", "CONDITIONING"), ("vae", "VAE"), ("pixels", "IMAGE"), ("mask", "MASK")],
                  outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
                  col=2, row=1)
    g.link(pos, 0, cond, "positive"), g.link(neg, 0, cond, "negative"), g.link(ckpt, 2, cond, "vae")
    g.link(crop, 0, cond, "pixels"), g.link(crop, 1, cond, "mask")

    clip_vision = g.node("CLIPVisionLoader", ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"],
                         "Load CLIP vision (ViT-H-14)", outputs=[("CLIP_VISION", "CLIP_VISION")], col=0, row=3)
    adapter = g.node("ImagePromptAdapterLoader", ["ip-adapter-plus_sd15.safetensors"],
                     "Load image-prompt adapter (LAR-Gen stage 1 / IP-Adapter-plus)",
                     outputs=[("adapter", "IMAGE_PROMPT_ADAPTER")], col=0, row=4)
    subject = g.node("LoadImage", [EXAMPLE_SUBJECT, "image"], "Subject image",
                     outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], col=1, row=4)
    beta = 1.0 if mode == "text only" else BETA_WITH_REFINENET
    assign = g.node("ImagePromptApply", [beta, 0.0, 1.0, mode], f"Assign: image prompt ({mode})",
                    inputs=[("model", "MODEL"), ("adapter", "IMAGE_PROMPT_ADAPTER"), ("clip_vision", "CLIP_VISION"),
                            ("image", "IMAGE"), ("attn_mask", "MASK"), ("clip", "CLIP")],
                    outputs=[("MODEL", "MODEL")], col=2, row=3)
    g.link(ckpt, 0, assign, "model"), g.link(adapter, 0, assign, "adapter")
    g.link(clip_vision, 0, assign, "clip_vision"), g.link(subject, 0, assign, "image")
    g.link(ckpt, 1, assign, "clip")
    model_src = (assign, 0)
    ov_extra, smoke = {}, {"ckpt": "sd15_inpaint", "clip_vision": "clip_vision_h",
                           "ipadapter": "ipadapter_sd15_plus", "image_size": [256, 256], "steps": 2,
                           "crop_size": 256}
    if mode != "text only":
        refine_loader = g.node("RefineNetLoader", ["refinenet_sd15-inpainting.safetensors"],
                               "Load RefineNet (LAR-Gen stage 2)", outputs=[("refinenet", "FAITHFUL_REFINENET")],
                               col=2, row=4)
        refine = g.node("RefineNetApply", [1.0, 0.0, 1.0, "no subject (null image prompt)", True, True, True, True],
                        "Refine: RefineNet", inputs=[("model", "MODEL"), ("refinenet", "FAITHFUL_REFINENET"),
                                                     ("clip_vision", "CLIP_VISION"), ("vae", "VAE"),
                                                     ("subject", "IMAGE")],
                        outputs=[("MODEL", "MODEL")], col=3, row=3)
        g.link(assign, 0, refine, "model"), g.link(refine_loader, 0, refine, "refinenet")
        g.link(clip_vision, 0, refine, "clip_vision"), g.link(ckpt, 2, refine, "vae")
        g.link(subject, 0, refine, "subject")
        model_src = (refine, 0)
        ov_extra["refinenet"] = [[refine_loader, "refinenet_name"]]
        smoke["refinenet"] = "refinenet_sd15"

    ks = ksampler(g, model_src, (cond, 0), (cond, 1), (cond, 2), "Sampler (paper: CFG 7.5; DDIM 50)", col=4)
    dec = g.node("VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")],
                 col=5, row=1)
    g.link(ks, 0, dec, "samples"), g.link(ckpt, 2, dec, "vae")
    stitch = g.node("InpaintStitch", [0], "Stitch back (only the masked pixels change)",
                    inputs=[("stitch", "FAITHFUL_STITCH"), ("original", "IMAGE"), ("inpainted", "IMAGE")],
                    outputs=[("image", "IMAGE")], col=6, row=1)
    g.link(crop, 2, stitch, "stitch"), g.link(image, 0, stitch, "original"), g.link(dec, 0, stitch, "inpainted")
    ids.update(seed=[[ks, "seed"]], steps=[[ks, "steps"]], result=stitch)
    if mode == "image only":
        ids["prompt_targets"] = []          # the conditional text is the empty prompt in this mode
    save_result(g, ids)
    ov = overrides(ids)
    if not ov["prompt"]:
        del ov["prompt"]
    ov.update(subject=[[subject, "image"]], clip_vision=[[clip_vision, "clip_name"]],
              ipadapter=[[adapter, "adapter_name"]], beta=[[assign, "beta"]], crop_size=[[crop, "long_side"]],
              **ov_extra)
    g.save(name, {"overrides": ov, "smoke": smoke}, about=ABOUT[mode], settings=SETTINGS)


def build():
    lar_gen("lar_gen.json", "text + image")
    lar_gen("lar_gen_image_only.json", "image only")
    lar_gen("lar_gen_text_only.json", "text only")
