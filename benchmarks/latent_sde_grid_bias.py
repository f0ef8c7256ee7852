"""Does a step grid refined toward each observation cut the latent SDE's diffusion bias at equal
cost?  Exact maximizers over (theta, mu, sigma, p(z0)) of the discretized ELBO with the best
posterior of the latent-SDE family (``ou_grid_elbo_optimum``, dynamic programming on any Euler
grid) against the exact MLE of the continuous OU model, on the data of the slow OU test
(64 paths x 26 times on [0, 5], theta 1, mu 0.5, sigma 0.5, noise 0.1 known, seed 0).

Grids: n = ceil(gap / dt) steps per observation interval, either equal (``ratio`` 1, today's
grid) or geometric with consecutive steps shrinking by ``ratio`` toward the observation
(``interval_steps``).  Cost = total Euler steps per path.

    python benchmarks/latent_sde_grid_bias.py            # about 2 minutes, 1 thread
"""

import math
import sys

import numpy as np
from scipy.optimize import minimize

from ppl_lvm.models.latent_sde import interval_steps, ou_grid_elbo_optimum, simulate_ou

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from latent_sde_ou_bias import argmax, kalman_ll  # noqa: E402


def main(rows=None):
    r = 0.1
    ts, ys, _ = simulate_ou(64, 26, theta=1.0, mu=0.5, sigma=0.5, obs_scale=r, t_end=5.0, seed=0)
    t, y = ts.numpy(), ys[..., 0].numpy()
    stat = lambda x: (math.exp(x[0]), x[1], math.exp(x[2]), r, x[1], math.exp(x[2]) / math.sqrt(2 * math.exp(x[0])))
    mle = argmax(lambda x: kalman_ll(t, y, *stat(x)), False)
    print(f"continuous MLE (theta, mu, sigma): {mle[0]:.3f}, {mle[1]:.3f}, {mle[2]:.3f}")
    print("| dt | steps per interval | ratio | total steps | ELBO optimum at the truth | ELBO maximizer (theta, mu, sigma) "
          "| sigma bias |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = rows or [(0.1, 1.0), (0.1, 0.7), (0.1, 0.5), (0.1, 0.3), (0.05, 1.0), (0.05, 0.7), (0.05, 0.5),
                    (0.05, 0.3), (0.025, 1.0), (0.025, 0.7), (0.025, 0.5)]
    for dt, ratio in rows:
        steps = [interval_steps(float(t[i + 1] - t[i]), dt, ratio) for i in range(len(t) - 1)]
        at_truth = ou_grid_elbo_optimum(ts, ys, 1.0, 0.5, 0.5, r, 0.5, 0.5 / math.sqrt(2), steps).sum()
        el = argmax(lambda x: ou_grid_elbo_optimum(ts, ys, math.exp(x[0]), x[1], math.exp(x[2]), r, x[3],
                                                   math.exp(x[4]), steps), True)
        print(f"| {dt} | {len(steps[0])} | {ratio} | {sum(len(s) for s in steps)} | {at_truth:.1f} | "
              f"{el[0]:.3f}, {el[1]:.3f}, {el[2]:.3f} | {100 * (el[2] / mle[2] - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
