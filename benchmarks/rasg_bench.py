"""RASG cost: time per step and peak memory versus plain DDIM on the same model, same run.

    .venv/bin/python benchmarks/rasg_bench.py [--size 32] [--steps 4] [--repeats 2]

Full-size random-weight SD1.5 inpainting UNet, SamplerCustom-equivalent sampling (comfy.sample.sample_custom) with
CFG, ddim_uniform sigmas, a centred square noise mask. Rows: plain DDIM (ComfyUI's euler =
deterministic DDIM), RASG every step, RASG on the first half of the steps (the paper's suggested way to cut cost).
The RASG model is prepared by RASGGuidance's code path (gradients enabled through weight wrappers, H/32 recorder).
Each variant runs in its own process: its first sampling run gives the peak memory above the level before it (on a
CPU, the resident set size; a warm process reuses freed memory and would show nothing), the next runs the time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks._measure import device_name, measure  # noqa: E402
from headless import host  # noqa: E402


VARIANTS = ("plain DDIM", "RASG, every step", "RASG, first half")


def run_one(variant, side, steps, repeats):
    """In this process: the first (cold) sampling run gives the memory; after one more, ``repeats`` runs the time."""
    host.start()
    host.load_pack_nodes()
    import comfy.sample
    import comfy.samplers
    from faithful_inpaint.patching import rasg
    from headless.random_models import build_model

    model = build_model("sd15", "full", inpaint=True)
    if variant == "plain DDIM":
        sampler = comfy.samplers.ksampler("euler")
    else:
        model = rasg.install(model, [1, 2, 3, 4])
        sampler = comfy.samplers.KSAMPLER(rasg.sample_rasg, extra_options={
            "eta": 0.15, "guide_end": 1.0 if variant == "RASG, every step" else 0.5})
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 77, 768, generator=g)
    positive, negative = [[ctx, {}]], [[torch.zeros_like(ctx), {}]]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)
    latent = torch.zeros(1, 4, side, side)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, side, side)
    mask[..., side // 4:3 * side // 4, side // 4:3 * side // 4] = 1

    def sample():
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            comfy.sample.sample_custom(model, noise, 7.5, sampler, sigmas, positive, negative, latent,
                                       noise_mask=mask, seed=1, disable_pbar=True)

    _, peak = measure(sample)
    sample()  # the first runs after start-up are slower (allocator growth); time the ones after
    times = [measure(sample)[0] / steps for _ in range(repeats)]
    return {"time": statistics.median(times), "peak": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[32], help="latent sides (image side / 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.size[0], args.steps, args.repeats)))
        return
    print(f"# RASG benchmark: SD1.5 inpainting full-size random weights, {args.steps} steps, CFG 7.5, "
          f"{device_name()}; each variant in its own process (memory: its first run, above the level before it)")
    print("| latent (image) | variant | s per step | ratio to DDIM | peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|")
    for side in args.size:
        results = {}
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--one", variant, "--size", str(side), "--steps",
                                  str(args.steps), "--repeats", str(args.repeats)], capture_output=True, text=True,
                                 check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results["plain DDIM"]
        for variant, r in results.items():
            print(f"| {side}x{side} ({side * 8} px) | {variant} | {r['time']:.2f} | {r['time'] / base['time']:.2f} | "
                  f"{r['peak'] / 2**20:.0f} | {r['peak'] / max(base['peak'], 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
