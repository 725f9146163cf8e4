"""PILOT cost: total sampling time and peak memory versus plain sampling with the same steps, same model, same run.

    .venv/bin/python -m faithful_inpaint.benchmarks.pilot_bench [--size 32] [--steps 20] [--repeats 2]

Full-size random-weight plain SD1.5 (4-channel), ddim_uniform sigmas, CFG 7.5, a centred square noise mask. The
optimisation schedule is kept proportional to the reference's 100-step run: "reference" optimises every 10 steps
with 10 inner steps (one forward+backward per sampling step), "fast" every 20 steps with 5 inner steps (a quarter
of that); with --steps 20 that is 20 and 5 gradient passes. gamma 1 (text configuration: the whole schedule).
Time: median of interleaved warm runs in one process; memory: each variant's first run in its own process, above
the level before it (CPU: resident set size). ``--with-wrappers`` adds, for an A/B in the same run, the reference
schedule with the previous way of making inference-tensor weights usable in autograd (a weight wrapper on every
UNet weight: every forward copies every weight; see benchmarks/rasg_bench.py).
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

VARIANTS = {"plain": None, "PILOT reference": {"every": 10, "inner_steps": 10},
            "PILOT fast": {"every": 20, "inner_steps": 5}}
WRAPPED = "PILOT reference, per-forward weight copies (previous method)"


def setup(side, steps, wrappers=False):
    host.start()
    host.load_pack_nodes()
    import comfy.samplers
    from faithful_inpaint.patching import pilot
    from faithful_inpaint.devtools.random_models import build_model

    model = build_model("sd15", "full")
    prepared = pilot.install(model, [1, 2, 3])
    variants = {name: (model, comfy.samplers.ksampler("euler")) if opts is None else
                (prepared, comfy.samplers.KSAMPLER(pilot.sample_pilot, extra_options=opts))
                for name, opts in VARIANTS.items()}
    if wrappers:
        from faithful_inpaint.benchmarks.rasg_bench import with_weight_copies

        variants[WRAPPED] = (with_weight_copies(prepared), variants["PILOT reference"][1])
    sample = inpaint_case(model, side, steps)
    return variants, sample


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32, help="latent side (image side / 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--with-wrappers", action="store_true", help="add the previous method's row (A/B)")
    ap.add_argument("--peak-of", choices=list(VARIANTS) + [WRAPPED], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_of:
        variants, sample = setup(args.size, args.steps, wrappers=args.peak_of == WRAPPED)
        print(json.dumps(measure(lambda: sample(*variants[args.peak_of]))[1]))
        return
    print(f"# PILOT benchmark: SD1.5 full-size random weights, {args.steps} steps, CFG 7.5, {device_name()}. "
          f"Time: median of {args.repeats} interleaved warm runs; memory: first run in a fresh process.")
    print("| latent (image) | variant | total s | ratio to plain | peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|")
    peaks = {}
    for name in list(VARIANTS) + ([WRAPPED] if args.with_wrappers else []):
        out = subprocess.run([sys.executable, "-m", __spec__.name, "--peak-of", name,
                              "--size", str(args.size), "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])
    variants, sample = setup(args.size, args.steps, args.with_wrappers)
    for pair in variants.values():  # warm-up
        sample(*pair)
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, pair in variants.items():
            times[name].append(measure(lambda: sample(*pair))[0])
    base_t, base_m = statistics.median(times["plain"]), peaks["plain"]
    for name in variants:
        t = statistics.median(times[name])
        print(f"| {args.size}x{args.size} ({args.size * 8} px) | {name} | {t:.1f} | {t / base_t:.2f} | "
              f"{peaks[name] / 2**20:.0f} | {peaks[name] / max(base_m, 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
