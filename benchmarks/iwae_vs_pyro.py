"""IWAE step time against Pyro's RenyiELBO(alpha=0) on the same VAE, and DReG vs pathwise variance.

Run by hand:  python benchmarks/iwae_vs_pyro.py [--steps 200] [--batch 100]

Both sides train the same VAE (64-8-64 MLPs on binarized scikit-learn digits) with the same
optimizer, data and K.  Pyro's RenyiELBO(alpha=0, vectorize_particles=True) is the anchor; note
that it computes the bound over the joint of the minibatch (one log-mean-exp for all data
points), while ppl_lvm's IWAE takes one log-mean-exp per data point (the IWAE bound proper), so
the objectives differ; the step times are comparable.  Prints a table with the ratio.
"""

import argparse
import statistics
import time

import pyro
import torch

from ppl_lvm import IWAE
from ppl_lvm.datasets import load_digits_binary
from ppl_lvm.models import VAE


def _time_steps(step, num_steps, warmup=10):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(num_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.quantiles(times, n=10)[0], statistics.quantiles(times, n=10)[-1]


def time_ours(x, k, num_steps, gradient):
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(64, latent_dim=8, hidden=(64,), name="bench")
    backend = IWAE(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), num_particles=k, gradient=gradient)
    return _time_steps(lambda: backend.step(x), num_steps)


def time_pyro(x, k, num_steps):
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(64, latent_dim=8, hidden=(64,), name="bench")
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}),
                         pyro.infer.RenyiELBO(alpha=0.0, num_particles=k, vectorize_particles=True,
                                              max_plate_nesting=1))
    return _time_steps(lambda: svi.step(x), num_steps)


def gradient_variance(x, k, reps, gradient, train_steps=500):
    """Variance (summed over encoder parameters) of the encoder gradient over `reps` draws."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    vae = VAE(64, latent_dim=8, hidden=(64,), name="var")
    IWAE(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), num_particles=k).run(x, num_steps=train_steps)
    backend = IWAE(vae.model, vae.guide, num_particles=k, gradient=gradient)
    backend.setup(x)
    params = list(vae.encoder.parameters())
    draws = []
    for _ in range(reps):
        for p in params:
            p.grad = None
        backend._loss_and_grads((x,), {})
        draws.append(torch.cat([p.grad.reshape(-1) for p in params]))
    g = torch.stack(draws)
    return float(g.var(0).sum()), float(g.mean(0).norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    x = load_digits_binary().train[: args.batch]
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}, "
          f"VAE 64-64-8, batch {args.batch}, median of {args.steps} steps")
    print(f"{'K':>4} {'ppl_lvm IWAE (dreg) ms':>24} {'ppl_lvm IWAE (pathwise) ms':>28} {'Pyro RenyiELBO ms':>19} "
          f"{'ratio dreg/pyro':>16} {'ratio pathwise/pyro':>20}")
    for k in (1, 5, 50):
        ours_d = time_ours(x, k, args.steps, "dreg")[0] * 1e3
        ours_p = time_ours(x, k, args.steps, "pathwise")[0] * 1e3
        theirs = time_pyro(x, k, args.steps)[0] * 1e3
        print(f"{k:>4} {ours_d:>24.2f} {ours_p:>28.2f} {theirs:>19.2f} {ours_d / theirs:>16.2f} {ours_p / theirs:>20.2f}")
    print()
    print(f"encoder-gradient variance at K=50 after 500 IWAE steps ({args.reps} draws; sum over parameters)")
    print(f"{'estimator':>10} {'variance':>12} {'|mean|':>10} {'SNR |mean|/sqrt(var)':>22}")
    for gradient in ("pathwise", "dreg"):
        var, mean = gradient_variance(x, 50, args.reps, gradient)
        print(f"{gradient:>10} {var:>12.4g} {mean:>10.4g} {mean / var ** 0.5:>22.3f}")


if __name__ == "__main__":
    main()
