"""PainterNet and MTADiffusion workflows: a trained branch beside a plain SD1.5 checkpoint.

painternet.json: Load Brush Branch (a PainterNet file trained with this pack) + BrushBranchApply with its local_prompt
input connected. The model keeps the global prompt (the whole picture); the branch reads the LOCAL prompt (what goes
in the mask) and feeds the model through its layer and attention control points. The runner's --prompt is the local prompt; the global prompt is the
"Prompt" node (override key ``global_prompt``).

mtadiffusion.json: Load Brush Branch (an MTADiffusion file) + BrushBranchApply: the branch's self-attention features
go into the model like BrushNet's (its edge output only serves training). The prompt is the region's detailed
description, as MTADiffusion trains with.

Both: the encoded image is sampled with denoise 1 (BrushNet's setting), 50 steps, CFG 7.5 (a default: neither paper
states its sampler), then the result is pasted into the original inside the mask.
"""
from __future__ import annotations

from build import PROMPT, SD15, Graph, decode_and_paste, ksampler, loaders, overrides, save_result

GLOBAL_PROMPT = "a cosy living room with a wooden table, soft daylight"


ABOUT = {
    "PainterNet": "PainterNet: the branch reads a LOCAL prompt (what goes in the mask) while the model keeps the "
                  "global prompt (the whole picture); its features enter the model through layer and attention "
                  "control points. The branch file is trained with this pack.",
    "MTADiffusion": "MTADiffusion: a branch trained on detailed region descriptions; its self-attention features go "
                    "into the model like BrushNet's. The prompt describes the region in detail. The branch file is "
                    "trained with this pack.",
}


def branch_workflow(name, kind, smoke_kind):
    painternet = kind == "PainterNet"
    g = Graph(f"{kind}: a trained branch beside SD1.5")
    ids = loaders(g, SD15, "Load SD1.5 checkpoint",
                  GLOBAL_PROMPT if painternet else PROMPT)
    ckpt, image, mask = ids["ckpt"], ids["image"], ids["mask"]
    loader = g.node("BrushBranchLoader", [f"{kind.lower()}_sd15.safetensors", "none"], f"Load {kind} branch",
                    outputs=[("branch", "BRUSH_BRANCH")], col=1, row=3)
    inputs = [("model", "MODEL"), ("branch", "BRUSH_BRANCH"), ("vae", "VAE"), ("image", "IMAGE"), ("mask", "MASK"),
              ("positive", "CONDITIONING"), ("negative", "CONDITIONING")]
    if painternet:
        inputs.append(("local_prompt", "CONDITIONING"))
    apply = g.node("BrushBranchApply", [1.0, 0.0, 1.0, "text guided", 1.0], f"Apply {kind} branch", inputs=inputs,
                   outputs=[("MODEL", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                            ("latent", "LATENT")], col=2, row=1)
    g.link(ckpt, 0, apply, "model"), g.link(loader, 0, apply, "branch"), g.link(ckpt, 2, apply, "vae")
    g.link(image, 0, apply, "image"), g.link(mask, 0, apply, "mask")
    g.link(ids["pos"], 0, apply, "positive"), g.link(ids["neg"], 0, apply, "negative")
    extra_overrides = {"branch": [[loader, "branch_name"]]}
    if painternet:
        local = g.node("CLIPTextEncode", [PROMPT], "Local prompt (what goes in the mask)", inputs=[("clip", "CLIP")],
                       outputs=[("CONDITIONING", "CONDITIONING")], col=1, row=4)
        g.link(ckpt, 1, local, "clip"), g.link(local, 0, apply, "local_prompt")
        extra_overrides["global_prompt"] = ids["prompt_targets"]
        ids["prompt_targets"] = [[local, "text"]]
    ks = ksampler(g, (apply, 0), (apply, 1), (apply, 2), (apply, 3), "Sampler (50 steps, CFG 7.5)", col=3,
                  sampler="uni_pc", scheduler="normal")
    ids.update(seed=[[ks, "seed"]], steps=[[ks, "steps"]], result=decode_and_paste(g, (ks, 0), (ckpt, 2), image, mask))
    save_result(g, ids)
    g.save(name, {"overrides": {**overrides(ids), **extra_overrides},
                  "smoke": {"ckpt": "sd15", "branch": smoke_kind, "image_size": [256, 256], "steps": 2}},
           about=ABOUT[kind], settings="Neither paper states its sampler: UniPC 50 steps, CFG 7.5, denoise 1 "
                                       "(BrushNet's setting), conditioning scale 1.")


def build():
    branch_workflow("painternet.json", "PainterNet", "painternet_sd15")
    branch_workflow("mtadiffusion.json", "MTADiffusion", "mtadiffusion_sd15")
