"""Where the latent SDE's diffusion bias on OU data comes from: exact maximizers of the
discretized ELBO (best posterior of the latent-SDE family, by dynamic programming:
``ou_euler_elbo_optimum``) against the exact MLE of the continuous model and of its Euler chain,
for several solver steps dt, on the data of the slow OU test (64 paths x 26 times on [0, 5],
theta 1, mu 0.5, sigma 0.5, observation noise 0.1 known) and with noise 0.3.

    python benchmarks/latent_sde_ou_bias.py            # about 1 minute, 1 thread

All fits maximize over (theta, mu, sigma, p(z0) mean and scale) with Nelder-Mead; the MLE rows
use the stationary start N(mu, sigma^2 / 2 theta) as the tests' ``_kalman_mle`` does.  x is
sigma^2 dt / noise^2 at the true sigma.
"""

import math

import numpy as np
from scipy.optimize import minimize

from ppl_lvm.models.latent_sde import ou_euler_elbo_optimum, simulate_ou


def kalman_ll(t, y, theta, mu, sigma, r, m0, s0, dt=None):
    """log p(y) per sequence: continuous OU (dt None) or its Euler chain (ceil(gap/dt) steps)."""
    m, P, ll = np.full(y.shape[0], m0), np.full(y.shape[0], s0 ** 2), 0.0
    for i in range(y.shape[1]):
        if i > 0:
            gap = t[i] - t[i - 1]
            if dt is None:
                a = math.exp(-theta * gap)
                m, P = mu + a * (m - mu), a * a * P + sigma ** 2 * (1 - a * a) / (2 * theta)
            else:
                n = max(1, math.ceil(gap / dt - 1e-9))
                h = gap / n
                for _ in range(n):
                    m, P = m + theta * (mu - m) * h, (1 - theta * h) ** 2 * P + sigma ** 2 * h
        S = P + r * r
        e = y[:, i] - m
        ll = ll - 0.5 * (np.log(2 * np.pi * S) + e * e / S)
        K = P / S
        m, P = m + K * e, (1 - K) * P
    return ll


def argmax(fun, free_start):
    x0 = [0.0, 0.5, math.log(0.5)] + ([0.5, math.log(0.35)] if free_start else [])
    x = minimize(lambda x: -fun(x).sum(), x0, method="Nelder-Mead",
                 options=dict(xatol=1e-6, fatol=1e-6, maxiter=8000)).x
    return math.exp(x[0]), x[1], math.exp(x[2])


def main():
    print("| noise | dt | x | continuous MLE (theta, mu, sigma) | Euler-chain MLE | ELBO maximizer (best posterior) "
          "| sigma bias |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in (0.1, 0.3):
        ts, ys, _ = simulate_ou(64, 26, theta=1.0, mu=0.5, sigma=0.5, obs_scale=r, t_end=5.0, seed=0)
        t, y = ts.numpy(), ys[..., 0].numpy()
        stat = lambda x: (math.exp(x[0]), x[1], math.exp(x[2]), r, x[1], math.exp(x[2]) / math.sqrt(2 * math.exp(x[0])))
        mle = argmax(lambda x: kalman_ll(t, y, *stat(x)), False)
        for dt in (0.1, 0.05, 0.02, 0.01, 0.005, 0.002):
            em = argmax(lambda x: kalman_ll(t, y, *stat(x), dt=dt), False)
            el = argmax(lambda x: ou_euler_elbo_optimum(ts, ys, math.exp(x[0]), x[1], math.exp(x[2]), r, x[3],
                                                        math.exp(x[4]), dt), True)
            fmt = lambda v: "%.3f, %.3f, %.3f" % v
            print(f"| {r} | {dt} | {0.25 * dt / r ** 2:.3g} | {fmt(mle)} | {fmt(em)} | {fmt(el)} | "
                  f"{100 * (el[2] / mle[2] - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
