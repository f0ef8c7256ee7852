"""Time per training iteration: ppl_lvm's LatentSDE under Pyro's SVI vs a plain-torch loop that
follows the recipe of torchsde's latent-SDE example (examples/latent_sde_lorenz.py), in one run.

Same data (stochastic Lorenz, 3-d, normalized), same sizes (paths x observation times, latent 4,
context 64, hidden 128), same solver (Itô Euler) and dt, same networks (GRU over reversed
time, linear q(z0) head, MLP posterior/prior drifts, per-dimension diffusion MLPs, linear
decoder), Adam(1e-2), KL annealing, ``logqp=True``.  The plain loop is this project's own
code written from the example's recipe (its ELBO: Gaussian log-likelihood minus annealed
KL(q(z0)||p(z0)) and path KL).  The two ELBOs are the same function of the same parameters;
the table also prints the loss per path at the first and last timed iteration of each.

    python benchmarks/latent_sde_vs_torchsde.py                 # 256 paths x 101 times, 10 iterations
    python benchmarks/latent_sde_vs_torchsde.py --paths 64 --iters 3   # a quick look

Each implementation runs in its own subprocess (``--only ours|plain``), so each one's peak
memory is its own: the table prints the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after training and its RSS after building the
data and the module (before the first iteration); their difference is what training added.
``LatentSDE`` solves one observation interval at a time with ``ceil(gap / dt)`` equal steps; the
plain loop makes one ``sdeint`` call over all times (the example's way) with the same step
(stretched by 1e-9 relative so that the steps stay on the observation times), so both take
the same Euler steps.  ``LatentSDE`` itself makes one ``sdeint`` call on a regular float64
grid, but one call per interval in float32 (whose time arithmetic is too coarse for the step
alignment), which costs Python overhead; ``--dtype float64`` compares the one-call case.
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import pyro
import torch
import torchsde
from torch import nn

from ppl_lvm.models.latent_sde import LatentSDE


def lorenz_data(paths, times, t_end, seed=0):
    """Stochastic Lorenz (sigma, rho, beta = 10, 28, 8/3; diagonal noise 0.15 per unit of state
    scale), observed with N(0, 0.01^2) noise and normalized per dimension."""
    class Lorenz(nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            x1, x2, x3 = y.unbind(-1)
            return torch.stack([10 * (x2 - x1), x1 * (28 - x3) - x2, x1 * x2 - 8 / 3 * x3], -1)

        def g(self, t, y):
            return 0.15 * torch.ones_like(y) * 3.0

    g = torch.Generator().manual_seed(seed)
    y0 = torch.randn(paths, 3, generator=g) * 5
    ts = torch.linspace(0, t_end, times)
    import numpy as np
    np.random.seed(seed)
    with torch.no_grad():
        ys = torchsde.sdeint(Lorenz(), y0, ts, dt=1e-3, method="euler").transpose(0, 1)
    ys = (ys - ys.mean((0, 1))) / ys.std((0, 1))
    return ts, ys + 0.01 * torch.randn(ys.shape, generator=g)


class PlainLatentSDE(nn.Module):
    """The example's recipe in plain torch, with the LatentSDE module's networks (shared
    weights) so that both compute the same ELBO."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, m: LatentSDE, rows: bool = False):
        super().__init__()
        self.m, self.rows = m, rows

    def f(self, t, y):
        i = min(int(torch.searchsorted(self.ts, t.reshape(1), right=True)), len(self.ts) - 1)
        left = (self.ts[i] - t).clamp(min=0).expand(y.shape[0], 1) / self.unit  # as LatentSDE: a fraction of the largest gap
        return self.m.posterior_net(torch.cat([y, self.ctx[i], left], -1))

    def h(self, t, y):
        return self.m.prior_net(y)

    def g(self, t, y):
        return self.m.diffusion_net(y)

    def loss(self, ts, ys, beta, dt):
        m = self.m
        self.ts, self.unit = ts, float((ts[1:] - ts[:-1]).max())
        self.ctx = m._context(ts, ys, None)
        h = m.qz0_net(self.ctx[0])
        if self.rows:  # per-time rows (LatentSDE's way): no full-size zero gradient per step
            self.ctx = self.ctx.unbind(0)
        L = m.latent_dim
        qz0 = torch.distributions.Normal(h[:, :L], nn.functional.softplus(h[:, L:]) + torch.finfo(ys.dtype).tiny ** 0.25)
        pz0 = torch.distributions.Normal(m.pz0_loc, m.pz0_scale)
        z0 = qz0.rsample()
        zs, logr = torchsde.sdeint(self, z0, ts, dt=dt, method="euler", logqp=True)
        xs = m.decoder(zs).transpose(0, 1)
        loglik = torch.distributions.Normal(xs, 0.01).log_prob(ys).sum()
        kl0 = torch.distributions.kl_divergence(qz0, pz0).sum()
        return -(loglik - beta * (kl0 + logr.sum()))


