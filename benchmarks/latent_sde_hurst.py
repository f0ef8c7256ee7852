"""Is the Hurst index identifiable, and where does the learned one go wrong?  On synthetic
fractional OU paths (``simulate_fractional_ou``: 32 paths x 31 times on [0, 6], theta 1,
sigma 0.5, observation noise 0.05, RL-fBM by Cholesky) this computes the *exact* log-likelihood
of the Markov-fBM latent model (state (z, Y_1..Y_K), linear-Gaussian: Kalman filter with exact
transitions by Van Loan's matrix exponential, or with the Euler chain that ``LatentSDE`` uses),
maximized over H (theta, sigma at the truth) and jointly over (H, theta, sigma); and prints the
instantaneous diffusion multiplier sum(omega), on which the ELBO's discretization loss depends
(docs/latent_sde.md, "Findings").

    python benchmarks/latent_sde_hurst.py                 # the likelihood table, ~5 s
    python benchmarks/latent_sde_hurst.py --fit 0.3 400 --posterior-diffusion shared   # plus an SVI fit of H (~3 min)
    python benchmarks/latent_sde_hurst.py --no-table --fit 0.3 600 --one-lr             # the default family, ~6.5 min
    python benchmarks/latent_sde_hurst.py --no-table --fit 0.3 600 --one-lr --paths 128 # the slow test's data
    python benchmarks/latent_sde_hurst.py --no-table --fit 0.3 600 --one-lr --features gap   # without the steps-left input

Prior of the Markov model (module docstring of ppl_lvm.models.latent_sde): dY_k = -g_k Y_k dt + dW,
dz = [-theta z - sigma sum_k omega_k g_k Y_k] dt + sigma (sum_k omega_k) dW, z(0) = 0, Y(0) = 0.
"""

import argparse
import math
import time

import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar

from ppl_lvm.models.latent_sde import (LatentSDE, fbm_gammas, fbm_weights, fractional_ou_log_likelihood,
                                       simulate_fractional_ou)


def log_likelihood(ts, y, hurst, theta, sigma, r, num_ou=5, gamma_max=5.0, horizon=6.0, dt=None, s0=1e-3):
    """Exact log p(y) of the Markov-fBM OU model (dt None: exact transitions; else the Euler chain
    with ceil(gap / dt) steps per interval); y (B, T).  The library's reference function."""
    return fractional_ou_log_likelihood(ts, y, hurst, theta, sigma, r, num_ou=num_ou, gamma_max=gamma_max,
                                        horizon=horizon, dt=dt, init_scale=s0)


def data(hurst, paths=32):
    ts, ys, _ = simulate_fractional_ou(hurst, num_sequences=paths, num_time_steps=31, theta=1.0, sigma=0.5,
                                       obs_scale=0.05, t_end=6.0, seed=0)
    return ts, ys


def se_hurst(ll, x, eps=1e-3):
    """Standard error of the MLE's H from the observed information (central differences of the
    exact log-likelihood in (H, theta, sigma) at the MLE x)."""
    f = lambda v: -ll(*v)
    hess = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            a, b = np.eye(3)[i] * eps, np.eye(3)[j] * eps
            hess[i, j] = (f(x + a + b) - f(x + a - b) - f(x - a + b) + f(x - a - b)) / (4 * eps * eps)
    var = np.linalg.inv(hess)[0, 0]
    return float(np.sqrt(var)) if var > 0 else float("nan")  # nan: the optimizer stopped short of a maximum


