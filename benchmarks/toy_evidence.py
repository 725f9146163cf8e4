"""Evidence harness: does each mechanism make the toy model inpaint what the prompt asks for?

    .venv/bin/python -m faithful_inpaint.benchmarks.toy_evidence --out runs/evidence            # 200 cases per mechanism
    .venv/bin/python -m faithful_inpaint.benchmarks.toy_evidence --cases 40 --only baseline PAIntA --out runs/quick

Every mechanism runs the same paired inpainting cases (kernels/toy_world.make_cases: half with the mask on empty
background, half with the mask next to an object of another colour and shape) with the same noise seeds, through
the pack's own nodes and ComfyUI's sampling (comfy.sample.sample_custom, as SamplerCustom runs it, inside inference
mode as the executor runs nodes). Results are scored as blobs (kernels/toy_world.score_case) on the latent read back
with the toy VAE's exact mapping (kernels/toy_world.latent_to_cells), so no pixels are decoded.

Reported per mechanism: colour present / dominant and shape right inside the mask (with Wilson 95% intervals), the
paired difference to its baseline (95% interval of the mean of per-case differences), preservation outside the mask
(mean absolute error of the sampled latent before any paste-back, cells changed by > 0.1), and seconds per image.
Positive controls first: blocking every masked->known self-attention link must change the output, and the attention
statistics per level say how much masked pixels attend to the known region at all.

Outputs in --out: results.md (the tables), results.json (every case's scores), grid.png (cases x mechanisms).
Adding a mechanism is one entry in MECHANISMS.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from faithful_inpaint.devtools import host
from faithful_inpaint.evaluation import engine
from faithful_inpaint.evaluation.datasets import read_toy
from faithful_inpaint.evaluation.metrics import ToyBlobs
from faithful_inpaint.evaluation.stats import mean_interval, paired_difference, rate
from faithful_inpaint.evaluation.store import RunStore
from faithful_inpaint.kernels import masks
from faithful_inpaint.kernels import toy_world as tw

METRICS = ("present", "dominant", "shape_ok")
DEFAULT_SEED = 10_000     # the first case's seed
# Each role's toy file (in the toy folder), per world: the neglect world's 9-channel and 4-channel models are the
# sd-inpaint recipe's (toy/README.md), its branch, adapter and RefineNet the ones retrained on them (``--file
# ROLE=NAME`` names another file for a role, e.g. the first world's add-ons).
TOY_FILES = {"inpaint": "toy_world_inpaint.safetensors", "plain": "toy_world.safetensors",
             "branch": "toy_brushnet.safetensors", "adapter": "toy_image_prompt.safetensors",
             "refinenet": "toy_refinenet.safetensors", "clip_vision": "toy_clip_vision.safetensors"}
WORLD_FILES = {"objects": TOY_FILES,
               "neglect": {**TOY_FILES, "inpaint": "toy_world_sd_inpaint.safetensors",
                           "plain": "toy_world_sd.safetensors", "branch": "toy_sd_brushnet.safetensors",
                           "adapter": "toy_sd_image_prompt.safetensors", "refinenet": "toy_sd_refinenet.safetensors"}}


# ----------------------------------------------------------------------------------------------------------------
# Mechanisms: each entry patches the case's model with the pack's own nodes and names its sampler


@dataclass
class CaseInputs:
    model: Any            # ModelPatcher of the toy model the entry runs on
    clip: Any
    vae: Any
    prompt: str           # the text prompt the sampler gets ("" for an entry without text)
    image: torch.Tensor   # [1, H, W, 3] the scene
    mask: torch.Tensor    # [1, H, W] pixels, 1 = inpaint
    positive: Any         # the conditionings the sampler gets
    negative: Any
    subject: torch.Tensor  # [1, H, W, 3] the image prompt: the prompted object alone on white
    clip_vision: Any      # the toy CLIP vision (loaded on first use)
    files: dict           # role -> file name (TOY_FILES, as this run picks them)


@dataclass(frozen=True)
class Mechanism:
    name: str
    model: str            # "inpaint": 9-channel toy model (InpaintModelConditioning); "plain": 4-channel, noise mask
    baseline: str | None  # the entry its paired differences are taken against
    prepare: Callable[[CaseInputs], tuple[Any, Any]]   # -> (patched ModelPatcher, KSAMPLER)
    text: bool = True     # False: the text prompt is empty, the case's colour and shape come from the image prompt
    files: tuple[str, ...] = ()   # roles (TOY_FILES) of the trained add-ons it needs (checked before anything runs)


def _ddim():
    import comfy.samplers

    return comfy.samplers.sampler_object("ddim")


def _nodes():
    from faithful_inpaint.nodes import painta, pilot, rasg

    return painta, pilot, rasg


def plain(ci: CaseInputs):
    return ci.model, _ddim()


def with_painta(ci: CaseInputs, model=None):
    painta, _, _ = _nodes()
    from faithful_inpaint.kernels.painta import REFERENCE_SMOOTHING_SIGMA

    patched, _ = painta.PAIntAPatch.execute(model=model or ci.model, clip=ci.clip, prompt=ci.prompt, mask=ci.mask,
                                            at_h8=False, at_h16=True, at_h32=True, at_h64=False, start_percent=0.0,
                                            end_percent=0.5, smoothing=REFERENCE_SMOOTHING_SIGMA)
    return patched


def painta_only(ci: CaseInputs):
    return with_painta(ci), _ddim()


RASG_ETA = 0.15          # the paper's eta: eq. 11's sigma_t at this eta is the guidance term's strength


def rasg_on(ci: CaseInputs, model=None, eta: float = RASG_ETA, sigma_rule: str = "paper (eq. 11)"):
    _, _, rasg = _nodes()
    (guided,) = rasg.RASGGuidance.execute(model=model or ci.model, clip=ci.clip, prompt=ci.prompt,
                                          attention_resolution="1/32 (paper)", mask=ci.mask)
    (sampler,) = rasg.RASGSampler.execute(eta=eta, sigma_rule=sigma_rule, guide_start=0.0, guide_end=1.0)
    return guided, sampler


def painta_and_rasg(ci: CaseInputs):
    return rasg_on(ci, with_painta(ci))


def pilot_on(ci: CaseInputs):
    # The reference optimises every 10 of 100 steps with 10 inner steps (100 gradient steps); at 20 steps: every
    # 2nd step with 5 inner steps (50 gradient steps, to keep 200 cases affordable on a CPU), over the whole
    # schedule (gamma 1, the text configuration).
    _, pilot, _ = _nodes()
    (guided,) = pilot.PILOTGuidance.execute(model=ci.model, clip=ci.clip, prompt=ci.prompt,
                                            semantic_boundary_control=True, inside_map="reference (bilinear, = 1)")
    (sampler,) = pilot.PILOTSampler.execute(preset="reference", optimise_every=2, inner_steps=5, lr=0.025,
                                            lr_warmup=0.007, coef=150.0, gamma=1.0, momentum=0.7,
                                            mask="binary (reference)")
    return guided, sampler


def masked_to_known_blocked(ci: CaseInputs):
    """Positive control: every self-attention layer with masked queries barred from known keys, at every step."""
    return block_masked_to_known(ci.model, ci.mask), _ddim()


def masked_tokens(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[1, height * width] bool: the tokens of an attention layer of that size whose area is more than half masked
    (``mask`` [1, H, W], 1 = inpaint)."""
    return (masks.resize(masks.as_batch(mask), height, width) > 0.5).flatten(1)