def _rss_now_mib():
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def run_one(args, which):
    torch.set_num_threads(args.threads)
    _, ys = lorenz_data(args.paths, args.times, args.t_end)
    dtype = getattr(torch, args.dtype)
    # the observation times built in the compared dtype (a float32 linspace cast to float64 is
    # irregular at 1e-7 and is then solved one interval at a time)
    ts, ys = torch.linspace(0, args.t_end, args.times, dtype=dtype), ys.to(dtype)
    pyro.clear_param_store()
    torch.manual_seed(0)
    # Li et al.'s posterior family (the prior's diffusion, the network's drift), as the example's recipe
    m = LatentSDE(3, latent_dim=4, context_dim=64, hidden_dim=128, decoder="linear", obs_scale=0.01,
                  posterior_diffusion="shared", posterior_drift="full",
                  dt=args.dt, name="bench").to(dtype)
    gap = float(ts[1] - ts[0])
    n = max(1, math.ceil(gap / args.dt - 1e-9))
    step = gap / n  # the Euler step both implementations take
    anneal = 100  # KL annealing length in iterations (the example uses 1000 over its longer runs)
    rss0 = _rss_now_mib()
    times, losses = [], []
    if which == "ours":
        svi = pyro.infer.SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}),
                             pyro.infer.Trace_ELBO(max_plate_nesting=1))
        for it in range(args.iters + 1):
            m.kl_weight = min(1.0, it / anneal)
            t = time.perf_counter()
            losses.append(svi.step(ts, ys) / args.paths)
            times.append(time.perf_counter() - t)
    else:
        plain = PlainLatentSDE(m, rows=args.plain_rows)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for it in range(args.iters + 1):
            beta = min(1.0, it / anneal)
            t = time.perf_counter()
            opt.zero_grad()
            loss = plain.loss(ts, ys, beta, step * (1 + 1e-9))
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
            losses.append(float(loss) / args.paths)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(times=times[1:], first=losses[1], last=losses[-1], rss0=rss0, peak=peak, step=step)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", type=int, default=256)
    ap.add_argument("--times", type=int, default=101)
    ap.add_argument("--t-end", type=float, default=2.0)
    ap.add_argument("--dt", type=float, default=1e-2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--plain-rows", action="store_true",
                    help="the plain loop also reads the context as per-time rows (LatentSDE's indexing): the "
                         "ratio is then the Pyro wrapper's overhead alone")
    ap.add_argument("--only", choices=("ours", "plain"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        return run_one(args, args.only)
    names = {"ours": "ppl_lvm LatentSDE + pyro SVI", "plain": "plain torch (torchsde example recipe)"}
    rows = {}
    for which in ("ours", "plain"):
        cmd = [sys.executable, __file__, "--only", which] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                              vars(args).items()
                                                              if k not in ("only", "plain_rows") and v is not None]
        cmd += ["--plain-rows"] if args.plain_rows else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[which] = json.loads(out)
    print(f"{args.paths} paths x {args.times} times on [0, {args.t_end}], latent 4, context 64, hidden 128, "
          f"euler, step {rows['ours']['step']:.5g} (dt {args.dt}), {args.iters} timed iterations after 1 warm-up, "
          f"{args.threads} thread(s), {args.dtype}, each implementation in its own process")
    print("| implementation | s / iteration (mean) | min | loss/path at first -> last timed iteration "
          "| RSS before training (MiB) | peak RSS (MiB) | peak - before (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for which, r in rows.items():
        tt = r["times"]
        print(f"| {names[which]} | {sum(tt) / len(tt):.3f} | {min(tt):.3f} | {r['first']:.1f} -> {r['last']:.1f} "
              f"| {r['rss0']:.0f} | {r['peak']:.0f} | {r['peak'] - r['rss0']:.0f} |")
    a = sum(rows["ours"]["times"]) / args.iters
    b = sum(rows["plain"]["times"]) / args.iters
    print(f"ratio ours / plain = {a / b:.3f} (means), {min(rows['ours']['times']) / min(rows['plain']['times']):.3f} "
          f"(minima); peak memory ratio {rows['ours']['peak'] / rows['plain']['peak']:.3f}")


if __name__ == "__main__":
    main()
