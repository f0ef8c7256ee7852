"""Does a step grid refined toward each observation cut the latent SDE's diffusion bias at equal
cost?  Exact maximizers over (theta, mu, sigma, p(z0)) of the discretized ELBO with the best
posterior of the latent-SDE family (``ou_grid_elbo_optimum``, dynamic programming on any Euler
grid) against the exact MLE of the continuous OU model, on the data of the slow OU test
(64 paths x 26 times on [0, 5], theta 1, mu 0.5, sigma 0.5, noise 0.1 known, seed 0).

Grids: n = ceil(gap / dt) steps per observation interval, either equal (``ratio`` 1, today's
grid) or geometric with consecutive steps shrinking by ``ratio`` toward the observation
(``interval_steps``).  Cost = total Euler steps per path.

    python benchmarks/latent_sde_grid_bias.py                  # 17 s, 1 thread
    python benchmarks/latent_sde_grid_bias.py --more           # 49 s: ratios 0.6-0.95, n 16 and 32
    python benchmarks/latent_sde_grid_bias.py --best-shape     # 33 s: the best shape, graded grids

``--best-shape``: for n = 2, 4, 8 steps per interval, the step fractions (the same for every
interval) that maximize the ELBO optimum at the true parameters (Nelder-Mead over n - 1
log-weights; a local optimum), then the ELBO maximizer on that grid: the shape, common to all
intervals, that makes the objective tightest at the truth; and grids graded as h ~ c + (time left
to the observation), for c 0.01, 0.04, 0.1.
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


MORE = [(0.1, 0.85), (0.05, 0.85), (0.025, 0.85), (0.025, 0.6), (0.0125, 1.0), (0.0125, 0.9), (0.0125, 0.8),
        (0.0125, 0.7), (0.00625, 1.0), (0.00625, 0.95), (0.00625, 0.9), (0.00625, 0.8)]


def best_shape():
    r = 0.1
    ts, ys, _ = simulate_ou(64, 26, theta=1.0, mu=0.5, sigma=0.5, obs_scale=r, t_end=5.0, seed=0)
    t, y = ts.numpy(), ys[..., 0].numpy()
    gaps = np.diff(t)
    stat = lambda x: (math.exp(x[0]), x[1], math.exp(x[2]), r, x[1], math.exp(x[2]) / math.sqrt(2 * math.exp(x[0])))
    mle = argmax(lambda x: kalman_ll(t, y, *stat(x)), False)

    def grid(w):
        w = np.exp(np.concatenate([[0.0], w]))
        w /= w.sum()
        return [g * w for g in gaps]

    print("| steps per interval | best step fractions | ELBO optimum at the truth | ELBO maximizer | sigma bias |")
    print("| --- | --- | --- | --- | --- |")
    for n in (2, 4, 8):
        res = minimize(lambda w: -ou_grid_elbo_optimum(ts, ys, 1.0, 0.5, 0.5, r, 0.5, 0.5 / math.sqrt(2), grid(w)).sum(),
                       np.zeros(n - 1), method="Nelder-Mead", options=dict(maxiter=4000, xatol=1e-5, fatol=1e-5))
        steps = grid(res.x)
        el = argmax(lambda x: ou_grid_elbo_optimum(ts, ys, math.exp(x[0]), x[1], math.exp(x[2]), r, x[3],
                                                   math.exp(x[4]), steps), True)
        print(f"| {n} | {', '.join('%.3f' % v for v in steps[0] / gaps[0])} | {-res.fun:.1f} | "
              f"{el[0]:.3f}, {el[1]:.3f}, {el[2]:.3f} | {100 * (el[2] / mle[2] - 1):+.1f}% |", flush=True)
    # graded: h ~ c + (time left), knots uniform in log(c + time left)
    print("| steps per interval | graded grid, c | last / first step | ELBO maximizer | sigma bias |")
    print("| --- | --- | --- | --- | --- |")
    for n in (2, 8, 16):
        for c in (0.01, 0.04, 0.1):
            steps = []
            for g in gaps:
                j = np.arange(n + 1)
                left = (c + g) ** (1 - j / n) * c ** (j / n) - c
                left[-1] = 0.0
                steps.append(-np.diff(left))
            el = argmax(lambda x: ou_grid_elbo_optimum(ts, ys, math.exp(x[0]), x[1], math.exp(x[2]), r, x[3],
                                                       math.exp(x[4]), steps), True)
            print(f"| {n} | {c} | {steps[0][-1] / steps[0][0]:.3f} | {el[0]:.3f}, {el[1]:.3f}, {el[2]:.3f} | "
                  f"{100 * (el[2] / mle[2] - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    if "--best-shape" in sys.argv:
        best_shape()
    else:
        main(MORE if "--more" in sys.argv else None)