def block_masked_to_known(model, mask: torch.Tensor):
    """A clone of ``model`` whose self-attention rows of masked pixels (``mask`` [1, H, W], 1 = inpaint, any
    resolution) attend to masked pixels only; known pixels' rows are the host's attention output unchanged."""
    from faithful_inpaint.patching.blocks import host_attention, transformer_blocks

    clone = model.clone()
    by_size = {}                                   # (height, width) -> masked tokens, computed once per level

    def attn1_replace(q, k, v, extra_options):
        plain = host_attention(q, k, v, extra_options)
        size = tuple(extra_options["activations_shape"][-2:])
        if size not in by_size:
            by_size[size] = masked_tokens(mask, *size)
        masked = by_size[size].to(q.device)                                                    # [1, N]
        if not masked.any() or k.shape[1] != masked.shape[1]:
            return plain
        masked = masked.expand(q.shape[0], -1)
        allowed = ~(masked[:, :, None] & ~masked[:, None, :])      # [B, Nq, Nk]: masked query -> known key barred
        b, n, _ = q.shape
        heads = extra_options["n_heads"]
        split = [t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v)]
        blocked = F.scaled_dot_product_attention(*split, attn_mask=allowed[:, None]).transpose(1, 2).reshape(b, n, -1)
        return torch.where(masked[..., None], blocked.to(plain.dtype), plain)

    for block in transformer_blocks(clone.get_model_object("diffusion_model")):
        clone.set_model_attn1_replace(attn1_replace, *block.key)
    return clone


