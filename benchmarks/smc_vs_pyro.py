"""Particle filter: ppl_lvm's ParticleFilter against Pyro's SMCFilter on the same model.

Run by hand:  python benchmarks/smc_vs_pyro.py [--repeats 5] [--threads 1]

Model: the linear-Gaussian state-space fixture (T = 100), written to Pyro's SMCFilter
contract (``LinearGaussianSSM.smc_model()`` and ``smc_guide()``, a prior proposal), the same
objects for both filters, ESS-triggered resampling at 0.5 K.  For each particle count the
table gives the median wall time of a full pass (init + 99 steps) over ``--repeats`` runs,
the ratio ours / Pyro, and our log-evidence error against the Kalman filter (mean and sd over
the runs; Pyro's filter keeps no log-evidence).  "no record" switches off the per-step
diagnostics; "guide=None" is our bootstrap filter, the same proposal (the transition) run
without a separate guide program (Pyro's filter always needs a guide).
"""

import argparse
import statistics
import time

import pyro
import torch

from ppl_lvm.inference.particle_filter import ParticleFilter
from ppl_lvm.testing import LinearGaussianSSM


def run_pyro(fx, k):
    smc = pyro.infer.SMCFilter(fx.smc_model(), fx.smc_guide(), num_particles=k, max_plate_nesting=0,
                               ess_threshold=0.5)
    t0 = time.perf_counter()
    smc.init(initial=fx.x[0])
    for y in fx.x[1:]:
        smc.step(y)
    mean = smc.get_empirical()["z"].mean
    float(mean)
    return time.perf_counter() - t0


def run_ours(fx, k, record, bootstrap=False):
    guide = None if bootstrap else fx.smc_guide()
    pf = ParticleFilter(fx.smc_model(), guide, num_particles=k, ess_threshold=0.5, record=record)
    t0 = time.perf_counter()
    log_z = pf.filter(fx.x[1:], init_kwargs={"initial": fx.x[0]})
    log_z = float(log_z)
    return time.perf_counter() - t0, log_z


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--particles", type=int, nargs="+", default=[1000, 10000])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pyro.set_rng_seed(0)
    fx = LinearGaussianSSM(num_time_steps=100, seed=0)
    exact = fx.kalman_filter()["log_evidence"]
    print(f"LGSSM T=100, Kalman log-evidence {exact:.4f}, {torch.get_num_threads()} thread(s), "
          f"{a.repeats} repeats\n")
    print(f"{'K':>6s} {'Pyro s':>8s} {'ours s':>8s} {'ratio':>6s} {'no record':>10s} {'ratio':>6s} "
          f"{'guide=None':>11s} {'ratio':>6s} {'logZ err mean':>14s} {'logZ sd':>8s}")
    for k in a.particles:
        run_pyro(fx, k), run_ours(fx, k, True)  # warm up
        tp = statistics.median(run_pyro(fx, k) for _ in range(a.repeats))
        ours = [run_ours(fx, k, True) for _ in range(a.repeats)]
        to = statistics.median(t for t, _ in ours)
        tn = statistics.median(run_ours(fx, k, False)[0] for _ in range(a.repeats))
        tb = statistics.median(run_ours(fx, k, False, bootstrap=True)[0] for _ in range(a.repeats))
        errs = [lz - exact for _, lz in ours]
        sd = statistics.stdev(errs) if len(errs) > 1 else float("nan")
        print(f"{k:6d} {tp:8.3f} {to:8.3f} {to / tp:6.2f} {tn:10.3f} {tn / tp:6.2f} {tb:11.3f} {tb / tp:6.2f} "
              f"{statistics.mean(errs):14.4f} {sd:8.4f}")


if __name__ == "__main__":
    main()
