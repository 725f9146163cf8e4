"""One command per paper table: the rows (bundled workflows + settings), the files each row needs (which ComfyUI
models folder they go to), the dataset and metrics of the paper's protocol, and the paper's published numbers
where our protocol matches it. ``python -m faithful_inpaint.evaluation NAME --help``; the README lists the files."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    name: str
    workflow: str                         # a file in example_workflows/
    files: dict = field(default_factory=dict)    # override key -> CLI option naming the user's file
    values: dict = field(default_factory=dict)   # fixed override values
    baseline: str | None = None
    bypass: tuple[str, ...] = ()          # node types bypassed in the workflow (as Ctrl+B in the UI: a bypassed
                                          # node's consumers take its matching input instead)


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: tuple[Row, ...]
    dataset: str                           # the dataset kind the paper used
    metrics: tuple[str, ...]
    paper: dict = field(default_factory=dict)    # {row: {metric: published value}}
    notes: tuple[str, ...] = ()
    optional_metrics: tuple[str, ...] = ()       # added by default when their files are given (--pickscore ...)


# CLI option -> (ComfyUI models folder, help)
FILE_OPTIONS = {
    "ckpt": ("checkpoints", "the SD1.5 inpainting checkpoint (9-channel; ProFI-Painter's table: DreamShaper 8 "
                            "inpainting)"),
    "base_ckpt": ("checkpoints", "the plain SD1.5 checkpoint the branches / PILOT run on"),
    "brushnet": ("inpaint", "BrushNet SD1.5 weights (segmentation-mask or random-mask model)"),
    "powerpaint": ("inpaint", "PowerPaint v2 BrushNet weights"),
    "powerpaint_text_encoder": ("inpaint", "PowerPaint v2 text encoder"),
    "painternet": ("inpaint", "a PainterNet branch (trained with training/)"),
    "mtadiffusion": ("inpaint", "an MTADiffusion branch (trained with training/)"),
    "controlnet": ("controlnet", "an SD1.5 ControlNet (PILOT's ControlNet row)"),
    "ipadapter": ("ipadapter", "IP-Adapter SD1.5 (PILOT) / IP-Adapter-plus SD1.5 or the LAR-Gen adapter (LAR-Gen)"),
    "clip_vision": ("clip_vision", "the CLIP vision model of the adapter (ViT-H/14)"),
    "refinenet": ("refinenet", "LAR-Gen's RefineNet (trained with training/)"),
}

PROFI = Table(
    "profi-painter", "ProFI-Painter table 2: ablation of PAIntA and RASG",
    (Row("base (DreamShaper Inp.)", "profi_painter_ablation_base.json", {"ckpt": "ckpt"}),
     Row("only PAIntA", "profi_painter_ablation_painta.json", {"ckpt": "ckpt"}, baseline="base (DreamShaper Inp.)"),
     Row("only RASG", "profi_painter_ablation_rasg.json", {"ckpt": "ckpt"}, baseline="base (DreamShaper Inp.)"),
     Row("RASG & PAIntA", "profi_painter.json", {"ckpt": "ckpt"}, baseline="base (DreamShaper Inp.)")),
    "coco", ("clip_score", "clip_accuracy", "aesthetic"),
    paper={"base (DreamShaper Inp.)": {"clip_score": 25.61, "clip_accuracy": 0.5893, "aesthetic": 4.965},
           "only PAIntA": {"clip_score": 26.07, "clip_accuracy": 0.6395, "aesthetic": 4.985},
           "only RASG": {"clip_score": 25.94, "clip_accuracy": 0.6375, "aesthetic": 4.965},
           "RASG & PAIntA": {"clip_score": 26.32, "clip_accuracy": 0.6805, "aesthetic": 4.980}},
    notes=("Paper: DreamShaper 8 inpainting, 10,000 MSCOCO val2017 convex-hull instance masks, mean of 5 seeds.",
           "Accuracy here is CLIP's classification of the crop among the 80 COCO classes; the paper runs an "
           "MMDetection COCO detector on the crop, so that column is comparable in trend, not in value."),
    optional_metrics=("pickscore",))

PILOT = Table(
    "pilot", "PILOT: text, ControlNet and image-prompt guidance against plain inpainting",
    (Row("plain inpainting", "profi_painter_ablation_base.json", {"ckpt": "ckpt"}),
     Row("PILOT text", "pilot_text.json", {"ckpt": "base_ckpt"}, baseline="plain inpainting"),
     Row("PILOT ControlNet", "pilot_controlnet.json", {"ckpt": "base_ckpt", "controlnet": "controlnet"},
         baseline="plain inpainting"),
     Row("PILOT image prompt", "pilot_image_prompt.json",
         {"ckpt": "base_ckpt", "ipadapter": "ipadapter", "clip_vision": "clip_vision"}, baseline="plain inpainting")),
    "brushbench", ("clip_score", "aesthetic", "psnr_unmasked", "mse_unmasked"),
    notes=("The image-prompt row needs a dataset with subject images (quadruples or JSONL with 'subject').",))

BRANCHES = Table(
    "branches", "Trainable branches against the base inpainting model (BrushNet's BrushBench protocol)",
    (Row("base inpainting model", "profi_painter_ablation_base.json", {"ckpt": "ckpt"}),
     Row("BrushNet", "brushnet.json", {"ckpt": "base_ckpt", "branch": "brushnet"}, baseline="base inpainting model"),
     Row("PowerPaint", "powerpaint.json", {"ckpt": "base_ckpt", "branch": "powerpaint",
                                           "powerpaint_text_encoder": "powerpaint_text_encoder"},
         baseline="base inpainting model"),
     Row("PainterNet", "painternet.json", {"ckpt": "base_ckpt", "branch": "painternet"},
         baseline="base inpainting model"),
     Row("MTADiffusion", "mtadiffusion.json", {"ckpt": "base_ckpt", "branch": "mtadiffusion"},
         baseline="base inpainting model")),
    "brushbench", ("aesthetic", "clip_similarity", "psnr_unmasked", "lpips_unmasked", "mse_unmasked"),
    notes=("BrushNet's code divides the squared error by the number of unmasked pixels (not pixels x channels) and "
           "caps PSNR at 1000; ours is torchmetrics' per-channel mean, and an identical region gives PSNR inf.",),
    optional_metrics=("image_reward", "hps_v2"))

ADAPTER = {"ckpt": "ckpt", "ipadapter": "ipadapter", "clip_vision": "clip_vision"}
LAR_GEN = Table(
    "lar-gen", "LAR-Gen table 1/2: text only, image only, text + image without and with RefineNet",
    (Row("text only", "lar_gen_text_only.json", {"ckpt": "ckpt", "ipadapter": "ipadapter",
                                                 "clip_vision": "clip_vision"}),
     Row("image only (beta 1, no text)", "lar_gen_image_only.json",
         {"ckpt": "ckpt", "ipadapter": "ipadapter", "clip_vision": "clip_vision", "refinenet": "refinenet"},
         {"beta": 1.0}, baseline="text only"),
     Row("text + image (beta 0.3)", "lar_gen.json", ADAPTER, {"beta": 0.3}, baseline="text only",
         bypass=("RefineNetLoader", "RefineNetApply")),
     Row("text + image (beta 0.3) + RefineNet", "lar_gen.json",
         {"ckpt": "ckpt", "ipadapter": "ipadapter", "clip_vision": "clip_vision", "refinenet": "refinenet"},
         {"beta": 0.3}, baseline="text only")),
    "quadruples", ("clip_i", "dino"),
    paper={"image only (beta 1, no text)": {"clip_i": 83.39, "clip_t": 26.07},
           "text + image (beta 0.3) + RefineNet": {"clip_i": 79.15, "clip_t": 29.94}},
    notes=("Paper: 2,000 quadruples (20 COCO scenes x 10 DreamBooth subjects x 10 prompts), CLIP ViT on the "
           "inpainted region.",
           "'text + image (beta 0.3)' is lar_gen.json with its RefineNet nodes bypassed (the adapter's model goes "
           "straight to the sampler), as the paper's ablation without RefineNet."))

TABLES = {t.name: t for t in (PROFI, PILOT, BRANCHES, LAR_GEN)}