def with_branch(ci: CaseInputs):
    """The BrushNet-style branch trained beside the 4-channel toy model, at strength 1 over the whole schedule."""
    from faithful_inpaint.nodes import brush_branch

    (branch,) = brush_branch.BrushBranchLoader.execute(branch_name=ci.files["branch"])
    patched, *_ = brush_branch.BrushBranchApply.execute(model=ci.model, branch=branch, vae=ci.vae, image=ci.image,
                                                        mask=ci.mask, positive=ci.positive, negative=ci.negative,
                                                        strength=1.0, start=0.0, end=1.0)
    return patched, _ddim()


IMAGE_PROMPT_FILES = ("adapter", "clip_vision")     # LAR-Gen stage 1 on the toy world and its fixed image encoder
REFINENET_FILE = "refinenet"                          # LAR-Gen stage 2
CLIP_VISION_FILE = "clip_vision"


def with_image_prompt(ci: CaseInputs, beta: float, model=None):
    """LAR-Gen's decoupled image-prompt attention (eq. 7) with the toy-trained adapter, over the whole schedule."""
    from faithful_inpaint.nodes import image_prompt

    (adapter,) = image_prompt.ImagePromptAdapterLoader.execute(adapter_name=ci.files["adapter"])
    (patched,) = image_prompt.ImagePromptApply.execute(model=model or ci.model, adapter=adapter,
                                                       clip_vision=ci.clip_vision, image=ci.subject, beta=beta,
                                                       start_percent=0.0, end_percent=1.0, mode="text + image")
    return patched


def image_prompt_on(ci: CaseInputs, beta: float):
    return with_image_prompt(ci, beta), _ddim()


def image_prompt_and_refinenet(ci: CaseInputs, beta: float | None):
    """The image prompt at ``beta`` (None: no image prompt) and RefineNet (strength 1, every decoder level: the
    paper's setting)."""
    from faithful_inpaint.nodes import refinenet

    (net,) = refinenet.RefineNetLoader.execute(refinenet_name=ci.files["refinenet"])
    model = ci.model if beta is None else with_image_prompt(ci, beta)
    (patched,) = refinenet.RefineNetApply.execute(model=model, refinenet=net,
                                                  clip_vision=ci.clip_vision, vae=ci.vae, subject=ci.subject,
                                                  strength=1.0, start_percent=0.0, end_percent=1.0,
                                                  uncond=refinenet.UNCOND_NONE, at_h8=True, at_h16=True, at_h32=True,
                                                  at_h64=True)
    return patched, _ddim()


