"""Time per update of chi^2-VIS against IWAE at the same K, in one run.

Run by hand:  python benchmarks/vis_cost.py [--steps 50]

Two models: the VIS paper's 1-d mixture (1000 data points, local latents) at K in
{100, 1000}, and the Bernoulli VAE on binarized digits (batch 100) at K in {5, 50}.  Both
backends draw the same K particles per data point; VIS takes two gradient passes (model and
proposal objectives differ), IWAE with DReG also two.  Prints medians and the ratio
(target: VIS / IWAE <= 1.3).
"""

import argparse
import os
import statistics
import sys
import time

import pyro
import torch

sys.path.insert(0, os.path.dirname(__file__))
import mixture_model as mm  # noqa: E402
from ppl_lvm import IWAE, ChiSquareVIS  # noqa: E402
from ppl_lvm.datasets import load_digits_binary  # noqa: E402
from ppl_lvm.models import VAE  # noqa: E402


def median_step_ms(make, x, steps, warmup=5):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    backend = make()
    for _ in range(warmup):
        backend.step(x)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        backend.step(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.steps} steps")
    print(f"{'model':<10} {'K':>6} {'IWAE (dreg) ms':>15} {'VIS ms':>10} {'ratio VIS/IWAE':>15}")
    x_mix = mm.simulate(1000, seed=0)
    for k in (100, 1000):
        iw = median_step_ms(lambda: IWAE(mm.model, mm.guide, num_particles=k), x_mix, args.steps)
        vi = median_step_ms(lambda: ChiSquareVIS(mm.model, mm.guide, num_particles=k), x_mix, args.steps)
        print(f"{'mixture':<10} {k:>6} {iw:>15.2f} {vi:>10.2f} {vi / iw:>15.2f}", flush=True)
    x_img = load_digits_binary().train[:100]
    for k in (5, 50):
        def vae_iwae():
            v = VAE(64, latent_dim=8, hidden=(64,), name="cost")
            return IWAE(v.model, v.guide, num_particles=k)

        def vae_vis():
            v = VAE(64, latent_dim=8, hidden=(64,), name="cost")
            return ChiSquareVIS(v.model, v.guide, num_particles=k)

        iw = median_step_ms(vae_iwae, x_img, args.steps)
        vi = median_step_ms(vae_vis, x_img, args.steps)
        print(f"{'VAE':<10} {k:>6} {iw:>15.2f} {vi:>10.2f} {vi / iw:>15.2f}", flush=True)


if __name__ == "__main__":
    main()
