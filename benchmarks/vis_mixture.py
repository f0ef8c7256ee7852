"""chi^2-VIS paper's mixture experiment: learn pi with VI, VBIS, IWAE and VIS at the same K.

Run by hand:  python benchmarks/vis_mixture.py [--particles 1000] [--steps 1500] [--seeds 0 1 2]

1000 training and 1000 test points from the 4-component mixture with pi = 0.7 (see
mixture_model.py).  For each method and seed: the learned pi, its error, and the exact held-out
log-likelihood (per point) at the learned pi.  The paper used K = 5000; K here is stated in the
output.  The maximum-likelihood pi of the training set and its standard error are printed for
reference: no method can beat the MLE on average.
"""

import argparse
import os
import sys
import time

import numpy as np
import pyro

sys.path.insert(0, os.path.dirname(__file__))
import mixture_model as mm  # noqa: E402
from ppl_lvm import IWAE, ChiSquareVIS  # noqa: E402


def fit_one(method, x, k, steps, seed, lr):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    optim = pyro.optim.Adam({"lr": lr})
    if method == "iwae":
        backend = IWAE(mm.model, mm.guide, optim, num_particles=k)
    else:
        backend = ChiSquareVIS(mm.model, mm.guide, optim, num_particles=k, preset=method)
    t0 = time.perf_counter()
    backend.run(x, num_steps=steps)
    return float(pyro.param("pi").detach()), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--particles", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=0.02)
    args = ap.parse_args()
    methods = ["vi", "vbis", "iwae", "vis"]
    results = {m: [] for m in methods}
    print(f"K = {args.particles} particles per data point, {args.steps} Adam steps (lr {args.lr}), true pi = 0.7")
    for seed in args.seeds:
        train = mm.simulate(1000, seed=100 + seed)
        test = mm.simulate(1000, seed=200 + seed)
        pi_mle, se = mm.mle_pi(train)
        best = mm.exact_loglik(test, pi_mle) / len(test)
        print(f"seed {seed}: training-set MLE pi = {pi_mle:.3f} ± {se:.3f}; held-out LL/point at the MLE {best:.4f}")
        for m in methods:
            pi, secs = fit_one(m, train, args.particles, args.steps, seed, args.lr)
            ll = mm.exact_loglik(test, pi) / len(test)
            results[m].append((pi, abs(pi - 0.7), ll, secs))
            print(f"  {m.upper():>5}: pi = {pi:.3f} (error {abs(pi - 0.7):.3f}), held-out LL/point {ll:.4f}, {secs:.0f} s",
                  flush=True)
    print()
    print(f"{'method':<6} {'pi (mean ± sd over seeds)':>26} {'|pi - 0.7|':>11} {'held-out LL/point':>18}")
    for m in methods:
        r = np.array(results[m])
        sd = r[:, 0].std(ddof=1) if len(r) > 1 else float("nan")
        print(f"{m.upper():<6} {r[:, 0].mean():>17.3f} ± {sd:.3f} {r[:, 1].mean():>11.3f} {r[:, 2].mean():>18.4f}")


if __name__ == "__main__":
    main()