NO_TEXT = "baseline, no text"
MECHANISMS = [
    Mechanism("baseline", "inpaint", None, plain),
    Mechanism("control: masked->known attention blocked", "inpaint", "baseline", masked_to_known_blocked),
    Mechanism("PAIntA", "inpaint", "baseline", painta_only),
    Mechanism("RASG", "inpaint", "baseline", rasg_on),
    Mechanism("PAIntA + RASG", "inpaint", "baseline", painta_and_rasg),
    # RASG at smaller strengths than eq. 11's (eta 0.15): the same sigma rule at a lower eta
    Mechanism("RASG (eta 0.05)", "inpaint", "baseline", functools.partial(rasg_on, eta=0.05)),
    Mechanism("RASG (eta 0.015)", "inpaint", "baseline", functools.partial(rasg_on, eta=0.015)),
    # eq. 11's eta with the official code's sigma_t (per-step alphas: eta * sigma_t ~ 1e-3, kernels/rasg.reference_split)
    Mechanism("RASG (reference code's sigma)", "inpaint", "baseline",
              functools.partial(rasg_on, sigma_rule="reference code")),
    Mechanism("baseline (4-ch, noise mask)", "plain", None, plain),
    Mechanism("PAIntA (4-ch)", "plain", "baseline (4-ch, noise mask)", painta_only),
    Mechanism("PILOT", "plain", "baseline (4-ch, noise mask)", pilot_on),
    Mechanism("BrushNet branch (toy-trained)", "plain", "baseline (4-ch, noise mask)", with_branch,
              files=("branch",)),
    # LAR-Gen (toy-trained adapter and RefineNet): the subject image alone must say what to paint ...
    Mechanism(NO_TEXT, "inpaint", None, plain, text=False),
    Mechanism("image prompt, no text (beta 1)", "inpaint", NO_TEXT, functools.partial(image_prompt_on, beta=1.0),
              text=False, files=IMAGE_PROMPT_FILES),
    Mechanism("image prompt, no text (beta 0.3)", "inpaint", NO_TEXT, functools.partial(image_prompt_on, beta=0.3),
              text=False, files=IMAGE_PROMPT_FILES),
    Mechanism("image prompt (beta 0.3) + RefineNet, no text", "inpaint", "image prompt, no text (beta 0.3)",
              functools.partial(image_prompt_and_refinenet, beta=0.3), text=False,
              files=IMAGE_PROMPT_FILES + (REFINENET_FILE,)),
    Mechanism("RefineNet alone, no text", "inpaint", NO_TEXT, functools.partial(image_prompt_and_refinenet, beta=None),
              text=False, files=(CLIP_VISION_FILE, REFINENET_FILE)),
    # ... and with the text prompt, as LAR-Gen's stage 2 is trained (text and subject together)
    Mechanism("text + image prompt (beta 0.3)", "inpaint", "baseline", functools.partial(image_prompt_on, beta=0.3),
              files=IMAGE_PROMPT_FILES),
    Mechanism("text + image prompt (beta 0.3) + RefineNet", "inpaint", "text + image prompt (beta 0.3)",
              functools.partial(image_prompt_and_refinenet, beta=0.3), files=IMAGE_PROMPT_FILES + (REFINENET_FILE,)),
]


# ----------------------------------------------------------------------------------------------------------------
# Running a case


@dataclass
class ToyModels:
    loaded: dict          # "inpaint" / "plain" -> (ModelPatcher, CLIP, VAE)
    files: dict           # role -> file name (TOY_FILES with this run's choices)
    _clip_vision: Any = None

    @classmethod
    def load(cls, kinds, files: dict | None = None):
        """The toy models of ``kinds`` ("inpaint", "plain"), from ``files`` (role -> file name, over TOY_FILES)."""
        from faithful_inpaint.nodes.toy_world import ToyWorldLoader

        files = {**TOY_FILES, **(files or {})}
        return cls({kind: tuple(ToyWorldLoader.execute(checkpoint=files[kind])) for kind in kinds}, files)

    @property
    def clip_vision(self):
        if self._clip_vision is None:
            from faithful_inpaint.nodes.toy_world import ToyWorldClipVisionLoader

            (self._clip_vision,) = ToyWorldClipVisionLoader.execute(clip_vision=self.files[CLIP_VISION_FILE])
        return self._clip_vision


ADDON_FOLDERS = ("inpaint", "ipadapter", "refinenet")   # ComfyUI folders of the toy-trained branch, adapter, RefineNet


def register_toy_folders(toy_dir: Path, is_default: bool = False) -> None:
    """Make the toy add-ons in ``toy_dir`` visible to their loader nodes (BrushBranchLoader, ImagePromptAdapterLoader,
    RefineNetLoader), which read ComfyUI's model folders."""
    import folder_paths

    for folder in ADDON_FOLDERS:
        folder_paths.add_model_folder_path(folder, str(toy_dir), is_default=is_default)


