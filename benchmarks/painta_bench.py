"""PAIntA cost: sampling time and peak memory, patched versus unpatched, same model, same run.

    .venv/bin/python -m faithful_inpaint.benchmarks.painta_bench [--size 32 64] [--steps 4] [--repeats 2] [--family sd15]

Full-size random-weight UNet (real shapes, 9-channel inpainting), Euler with CFG (cond and uncond batched), a centred
square mask covering a quarter of the image. Reported per latent size:
  - "paper window": PAIntA as the paper runs it (H/16 + H/32, first half of the schedule), whole-run ratio;
  - "every step": PAIntA active on every step (the cost of one active step).
Memory: CUDA max_memory_allocated on a GPU; on the CPU the peak resident set size above the level before sampling,
polled every 2 ms. Times are medians over --repeats, alternating plain and patched runs.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from faithful_inpaint.benchmarks._measure import device_name, measure
from faithful_inpaint.devtools import host


def measure_sampling(model, latent_side, steps, positive, negative, seed=0):
    import comfy.sample

    latent = torch.zeros(1, 4, latent_side, latent_side)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, 1, latent_side, latent_side)
    q = latent_side // 4
    mask[..., q:3 * q, q:3 * q] = 1
    return measure(lambda: comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative,
                                               latent, noise_mask=mask, seed=seed, disable_pbar=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[32, 64], help="latent sides (image side / 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--family", default="sd15", choices=["sd15", "sd2", "sdxl"])
    args = ap.parse_args()

    host.start()
    host.load_pack_nodes()
    from faithful_inpaint.patching.painta import PAIntAHooks
    from faithful_inpaint.patching.prompt import RegionPrompt
    from faithful_inpaint.patching.schedule import ScheduleWindow
    from faithful_inpaint.devtools.random_models import build_model

    dim = {"sd15": 768, "sd2": 1024, "sdxl": 2048}[args.family]
    model = build_model(args.family, "full", inpaint=args.family != "sdxl")
    g = torch.Generator().manual_seed(0)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if args.family == "sdxl" else {}
    ctx = torch.randn(1, 77, dim, generator=g)
    positive, negative = [[ctx, dict(extra)]], [[torch.zeros_like(ctx), dict(extra)]]

    def patched(window, side):
        clone = model.clone()
        mask = torch.zeros(1, 1, side * 8, side * 8)
        q = side * 2
        mask[..., q:3 * q, q:3 * q] = 1
        PAIntAHooks(RegionPrompt("x", ctx, [1, 2, 3, 4], 3), mask, (2, 4), window).install(clone)
        return clone

    print(f"# PAIntA benchmark: {args.family} full-size random weights, {args.steps} Euler steps, CFG batched, "
          f"{device_name()}")
    print("| latent (image) | variant | plain s | PAIntA s | time ratio | plain peak MiB | PAIntA peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for side in args.size:
        measure_sampling(model, side, 1, positive, negative)  # warm-up
        variants = {"paper window": ScheduleWindow.from_percent(model, 0.0, 0.5),
                    "every step": ScheduleWindow(1e9, 0.0)}
        for name, window in variants.items():
            p = patched(window, side)
            plain_t, plain_m, pa_t, pa_m = [], [], [], []
            for _ in range(args.repeats):
                t, m = measure_sampling(model, side, args.steps, positive, negative)
                plain_t.append(t), plain_m.append(m)
                t, m = measure_sampling(p, side, args.steps, positive, negative)
                pa_t.append(t), pa_m.append(m)
            pt, at = statistics.median(plain_t), statistics.median(pa_t)
            pm, am = max(plain_m) / 2**20, max(pa_m) / 2**20
            print(f"| {side}x{side} ({side * 8} px) | {name} | {pt:.2f} | {at:.2f} | {at / pt:.3f} | {pm:.0f} | "
                  f"{am:.0f} | {am / max(pm, 1e-9):.3f} |", flush=True)


if __name__ == "__main__":
    main()
