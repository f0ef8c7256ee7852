"""Reproduce the IWAE paper's ordering on offline data: VAE vs IWAE (K=5, K=50) on binarized digits.

Run by hand:  python benchmarks/iwae_digits.py [--steps 10000] [--seeds 0 1 2] [--eval-particles 5000]

Same architecture for every method (Bernoulli VAE, 64-64-8 tanh MLPs), Adam(lr=3e-3),
minibatches of 100 (``subsample_size``), the same number of steps.  The VAE is SVI with the
one-sample ELBO (= IWAE with K=1); IWAE uses DReG gradients.  Held-out log-likelihood per test
image is the importance-sampling estimate with the trained encoder as proposal and
``--eval-particles`` particles per image (Burda et al. use 5000), with its standard error.
Burda et al. (MNIST, 1 stochastic layer): VAE -86.76, IWAE k=5 -85.54, k=50 -84.78 nats.
"""

import argparse
import time
import warnings

import numpy as np
import pyro

from ppl_lvm import IWAE, SVI
from ppl_lvm.datasets import load_digits_binary
from ppl_lvm.models import VAE


def run(method, k, seed, data, steps, eval_particles, batch):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(data.train.shape[1], latent_dim=8, hidden=(64,), name=f"{method}{k}_{seed}")
    optim = pyro.optim.Adam({"lr": 3e-3})
    if method == "vae":
        backend = SVI(vae.model, vae.guide, optim)
    else:
        backend = IWAE(vae.model, vae.guide, optim, num_particles=k, gradient="dreg")
    t0 = time.perf_counter()
    fit = backend.run(data.train, num_steps=steps, subsample_size=batch)
    train_s = time.perf_counter() - t0
    n = data.test.shape[0]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        test = fit.log_evidence(eval_particles, data.test, subsample_size=None)
        # the same number of training images, to see over-fitting
        train = fit.log_evidence(eval_particles, data.train[:n], subsample_size=None)
    return test.log_evidence / n, test.stderr / n, test.khat, train_s, train.log_evidence / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-particles", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    data = load_digits_binary()
    print(f"binarized digits: {data.train.shape[0]} train / {data.test.shape[0]} test images, 64 pixels; "
          f"{args.steps} steps of batch {args.batch}; held-out LL with K={args.eval_particles}")
    methods = [("vae", 1), ("iwae", 5), ("iwae", 50)]
    rows = {m: [] for m in methods}
    for seed in args.seeds:
        for method, k in methods:
            ll, se, khat, secs, train_ll = run(method, k, seed, data, args.steps, args.eval_particles, args.batch)
            rows[(method, k)].append((ll, train_ll))
            print(f"seed {seed} {method.upper():>4} K={k:<3} held-out LL/image {ll:9.3f} ± {se:.3f} "
                  f"(max k-hat {khat:.2f}), training-set LL/image {train_ll:9.3f}, train {secs:.0f} s", flush=True)
    print()
    print(f"{'method':<12} {'held-out LL/image (mean over seeds)':>36} {'sd over seeds':>14} {'training LL/image':>18}")
    for (method, k), vals in rows.items():
        name = "VAE (K=1)" if method == "vae" else f"IWAE K={k}"
        lls = np.array(vals)
        sd = np.std(lls[:, 0], ddof=1) if len(lls) > 1 else float("nan")
        print(f"{name:<12} {lls[:, 0].mean():>36.3f} {sd:>14.3f} {lls[:, 1].mean():>18.3f}")


if __name__ == "__main__":
    main()