def case_tensors(case: tw.InpaintCase) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.from_numpy(np.ascontiguousarray(case.scene.image()))[None]        # [1, H, W, 3]
    mask = torch.from_numpy(case.mask_image())[None]                                # [1, H, W]
    return image, mask


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def run_case(models: ToyModels, mechanism: Mechanism, case: tw.InpaintCase, steps: int, cfg: float):
    """(result cells [H, W, 3] in [0, 1], seconds) for one case, sampled as SamplerCustom samples."""
    import comfy.sample
    import comfy.samplers
    import nodes

    model, clip, vae = models.loaded[mechanism.model]
    image, mask = case_tensors(case)
    prompt = case.prompt if mechanism.text else ""
    subject = torch.from_numpy(case.subject())[None]
    started = time.perf_counter()
    positive, negative = encode(clip, prompt), encode(clip, "")
    if mechanism.model == "inpaint":
        positive, negative, latent = nodes.InpaintModelConditioning().encode(positive, negative, image, vae, mask)
    else:
        latent = {"samples": vae.encode(image), "noise_mask": mask[:, None]}
    clip_vision = models.clip_vision if CLIP_VISION_FILE in mechanism.files else None
    patched, sampler = mechanism.prepare(CaseInputs(model, clip, vae, prompt, image, mask, positive, negative,
                                                    subject, clip_vision, models.files))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)
    noise = comfy.sample.prepare_noise(latent["samples"], case.seed)
    out = comfy.sample.sample_custom(patched, noise, cfg, sampler, sigmas, positive, negative, latent["samples"],
                                     noise_mask=latent["noise_mask"], seed=case.seed, disable_pbar=True)
    seconds = time.perf_counter() - started
    cells = tw.latent_to_cells(model.model.latent_format.process_in(out.float()))[0].permute(1, 2, 0)
    return cells.numpy(), seconds


@functools.lru_cache(maxsize=None)
def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def toy_variant(mechanism: Mechanism, load_models: Callable[[], ToyModels], toy_dir: Path, steps: int,
                cfg: float, model_files: dict | None = None) -> engine.Variant:
    """The mechanism as an evaluation variant: sampled by :func:`run_case`, the result cells kept exactly; the run
    key covers the mechanism, the sampling settings and the toy files it reads (``model_files`` as ToyModels.load)."""
    chosen = {**TOY_FILES, **(model_files or {})}
    files = [chosen[role] for role in (mechanism.model,) + mechanism.files]
    settings = {"toy mechanism": mechanism.name, "steps": steps, "cfg": cfg, "text": mechanism.text,
                "files": {f: file_digest(toy_dir / f) for f in files if (toy_dir / f).is_file()}}

    def generate(case, image, mask, seed):
        with torch.inference_mode():
            cells, seconds = run_case(load_models(), mechanism, case.meta["toy"], steps, cfg)
        return engine.Output(array=cells, seconds=seconds)

    return engine.Variant(mechanism.name, generate, settings, mechanism.baseline)


def case_row(record: dict, case: tw.InpaintCase) -> dict:
    """The harness's per-case row from an evaluation record."""
    return {"case": case.seed, "kind": case.kind, "prompt": case.prompt, "seconds": record["seconds"],
            **record["metrics"]}


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def summarise(rows: list[dict], baseline_rows: list[dict] | None) -> dict:
    """Rates with Wilson intervals and, against the baseline's rows of the same cases, paired differences."""
    out = {"n": len(rows)}
    for m in METRICS:
        out[m] = rate([r[m] for r in rows])
        if baseline_rows is not None:
            out[f"{m}_diff"] = paired_difference([float(r[m]) for r in rows], [float(b[m]) for b in baseline_rows])
    out["mae"] = mean_interval([r["mae"] for r in rows])
    out["changed"] = mean_interval([r["changed"] for r in rows])
    out["seconds"] = mean_interval([r["seconds"] for r in rows])
    out["failures"] = tw.count_failures(r.get("failure") for r in rows)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Attention diagnostics (positive control 2)


