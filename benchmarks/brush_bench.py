"""BrushNet branch cost: sampling time and peak memory with the branch versus without, same model, same run.

    .venv/bin/python -m faithful_inpaint.benchmarks.brush_bench [--size 32 64] [--steps 4] [--repeats 2] [--family sd15]

Full-size random-weight UNet (real shapes, the ordinary 4-channel model BrushNet pairs with) and a full-size
BrushNet branch built from it (the public file's architecture; random zero-convs so the residuals are non-zero),
Euler with CFG (cond and uncond batched), the branch active on every step (strength 1, whole schedule, as the
reference runs it). Memory: CUDA max_memory_allocated on a GPU; on the CPU the peak resident set size above the level
before sampling (the branch weights are resident before, and listed separately). Times are medians over --repeats,
alternating plain and branch runs.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from faithful_inpaint.benchmarks._measure import device_name, measure
from faithful_inpaint.devtools import host


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs="+", default=[32, 64], help="latent sides (image side / 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    args = ap.parse_args()

    host.start()
    host.load_pack_nodes()
    import comfy.model_management
    import comfy.sample
    from faithful_inpaint.kernels.brush_branch import BranchConfig, BrushBranch
    from faithful_inpaint.patching.brush_branch import (BranchConditioning, BrushBranchHooks, branch_patcher,
                                                        unet_state_dict_diffusers)
    from faithful_inpaint.patching.schedule import ScheduleWindow
    from faithful_inpaint.devtools.random_models import build_model

    dim = {"sd15": 768, "sdxl": 2048}[args.family]
    model = build_model(args.family, "full")
    cfg = BranchConfig.sd15() if args.family == "sd15" else BranchConfig.sdxl()
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        branch = BrushBranch.from_unet(unet_state_dict_diffusers(model), cfg)
        for name, p in branch.named_parameters():
            if name.startswith("brushnet_"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        branch.to(comfy.model_management.unet_dtype())
    branch_mib = sum(p.numel() * p.element_size() for p in branch.parameters()) / 2**20
    patcher = branch_patcher(branch)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if args.family == "sdxl" else {}
    ctx = torch.randn(1, 77, dim, generator=g)
    positive, negative = [[ctx, dict(extra)]], [[torch.zeros_like(ctx), dict(extra)]]

    def with_branch(side):
        clone = model.clone()
        keep = torch.ones(1, 1, side, side)
        keep[..., side // 4:3 * side // 4, side // 4:3 * side // 4] = 0
        cond = BranchConditioning(torch.randn(1, 4, side, side, generator=g), keep)
        BrushBranchHooks(patcher, cond, 1.0, ScheduleWindow(1e9, 0.0)).install(clone)
        return clone

    def run(m, side, steps):
        latent = torch.zeros(1, 4, side, side)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            return measure(lambda: comfy.sample.sample(m, noise, steps, 7.5, "euler", "normal", positive, negative,
                                                       latent, seed=0, disable_pbar=True))

    print(f"# BrushNet branch benchmark: {args.family} full-size random weights, {args.steps} Euler steps, CFG "
          f"batched, branch every step, {device_name()}; branch weights {branch_mib:.0f} MiB")
    print("| latent (image) | plain s | with branch s | time ratio | plain peak MiB | branch peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for side in args.size:
        patched = with_branch(side)
        run(model, side, 1), run(patched, side, 1)  # warm-up (loads both models)
        plain_t, plain_m, br_t, br_m = [], [], [], []
        for _ in range(args.repeats):
            t, m = run(model, side, args.steps)
            plain_t.append(t), plain_m.append(m)
            t, m = run(patched, side, args.steps)
            br_t.append(t), br_m.append(m)
        pt, bt = statistics.median(plain_t), statistics.median(br_t)
        pm, bm = max(plain_m) / 2**20, max(br_m) / 2**20
        print(f"| {side}x{side} ({side * 8} px) | {pt:.2f} | {bt:.2f} | {bt / pt:.3f} | {pm:.0f} | {bm:.0f} | "
              f"{bm / max(pm, 1e-9):.3f} |", flush=True)


if __name__ == "__main__":
    main()
