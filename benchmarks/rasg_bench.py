"""RASG cost: time per step and peak memory versus plain DDIM on the same model, same run.

    .venv/bin/python -m faithful_inpaint.benchmarks.rasg_bench [--size 32] [--steps 4] [--repeats 2]

Full-size random-weight SD1.5 inpainting UNet, SamplerCustom-equivalent sampling (comfy.sample.sample_custom) with
CFG, ddim_uniform sigmas, a centred square noise mask. Rows: plain DDIM (ComfyUI's euler =
deterministic DDIM), RASG every step, RASG on the first half of the steps (the paper's suggested way to cut cost).
The RASG model is prepared by RASGGuidance's code path (inference-tensor weights converted once per sampling run,
H/32 recorder). ``--with-wrappers`` adds the previous method for an A/B in the same run: the same model with a
weight wrapper on every UNet weight (``add_weight_wrapper``), which copies every weight in every forward.
Times are interleaved warm runs in one process (robust to slow drifts in machine load); memory is each variant's
first run in its own process (on a CPU, the resident set size above the level before it: a warm process reuses
freed memory and would show nothing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


from faithful_inpaint.benchmarks._case import inpaint_case
from faithful_inpaint.benchmarks._measure import device_name, measure
from faithful_inpaint.devtools import host


VARIANTS = ("plain DDIM", "RASG, every step", "RASG, first half")
WRAPPED = "RASG, every step, per-forward weight copies (previous method)"


def with_weight_copies(model):
    """The previous way to make inference-tensor weights usable in autograd: a weight wrapper on every UNet weight
    (ComfyUI's cast then copies each weight in every forward). Kept here for the A/B only."""
    clone = model.clone()
    for name, _ in clone.get_model_object("diffusion_model").named_parameters():
        clone.add_weight_wrapper(f"diffusion_model.{name}", lambda w: w.detach())
    return clone


def setup(side, steps, wrappers=False):
    """The model, each variant's (model, sampler) and a sample(model, sampler) function."""
    host.start()
    host.load_pack_nodes()
    import comfy.samplers
    from faithful_inpaint.patching import rasg
    from faithful_inpaint.devtools.random_models import build_model

    model = build_model("sd15", "full", inpaint=True)
    prepared = rasg.install(model, [1, 2, 3, 4])
    variants = {
        "plain DDIM": (model, comfy.samplers.ksampler("euler")),
        "RASG, every step": (prepared, comfy.samplers.KSAMPLER(rasg.sample_rasg, extra_options={"eta": 0.15})),
        "RASG, first half": (prepared, comfy.samplers.KSAMPLER(rasg.sample_rasg, extra_options={
            "eta": 0.15, "guide_end": 0.5})),
    }
    if wrappers:
        variants[WRAPPED] = (with_weight_copies(prepared), variants["RASG, every step"][1])
    sample = inpaint_case(model, side, steps)
    return variants, sample


def cold_peak(variant, side, steps):
    """In a fresh process: peak memory of the variant's first sampling run, above the level before it."""
    variants, sample = setup(side, steps, wrappers=variant == WRAPPED)
    return measure(lambda: sample(*variants[variant]))[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[32], help="latent sides (image side / 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--with-wrappers", action="store_true", help="add the previous method's row (A/B)")
    ap.add_argument("--peak-of", choices=VARIANTS + (WRAPPED,), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_of:
        print(json.dumps(cold_peak(args.peak_of, args.size[0], args.steps)))
        return
    print(f"# RASG benchmark: SD1.5 inpainting full-size random weights, {args.steps} steps, CFG 7.5, "
          f"{device_name()}. Time: median of {args.repeats} interleaved warm runs in one process. Memory: each "
          f"variant's first run in its own process, above the level before it.")
    print("| latent (image) | variant | s per step | ratio to DDIM | peak MiB | memory ratio | runs (s per step) |")
    print("|---|---|---|---|---|---|---|")
    for side in args.size:
        peaks = {}
        for variant in VARIANTS + ((WRAPPED,) if args.with_wrappers else ()):
            out = subprocess.run([sys.executable, "-m", __spec__.name, "--peak-of", variant,
                                  "--size", str(side), "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        variants, sample = setup(side, args.steps, args.with_wrappers)
        for pair in variants.values():  # warm-up (the first runs after start-up are slower)
            sample(*pair)
            sample(*pair)
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for name, pair in variants.items():
                times[name].append(measure(lambda: sample(*pair))[0] / args.steps)
        base_t, base_m = statistics.median(times["plain DDIM"]), peaks["plain DDIM"]
        for name in variants:
            t = statistics.median(times[name])
            print(f"| {side}x{side} ({side * 8} px) | {name} | {t:.2f} | {t / base_t:.2f} | "
                  f"{peaks[name] / 2**20:.0f} | {peaks[name] / max(base_m, 1):.2f} | "
                  f"{' '.join(f'{x:.2f}' for x in times[name])} |", flush=True)


if __name__ == "__main__":
    main()
