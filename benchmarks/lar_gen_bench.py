"""LAR-Gen sampling cost: plain vs RefineNet vs the full LAR-Gen model (image prompt + RefineNet), same model, same
run.

    .venv/bin/python -m faithful_inpaint.benchmarks.lar_gen_bench [--size 32 64] [--steps 4] [--repeats 2]

Full-size random-weight SD1.5 *inpainting* UNet (real shapes, 9 channels), the random-weight smoke RefineNet file
(full-size SD1.5 attn2 weights + the 1280-wide MLP) and the random-weight IP-Adapter-plus SD1.5 file (16 image
tokens, beta 0.3 as LAR-Gen uses it with RefineNet); Euler with CFG 7.5 (cond and uncond batched), a centred square
noise mask. RefineNet runs once per step at the subject batch (1) on the sampled latent's size, every decoder
self-attention level on (the paper's setting), unconditional rows plain (the node's default). The CLIP features
(detail tokens, image tokens) are random: the CLIP-vision encode runs once per node execution, not per step.
Memory: CUDA max_memory_allocated on a GPU; on the CPU the peak resident set size above the level before sampling,
polled every 2 ms (RefineNet's weights are loaded before, so this is the activations' extra). Times are medians
over --repeats, alternating the three models. Target (issue): RefineNet at most 2.2x plain.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from faithful_inpaint.benchmarks._case import inpaint_case
from faithful_inpaint.benchmarks._measure import device_name, measure
from faithful_inpaint.devtools import host

CLIP_TOKENS, CLIP_WIDTH = 257, 1280          # CLIP ViT-H-14 penultimate hidden states


def smoke_file(kind: str) -> str:
    from faithful_inpaint.devtools import smoke_checkpoints as sc

    root = sc.default_models_dir()
    return str(root / sc.folder_for(kind) / sc.ensure_smoke_models(root, [kind])[kind])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[32, 64], help="latent sides (image side / 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    host.start()
    host.load_pack_nodes()
    import comfy.samplers
    from faithful_inpaint.nodes.image_prompt import load_adapter
    from faithful_inpaint.nodes.refinenet import LEVELS, load_refinenet
    from faithful_inpaint.patching import image_prompt as ip
    from faithful_inpaint.patching.refinenet import RefineNetHooks, decoder_layers
    from faithful_inpaint.patching.schedule import ScheduleWindow
    from faithful_inpaint.devtools.random_models import build_model

    always = ScheduleWindow(float("inf"), 0.0)
    model = build_model("sd15", "full", inpaint=True)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, CLIP_TOKENS, CLIP_WIDTH, generator=g)
    with torch.inference_mode():
        adapter = load_adapter(smoke_file("ipadapter_sd15_plus"))
        layers = ip.check_model(adapter.spec, model, "benchmark")
        assigned = ip.ImagePromptHooks.from_adapter(adapter, layers, adapter.project(features),
                                                    adapter.project(torch.zeros_like(features)), beta=0.3,
                                                    window=always).install(model)
        refinenet = load_refinenet(smoke_file("refinenet_sd15"))
        tokens = refinenet.detail_encoder(features)

    def with_refinenet(base, side):
        patched = base.clone()
        RefineNetHooks(auxiliary=refinenet.auxiliary_for(model, "benchmark"), detail_tokens=tokens,
                       subject_latent=torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2)),
                       layers=frozenset(decoder_layers(model.get_model_object("diffusion_model"),
                                                       tuple(LEVELS.values()))),
                       strength=1.0, uncond_sees_subject=False, window=always).install(patched)
        return patched

    euler = comfy.samplers.ksampler("euler")
    print(f"# LAR-Gen sampling benchmark: SD1.5-inpainting full-size random weights, {args.steps} Euler steps, "
          f"CFG 7.5 batched, {device_name()}")
    print("| latent (image) | plain s | RefineNet s | ratio | image prompt + RefineNet s | ratio | plain peak MiB | "
          "RefineNet peak MiB | image prompt + RefineNet peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side in args.size:
        models = {"plain": model, "refine": with_refinenet(model, side), "lar_gen": with_refinenet(assigned, side)}
        warm = inpaint_case(model, side, 1)
        for m in models.values():
            warm(m, euler)
        sample = inpaint_case(model, side, args.steps)
        times = {k: [] for k in models}
        peaks = {k: [] for k in models}
        for _ in range(args.repeats):
            for name, m in models.items():
                t, mem = measure(lambda: sample(m, euler))
                times[name].append(t), peaks[name].append(mem)
        t = {k: statistics.median(v) for k, v in times.items()}
        p = {k: max(v) / 2**20 for k, v in peaks.items()}
        print(f"| {side}x{side} ({side * 8} px) | {t['plain']:.2f} | {t['refine']:.2f} | {t['refine'] / t['plain']:.2f} "
              f"| {t['lar_gen']:.2f} | {t['lar_gen'] / t['plain']:.2f} | {p['plain']:.0f} | {p['refine']:.0f} | "
              f"{p['lar_gen']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
