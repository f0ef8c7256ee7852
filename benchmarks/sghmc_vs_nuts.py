"""SG-HMC (minibatches) against Pyro's NUTS (full data) on a Bayesian neural network regression.

Run by hand:  python benchmarks/sghmc_vs_nuts.py [--n 5000] [--nuts-samples 200] [--threads 2]

Model (the same Pyro program for both samplers): one hidden layer of 50 tanh units,
standard-normal priors on all weights and biases, Gaussian noise with a HalfNormal(1) prior
on its scale; 1-d inputs x ~ U(-3, 3), y = sin(2x) + 0.3 x + 0.2 * eps.

The weights are not identifiable (hidden units can be permuted and their signs flipped), so
their ESS means nothing; the comparison uses the posterior predictive mean f(x*) at 20 held-out
inputs: ArviZ's bulk ESS of each f(x*_j) over all kept draws, divided by the wall time of the
whole run (warmup included), and the held-out log predictive density
log (1/S) sum_s N(y* | f_s(x*), sigma_s) averaged over 1000 held-out points.  Prints a table
with the ratio SG-HMC / NUTS.
"""

import argparse
import math
import time

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch

from ppl_lvm import SGHMC


def simulate(n, n_test, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 6 * torch.rand(n + n_test, 1, generator=g) - 3
    y = torch.sin(2 * x[:, 0]) + 0.3 * x[:, 0] + 0.2 * torch.randn(n + n_test, generator=g)
    return x[:n], y[:n], x[n:], y[n:]


def forward(x, w1, b1, w2, b2):
    """Works for one draw (w1: (D, H)) and for a batch of chains (w1: (..., D, H))."""
    h = torch.tanh(x @ w1 + b1.unsqueeze(-2))
    return (h @ w2).squeeze(-1) + b2


def bnn(x, y, subsample_size=None, hidden=50):
    d = x.shape[-1]
    zero = x.new_zeros(())
    w1 = pyro.sample("w1", dist.Normal(zero, 1.0).expand([d, hidden]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(zero, 1.0).expand([hidden]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(zero, 1.0).expand([hidden, 1]).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(zero, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(x.new_ones(())))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as ind:
        mean = forward(x[ind], w1, b1, w2, b2.unsqueeze(-1))
        pyro.sample("y", dist.Normal(mean, sigma.unsqueeze(-1)), obs=y[ind])


def predictive_stats(samples, x_test, y_test, num_ess_inputs=20):
    """samples: {site: (chain, draw, ...)} -> (min and median ESS of f(x*), held-out lpd)."""
    w1, b1, w2, b2, sigma = (samples[k] for k in ("w1", "b1", "w2", "b2", "sigma"))
    c, s = sigma.shape[:2]
    flat = lambda t: t.reshape((c * s,) + tuple(t.shape[2:]))  # noqa: E731
    f = forward(x_test, flat(w1), flat(b1), flat(w2), flat(b2).unsqueeze(-1))  # (c*s, n_test)
    lp = dist.Normal(f, flat(sigma).unsqueeze(-1)).log_prob(y_test)
    lpd = float((torch.logsumexp(lp, 0) - math.log(c * s)).mean())
    f_ess = f[:, :num_ess_inputs].reshape(c, s, num_ess_inputs).numpy()
    ess = az.ess(az.convert_to_dataset({"f": f_ess}))["f"].values
    return float(ess.min()), float(np.median(ess)), lpd


def run_nuts(x, y, num_samples, warmup, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    kernel = pyro.infer.NUTS(bnn, max_tree_depth=10)
    mcmc = pyro.infer.MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=1,
                           disable_progbar=True)
    t0 = time.perf_counter()
    mcmc.run(x, y)
    elapsed = time.perf_counter() - t0
    samples = {k: v.unsqueeze(0) for k, v in mcmc.get_samples().items()}
    return samples, elapsed


def run_sghmc(x, y, batch, num_chains, num_samples, warmup, thin, step_size, friction, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    sampler = SGHMC(bnn, step_size=step_size, friction=friction, num_chains=num_chains,
                    num_samples=num_samples, warmup=warmup, thin=thin, preconditioner="rmsprop",
                    init="prior")
    t0 = time.perf_counter()
    sampler.run(x, y, subsample_size=batch, progress=False)
    elapsed = time.perf_counter() - t0
    return sampler.samples(), elapsed, sampler


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--nuts-samples", type=int, default=200)
    p.add_argument("--nuts-warmup", type=int, default=200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=4000)
    p.add_argument("--thin", type=int, default=10)
    p.add_argument("--step-size", type=float, default=2e-4)
    p.add_argument("--friction", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-nuts", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    x, y, xt, yt = simulate(a.n, a.n_test, a.seed)

    rows = []
    samples, t, sampler = run_sghmc(x, y, a.batch, a.chains, a.samples, a.warmup, a.thin,
                                    a.step_size, a.friction, a.seed)
    ess_min, ess_med, lpd = predictive_stats(samples, xt, yt)
    rhat = az.rhat(az.convert_to_dataset({"sigma": samples["sigma"].numpy()}))["sigma"].values
    rows.append(("SG-HMC (B=%d, %d chains)" % (a.batch, a.chains), t, a.chains * a.samples, ess_min, ess_med, lpd))
    how = "shared minibatch" if sampler.shared_minibatch else "one minibatch per chain"
    print(f"SG-HMC: {sampler.num_steps} steps, {how}, sigma mean "
          f"{float(samples['sigma'].mean()):.4f}, R-hat(sigma) {float(rhat):.3f}", flush=True)
    if not a.skip_nuts:
        samples, t = run_nuts(x, y, a.nuts_samples, a.nuts_warmup, a.seed)
        ess_min, ess_med, lpd = predictive_stats(samples, xt, yt)
        rows.append(("Pyro NUTS (full data, 1 chain)", t, a.nuts_samples, ess_min, ess_med, lpd))
        print(f"NUTS: sigma mean {float(samples['sigma'].mean()):.4f}", flush=True)

    print(f"\nBNN 1-{50}-1, N = {a.n}, held-out lpd on {a.n_test} points, ESS of f(x*) at 20 inputs, "
          f"{torch.get_num_threads()} threads")
    print(f"{'sampler':34s} {'time s':>8s} {'draws':>6s} {'ESS min':>8s} {'ESS med':>8s} "
          f"{'ESS/s min':>9s} {'ESS/s med':>9s} {'lpd':>8s}")
    for name, t, n, emin, emed, lpd in rows:
        print(f"{name:34s} {t:8.1f} {n:6d} {emin:8.1f} {emed:8.1f} {emin / t:9.3f} {emed / t:9.3f} {lpd:8.4f}")
    if len(rows) == 2:
        (_, t1, _, e1, m1, l1), (_, t2, _, e2, m2, l2) = rows
        print(f"\nratio SG-HMC / NUTS: ESS/s (min) {(e1 / t1) / (e2 / t2):.1f}x, ESS/s (median) "
              f"{(m1 / t1) / (m2 / t2):.1f}x; lpd difference {l1 - l2:+.4f} nats/point "
              f"({100 * (l1 - l2) / abs(l2):+.1f}%)")


if __name__ == "__main__":
    main()
