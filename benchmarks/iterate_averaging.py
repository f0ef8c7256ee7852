"""Last iterate vs. the average of the last iterates (Polyak-Ruppert) at the end of an SVI run.

Issue 16 item 11: the README's setting (Adam lr 0.02, 3000 steps) on a one-parameter normal
model, y_i ~ N(mu, 1), mu ~ N(0, 10^2), 20 points; the guide N(loc, scale) contains the exact
posterior, so the distance of loc from the exact posterior mean (in posterior sds) and the ratio
of scale to the exact sd measure where the run ended.  Prints one row per setting over 6 seeds.

    python benchmarks/iterate_averaging.py
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ppl_lvm import SVI


def main(seeds=6, num_steps=3000):
    torch.set_num_threads(1)
    y = torch.randn(20, generator=torch.Generator().manual_seed(0)) + 1.0

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("d", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def guide(y):
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
        pyro.sample("mu", dist.Normal(loc, scale))

    prec = 1 / 100 + y.shape[0]
    post_sd, post_mean = prec ** -0.5, float(y.sum()) / prec
    print(f"{'average_last':>12}  {'|loc - mean| / sd (min-max, mean)':>36}  {'scale / sd (min-max)':>22}")
    for avg in (0.0, 0.2):
        offs, ratios = [], []
        for seed in range(seeds):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            SVI(model, guide, optim=pyro.optim.Adam({"lr": 0.02})).run(y, num_steps=num_steps, progress=False,
                                                                       average_last=avg)
            offs.append(abs(float(pyro.param("loc").detach()) - post_mean) / post_sd)
            ratios.append(float(pyro.param("scale").detach()) / post_sd)
        print(f"{avg:>12}  {min(offs):>12.3f} - {max(offs):.3f} ({sum(offs) / seeds:.3f})        "
              f"{min(ratios):>8.3f} - {max(ratios):.3f}")


if __name__ == "__main__":
    main()
