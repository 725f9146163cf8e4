"""RASG cost: time per step and peak memory versus plain DDIM on the same model, same run.

    .venv/bin/python benchmarks/rasg_bench.py [--size 32] [--steps 4] [--repeats 2]

Full-size random-weight SD1.5 inpainting UNet, SamplerCustom-equivalent sampling (comfy.sample.sample_custom) with
CFG (cond and uncond batched), ddim_uniform sigmas, a centred square noise mask. Rows: plain DDIM (ComfyUI's euler =
deterministic DDIM), RASG every step, RASG on the first half of the steps (the paper's suggested way to cut cost).
The RASG model is prepared by RASGGuidance's code path (gradients enabled through weight wrappers, H/32 recorder).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks._measure import device_name, measure  # noqa: E402
from headless import host  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[32], help="latent sides (image side / 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    host.start()
    host.load_pack_nodes()
    import comfy.sample
    import comfy.samplers
    from faithful_inpaint.patching import rasg
    from headless.random_models import build_model

    model = build_model("sd15", "full", inpaint=True)
    prepared = rasg.install(model, [1, 2, 3, 4])
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 77, 768, generator=g)
    positive, negative = [[ctx, {}]], [[torch.zeros_like(ctx), {}]]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", args.steps)
    variants = {
        "plain DDIM": (model, comfy.samplers.ksampler("euler")),
        "RASG, every step": (prepared, comfy.samplers.KSAMPLER(rasg.sample_rasg, extra_options={"eta": 0.15})),
        "RASG, first half": (prepared, comfy.samplers.KSAMPLER(rasg.sample_rasg, extra_options={
            "eta": 0.15, "guide_end": 0.5})),
    }
    print(f"# RASG benchmark: SD1.5 inpainting full-size random weights, {args.steps} steps, CFG batched, "
          f"{device_name()}")
    print("| latent (image) | variant | s per step | ratio to DDIM | peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|")
    for side in args.size:
        latent = torch.zeros(1, 4, side, side)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
        mask = torch.zeros(1, 1, side, side)
        mask[..., side // 4:3 * side // 4, side // 4:3 * side // 4] = 1

        def sample(m, sampler):
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                comfy.sample.sample_custom(m, noise, 7.5, sampler, sigmas, positive, negative, latent,
                                           noise_mask=mask, seed=1, disable_pbar=True)

        for m, s in variants.values():  # warm-up
            sample(m, s)
        times = {k: [] for k in variants}
        mems = {k: [] for k in variants}
        for _ in range(args.repeats):
            for name, (m, s) in variants.items():
                t, mem = measure(lambda: sample(m, s))
                times[name].append(t / args.steps)
                mems[name].append(mem)
        base_t, base_m = statistics.median(times["plain DDIM"]), max(mems["plain DDIM"])
        for name in variants:
            t, mem = statistics.median(times[name]), max(mems[name])
            print(f"| {side}x{side} ({side * 8} px) | {name} | {t:.2f} | {t / base_t:.2f} | {mem / 2**20:.0f} | "
                  f"{mem / max(base_m, 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