def table():
    print("| true H | gamma_max | transitions | argmax H (theta, sigma true) | joint MLE (H +- SE, theta, sigma) "
          "| log-lik at H 0.5 minus max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for h_true in (0.3, 0.7):
        ts, ys = data(h_true)
        t, y = ts.numpy(), ys[..., 0].numpy()
        for gmax, dt in ((5.0, None), (5.0, 0.09), (20.0, None), (20.0, 0.02)):
            ll = lambda H, th=1.0, sg=0.5: log_likelihood(t, y, H, th, sg, 0.05, gamma_max=gmax, dt=dt)
            best = minimize_scalar(lambda H: -ll(H), bounds=(0.05, 0.95), method="bounded").x
            grid_max = max(ll(H) for H in np.arange(0.1, 0.95, 0.05))
            x = minimize(lambda x: -ll(1 / (1 + math.exp(-x[0])), math.exp(x[1]), math.exp(x[2])),
                         [0.0, 0.0, math.log(0.5)], method="Nelder-Mead", options=dict(xatol=1e-4, fatol=1e-4)).x
            name = "exact" if dt is None else f"Euler dt {dt}"
            mle = np.array([1 / (1 + math.exp(-x[0])), math.exp(x[1]), math.exp(x[2])])
            print(f"| {h_true} | {gmax:g} | {name} | {best:.3f} | {mle[0]:.3f} +- {se_hurst(ll, mle):.3f}, "
                  f"{mle[1]:.3f}, {mle[2]:.3f} | {ll(0.5) - grid_max:.1f} |", flush=True)
    g = fbm_gammas(5, 20.0)
    print("sum(omega) (gamma_max 20, T 6): " + ", ".join(
        f"H {H}: {float(fbm_weights(H, g, 6.0).sum()):.3f}" for H in (0.3, 0.4, 0.5, 0.6, 0.7)))


def fit(h_true, steps, posterior_diffusion="auto", split_lr=True, features=None, hidden=32, context=16, decay=False,
        paths=32):
    import pyro
    import ppl_lvm.models.latent_sde as ls

    if features:
        ls._TIME_FEATURES = tuple(features.split(","))

    ts, ys = data(h_true, paths)
    pyro.clear_param_store()
    torch.manual_seed(0)
    m = LatentSDE(1, latent_dim=1, context_dim=context, hidden_dim=hidden, noise="fractional", drift="ou",
                  diffusion="constant", decoder="identity", obs_scale=0.05, dt=0.02, gamma_max=20.0, hurst=0.5,
                  horizon=6.0, posterior_diffusion=posterior_diffusion).to(torch.float64)
    slow = ("theta", "mu", "sigma", "pz0")  # the prior's parameters at a tenth of the rate (as the tests)
    if decay:  # the rate falls geometrically to a tenth over the run (clip_norm: no clipping)
        optim = pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.1 ** (1 / steps), "clip_norm": 1e8})
    else:
        optim = pyro.optim.Adam(lambda name: {"lr": 0.03 * (0.1 if split_lr and any(k in name for k in slow) else 1.0)})
    svi = pyro.infer.SVI(m.model, m.guide, optim, pyro.infer.Trace_ELBO(max_plate_nesting=1))
    t0 = time.perf_counter()
    for i in range(steps):
        loss = svi.step(ts, ys)
        if i % 50 == 0 or i == steps - 1:
            with torch.no_grad():
                print(f"step {i}: -ELBO {loss:.1f}, H {float(m.hurst):.3f}, theta {float(m.theta):.3f}, "
                      f"sigma {float(m.sigma):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", nargs=2, metavar=("H", "STEPS"), default=None)
    ap.add_argument("--posterior-diffusion", choices=("auto", "shared", "learned"), default="auto",
                    help="auto: the library's default (learned); shared: session 8's fits")
    ap.add_argument("--one-lr", action="store_true", help="one learning rate for all parameters")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--features", default=None)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--paths", type=int, default=32, help="sequences of the fitted data")
    ap.add_argument("--decay", action="store_true", help="one rate, decaying to a tenth over the run")
    ap.add_argument("--context", type=int, default=16)
    args = ap.parse_args()
    if not args.no_table:
        table()
    if args.fit:
        fit(float(args.fit[0]), int(args.fit[1]), args.posterior_diffusion, not args.one_lr, args.features, args.hidden, args.context,
            args.decay, args.paths)
