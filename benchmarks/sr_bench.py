"""InpaintConditionalUpscale cost: time and peak memory of the SR stage at stated output sizes.

    .venv/bin/python -m faithful_inpaint.benchmarks.sr_bench [--size 512 1024] [--steps 2]

Loads the full-shape random-weight SD x4 upscaler file (devtools.smoke_checkpoints, through ComfyUI's checkpoint
loader), and upscales a quarter-size "inpainted" image back to --size px with a centred square mask. Each size runs
in its own process: peak memory is the GPU allocator's peak on a GPU, the resident set size above the level before
the call on a CPU. Reported next to one plain x4-upscaler sampling of the same size and steps (no x0 blending, no
Poisson blend, untiled decode), the reference cost of the model itself.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from faithful_inpaint.benchmarks._measure import device_name, measure
from faithful_inpaint.devtools import host


def run_one(size, steps, variant):
    host.start()
    host.load_pack_nodes()
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import nodes
    from faithful_inpaint.patching.upscale import conditional_upscale
    from faithful_inpaint.devtools import smoke_checkpoints

    models = smoke_checkpoints.default_models_dir()
    name = smoke_checkpoints.ensure_smoke_models(models, ["sd_x4_upscaler"])["sd_x4_upscaler"]
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(models / "checkpoints" / name))[:3]
        pos = nodes.CLIPTextEncode().encode(clip, "a vase, high resolution professional photo")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, size, size, 3, generator=g)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    low = torch.rand(1, size // 4, size // 4, 3, generator=g)

    def ours():
        with torch.inference_mode():
            conditional_upscale(model, vae, pos, neg, image, mask, low, seed=0, steps=steps)

    def plain():
        with torch.inference_mode():
            up = nodes.NODE_CLASS_MAPPINGS["SD_4XUpscale_Conditioning"]
            p, n, latent = up.execute(low, pos, neg, 4.0, 20 / 350).result
            samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent["samples"], 0), steps, 7.5, "euler",
                                          "ddim_uniform", p, n, latent["samples"], disable_pbar=True, seed=0)
            vae.decode(samples)

    t, peak = measure(ours if variant == "InpaintConditionalUpscale" else plain)
    return {"time": t, "peak": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[512, 1024], help="output side in px")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.size[0], args.steps, args.one)))
        return
    print(f"# Conditional SR benchmark: SD x4 upscaler full-size random weights, {args.steps} steps, CFG 7.5, "
          f"{device_name()}; each run in its own process")
    print("| output | variant | seconds | peak MiB |")
    print("|---|---|---|---|")
    for size in args.size:
        for variant in ("plain x4 upscale", "InpaintConditionalUpscale"):
            out = subprocess.run([sys.executable, "-m", __spec__.name, "--one", variant, "--size", str(size), "--steps",
                                  str(args.steps)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {size} px | {variant} | {r['time']:.1f} | {r['peak'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