def attention_statistics(models: ToyModels, cases: list[tw.InpaintCase], steps: int, cfg: float) -> list[dict]:
    """Per self-attention level of the baseline 9-channel model, over masked query pixels of the conditional pass:
    normalised entropy (1 = uniform over all pixels) of the head-averaged map and, per head, averaged over heads
    (heads that each attend sharply to different pixels average to a flatter map), the attention mass on known
    pixels and the known pixels' share of the image (what a uniform attention would give them)."""
    from faithful_inpaint.patching.attention_capture import AttentionRecorder

    def entropy(rows):                               # normalised entropy of each row (last dim) of a map
        return -(rows.clamp_min(1e-12).log() * rows).sum(-1) / math.log(rows.shape[-1])

    recorder = AttentionRecorder(attention=("attn1",), cond_only=True, average_heads=False)
    totals: dict[tuple, list] = {}

    def with_recorder(ci: CaseInputs):
        return recorder.install(ci.model), _ddim()

    probe = Mechanism("probe", "inpaint", None, with_recorder)
    for case in cases:
        recorder.clear()
        run_case(models, probe, case, steps, cfg)
        _, mask = case_tensors(case)
        for cap in recorder.captures:
            masked = masked_tokens(mask, cap.height, cap.width)[0]
            if not masked.any() or masked.all():
                continue
            heads = cap.maps[0][:, masked]                                              # [heads, masked, N]
            rows = heads.mean(0)                                                        # [masked, N]
            on_known = rows[:, ~masked].sum(-1)
            key = (cap.height, cap.width)
            totals.setdefault(key, []).append((float(entropy(rows).mean()), float(on_known.mean()),
                                               float((~masked).float().mean()), float(entropy(heads).mean())))
    out = []
    for (h, w), values in sorted(totals.items(), reverse=True):
        arr = np.array(values)
        out.append({"level": f"{h}x{w}", "maps": len(values), "entropy": float(arr[:, 0].mean()),
                    "head_entropy": float(arr[:, 3].mean()), "mass_on_known": float(arr[:, 1].mean()),
                    "known_share": float(arr[:, 2].mean())})
    return out


def attention_table(attention: list[dict]) -> list[str]:
    """The attention statistics as markdown lines."""
    lines = ["| level | maps | entropy of the head average (1 = uniform) | mean entropy per head | "
             "attention mass on known pixels | known share of pixels |", "|---|---|---|---|---|---|"]
    return lines + [f"| {a['level']} | {a['maps']} | {a['entropy']:.3f} | {a['head_entropy']:.3f} | "
                    f"{a['mass_on_known']:.3f} | {a['known_share']:.3f} |" for a in attention]


# ----------------------------------------------------------------------------------------------------------------
# Report


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def rate_cell(value) -> str:
    p, lo, hi = value
    return f"{pct(p)} [{pct(lo)}, {pct(hi)}]"


