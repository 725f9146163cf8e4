"""Image-prompt attention cost: sampling time and peak memory, patched versus plain, same model, same run.

    .venv/bin/python -m faithful_inpaint.benchmarks.image_prompt_bench [--size 32 64] [--steps 4] [--repeats 2] [--variant linear]

Full-size random-weight SD1.5 UNet (real shapes, 4-channel), the random-weight public-layout SD1.5 adapter file of
the smoke models (linear: 4 image tokens; plus: 16), Euler with CFG 7.5 (cond and uncond batched), a centred square
noise mask, the image prompt active on every step with beta 1. The image tokens come from random CLIP features (the
CLIP-vision encode runs once per node execution, not per step, and is not part of sampling).
Memory: CUDA max_memory_allocated on a GPU; on the CPU the peak resident set size above the level before sampling,
polled every 2 ms. Times are medians over --repeats, alternating plain and patched runs.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from faithful_inpaint.benchmarks._case import inpaint_case
from faithful_inpaint.benchmarks._measure import device_name, measure
from faithful_inpaint.devtools import host

KINDS = {"linear": ("ipadapter_sd15", 1024, None), "plus": ("ipadapter_sd15_plus", 1280, 257)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[32, 64], help="latent sides (image side / 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variant", default="linear", choices=list(KINDS))
    args = ap.parse_args()

    host.start()
    host.load_pack_nodes()
    import comfy.samplers
    from faithful_inpaint.nodes.image_prompt import load_adapter
    from faithful_inpaint.patching import image_prompt as ip
    from faithful_inpaint.patching.schedule import ScheduleWindow
    from faithful_inpaint.devtools import smoke_checkpoints as sc
    from faithful_inpaint.devtools.random_models import build_model

    kind, feature_dim, tokens = KINDS[args.variant]
    root = sc.default_models_dir()
    path = root / sc.folder_for(kind) / sc.ensure_smoke_models(root, [kind])[kind]
    model = build_model("sd15", "full")
    with torch.inference_mode():
        adapter = load_adapter(str(path))
        g = torch.Generator().manual_seed(0)
        shape = (1, feature_dim) if tokens is None else (1, tokens, feature_dim)
        image_tokens = adapter.project(torch.randn(*shape, generator=g))
        null_tokens = adapter.project(torch.zeros(*shape))
        layers = ip.check_model(adapter.spec, model, "benchmark")
        hooks = ip.ImagePromptHooks.from_adapter(adapter, layers, image_tokens, null_tokens, beta=1.0,
                                                 window=ScheduleWindow(float("inf"), 0.0))
        patched = hooks.install(model)
    euler = comfy.samplers.ksampler("euler")

    print(f"# Image-prompt attention benchmark: SD1.5 full-size random weights, {args.variant} adapter "
          f"({image_tokens.shape[1]} image tokens), {args.steps} Euler steps, CFG 7.5 batched, {device_name()}")
    print("| latent (image) | plain s | image prompt s | time ratio | plain peak MiB | image prompt peak MiB | "
          "memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for side in args.size:
        warm = inpaint_case(model, side, 1)
        warm(model, euler), warm(patched, euler)
        sample = inpaint_case(model, side, args.steps)
        plain_t, plain_m, ip_t, ip_m = [], [], [], []
        for _ in range(args.repeats):
            t, m = measure(lambda: sample(model, euler))
            plain_t.append(t), plain_m.append(m)
            t, m = measure(lambda: sample(patched, euler))
            ip_t.append(t), ip_m.append(m)
        pt, it = statistics.median(plain_t), statistics.median(ip_t)
        pm, im = max(plain_m) / 2**20, max(ip_m) / 2**20
        print(f"| {side}x{side} ({side * 8} px) | {pt:.2f} | {it:.2f} | {it / pt:.3f} | {pm:.0f} | {im:.0f} | "
              f"{im / max(pm, 1e-9):.3f} |", flush=True)


if __name__ == "__main__":
    main()