def diff_cell(value) -> str:
    mean, lo, hi = value
    return f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def report(summaries: dict, attention: list[dict], control_change: dict | None, args) -> str:
    lines = [f"# Toy-world evidence: {args.cases} paired cases per mechanism ({args.cases // 2} background, "
             f"{args.cases - args.cases // 2} nearby-object), {args.steps} DDIM-uniform steps, CFG {args.cfg}, "
             f"case seeds {args.seed}..{args.seed + args.cases - 1}", ""]
    if attention:
        lines += ["## Positive control: where masked pixels attend (baseline, 9-channel, conditional pass)", ""]
        lines += attention_table(attention)
        lines.append("")
    if control_change:
        lines += ["## Positive control: blocking masked->known self-attention changes the output", "",
                  f"Mean absolute change of the in-mask result against the baseline: {control_change['mean']:.4f} "
                  f"(colour units 0-1); cases with some cell changed by more than 0.1: "
                  f"{pct(control_change['changed'])}%.", ""]
    for kind in ("all",) + tw.CASE_KINDS:
        lines += [f"## Cases: {kind}", "",
                  "| mechanism | n | present % [95% CI] | dominant % | shape % | Δ present vs baseline (pp) | "
                  "Δ dominant | Δ shape | MAE outside | s / image |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, by_kind in summaries.items():
            s = by_kind[kind]
            diffs = [diff_cell(s[f"{m}_diff"]) if f"{m}_diff" in s else "-" for m in METRICS]
            lines.append(f"| {name} | {s['n']} | {rate_cell(s['present'])} | {rate_cell(s['dominant'])} | "
                         f"{rate_cell(s['shape_ok'])} | {' | '.join(diffs)} | {s['mae'][0]:.4f} | "
                         f"{s['seconds'][0]:.2f} |")
        lines.append("")
    lines += ["## Failures by kind (prompted colour absent from the hole: kernels/toy_world.failure_kind)", "",
              "| mechanism | n | background fills the hole | neighbour continues into it | other |",
              "|---|---|---|---|---|"]
    for name, by_kind in summaries.items():
        s = by_kind["all"]
        lines.append(f"| {name} | {s['n']} | " + " | ".join(str(s["failures"][k]) for k in tw.FAILURE_KINDS) + " |")
    lines.append("")
    return "\n".join(lines)


def picture_grid(cases, results: dict, path: Path, count: int, cell_pixels: int = 4, subjects: bool = False) -> None:
    """Rows: the first ``count`` cases; columns: the original (mask outlined in white), the image prompt when
    ``subjects``, then each mechanism."""
    from PIL import Image, ImageDraw

    def tile(cells, mask):
        img = tw.render(cells, cell_pixels)
        edge = tw.render((tw.dilate(mask, 1) & ~mask).astype(np.float32), cell_pixels) > 0.5
        img = img.copy()
        img[edge] = 1.0
        return img

    no_mask = np.zeros_like(cases[0].mask)
    rows = []
    for i, case in enumerate(cases[:count]):
        row = [tile(case.scene.cells, case.mask)]
        row += [tile(tw.to_cells(case.subject()), no_mask)] if subjects else []
        row += [tile(results[name][i], case.mask) for name in results]
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0))) for t in row], 1))
    grid = Image.fromarray((np.concatenate(rows, 0) * 255).round().astype(np.uint8))
    # A header band naming each column (PIL's default bitmap font, wrapped to the column width).
    labels = ["original (mask outlined)"] + ["image prompt (subject)"] * subjects + list(results)
    column = rows[0].shape[1] // len(labels)
    wrapped = [textwrap.wrap(label, max(8, column // 6)) for label in labels]
    band = 4 + 11 * max(len(w) for w in wrapped)
    canvas = Image.new("RGB", (grid.width, grid.height + band), "white")
    canvas.paste(grid, (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, lines in enumerate(wrapped):
        for j, line in enumerate(lines):
            draw.text((i * column + 4, 2 + 11 * j), line, fill="black")
    height = rows[0].shape[0]
    for r, case in enumerate(cases[:count]):      # each row's prompt, at the foot of its original
        top = band + (r + 1) * height - 16
        draw.rectangle((4, top, 4 + 6 * len(case.prompt) + 4, top + 12), fill="white")
        draw.text((6, top + 1), case.prompt, fill="black")
    canvas.save(path)


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=200, help="paired cases per mechanism (half of each kind)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="first case seed (case i uses seed + i)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mechanisms (and their baselines)")
    p.add_argument("--attention-cases", type=int, default=20, help="cases for the attention statistics (0: skip)")
    p.add_argument("--grid-cases", type=int, default=12)
    p.add_argument("--toy-dir", help="folder searched first for toy_world*.safetensors (default: the pack's toy/)")
    p.add_argument("--world", default="objects", choices=sorted(tw.WORLDS),
                   help="objects: make_cases (mask on empty background or next to an object); neglect: "
                        "make_neglect_cases (structured backgrounds, prompted object absent, neighbour partly masked)")
    p.add_argument("--file", action="append", default=[], metavar="ROLE=NAME",
                   help=f"the toy file of a role ({', '.join(TOY_FILES)}) in the toy folder, instead of the world's "
                        f"default (WORLD_FILES); e.g. branch=toy_brushnet.safetensors for the first world's branch "
                        f"on the neglect world's base")
    p.add_argument("--attention-only", action="store_true",
                   help="only the attention statistics of the 9-channel baseline on --attention-cases cases "
                        "(attention.md in --out), then exit")
    p.add_argument("--out", default="runs/evidence", help="report and per-case results (a killed run resumes)")
    p.add_argument("--shard-index", type=int, help="this process's share (default: accelerate's process index)")
    p.add_argument("--shard-count", type=int, help="number of shares (default: accelerate's process count)")
    args = p.parse_args(argv)

    chosen = [m for m in MECHANISMS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MECHANISMS}
    if unknown:
        p.error(f"unknown mechanism(s) {sorted(unknown)}; known: {[m.name for m in MECHANISMS]}")
    names = {m.name for m in chosen}
    while True:                                   # with their baselines, and the baselines' baselines
        more = {m.baseline for m in MECHANISMS if m.name in names and m.baseline} - names
        if not more:
            break
        names |= more
    chosen = [m for m in MECHANISMS if m.name in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    host.start()
    host.load_pack_nodes()
    import folder_paths

    if args.toy_dir:
        folder_paths.add_model_folder_path("toy_world", str(Path(args.toy_dir).resolve()), is_default=True)
    toy_dir = Path(args.toy_dir or host.PACK_ROOT / "toy").resolve()
    register_toy_folders(toy_dir, is_default=True)
    files = dict(WORLD_FILES[args.world])
    for item in args.file:
        role, _, name = item.partition("=")
        if role not in TOY_FILES or not name:
            p.error(f"--file {item!r}: expected ROLE=NAME with ROLE one of {list(TOY_FILES)}")
        files[role] = name
    needed = {"inpaint"} if args.attention_only else {r for m in chosen for r in (m.model,) + m.files}
    missing = sorted(files[r] for r in needed if not (toy_dir / files[r]).is_file()
                     and not folder_paths.get_full_path("toy_world", files[r]))
    if missing:
        p.error(f"missing in {toy_dir}: {missing}; train them (toy/README.md) or leave their mechanisms out with "
                f"--only")

    if args.attention_only:
        cases = tw.WORLDS[args.world](args.attention_cases, args.seed)
        with torch.inference_mode():
            models = ToyModels.load({"inpaint"}, files)
            attention = attention_statistics(models, cases, args.steps, args.cfg)
        text = "\n".join([f"# Self-attention of {files['inpaint']} on {args.attention_cases} {args.world} "
                          f"cases (masked query pixels, conditional pass, {args.steps} steps)", ""]
                         + attention_table(attention))
        (out / "attention.md").write_text(text + "\n")
        print(text)
        return 0

    dataset = read_toy(args.cases, args.seed, world=args.world)
    cases = [c.meta["toy"] for c in dataset.cases]
    models = None

    def load_models():
        nonlocal models
        if models is None:
            with torch.inference_mode():
                models = ToyModels.load({m.model for m in chosen}, files)
        return models

    variants = [toy_variant(m, load_models, toy_dir, args.steps, args.cfg, files) for m in chosen]
    index, count = engine.process_shard(args.shard_index, args.shard_count)
    engine.run(dataset, variants, [ToyBlobs()], out, shard_index=index, shard_count=count)
    engine.wait_for_everyone()
    if index != 0:
        return 0
    try:
        records = engine.collect(dataset, variants, out)
    except engine.IncompleteRun as error:
        print(f"shard {index} of {count} done; {error}")
        return 3
    rows, results = {}, {}
    for variant in variants:
        store = RunStore(out, variant.name, engine.variant_key(variant, dataset, 0))
        rows[variant.name] = [case_row(r, c) for r, c in zip(records[variant.name], cases)]
        results[variant.name] = [store.output_array(r) for r in records[variant.name]]
        print(f"{variant.name}: present {np.mean([r['present'] for r in rows[variant.name]]):.3f}, "
              f"{np.mean([r['seconds'] for r in rows[variant.name]]):.2f} s/image", flush=True)
    attention = []
    if args.attention_cases and any(m.model == "inpaint" for m in chosen):
        with torch.inference_mode():
            attention = attention_statistics(load_models(), cases[:args.attention_cases], args.steps, args.cfg)

    summaries = {}
    for mechanism in chosen:
        by_kind = {}
        for kind in ("all",) + tw.CASE_KINDS:
            pick = [i for i, c in enumerate(cases) if kind == "all" or c.kind == kind]
            base = rows.get(mechanism.baseline)
            by_kind[kind] = summarise([rows[mechanism.name][i] for i in pick],
                                      [base[i] for i in pick] if base else None)
        summaries[mechanism.name] = by_kind

    control_change = None
    control = "control: masked->known attention blocked"
    if control in results and "baseline" in results:
        deltas = [np.abs(a - b)[c.mask] for a, b, c in zip(results[control], results["baseline"], cases)]
        control_change = {"mean": float(np.mean([d.mean() for d in deltas])),
                          "changed": float(np.mean([(d > 0.1).any() for d in deltas]))}

    text = report(summaries, attention, control_change, args)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "attention": attention,
                                                  "control_change": control_change, "rows": rows}, indent=1))
    written = [out / "results.md", out / "results.json"]
    if args.grid_cases:                                   # --grid-cases 0: no picture (it crashed on an empty grid)
        picture_grid(cases, results, out / "grid.png", args.grid_cases,
                     subjects=any(CLIP_VISION_FILE in m.files for m in chosen))
        written.append(out / "grid.png")
    print(text)
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
