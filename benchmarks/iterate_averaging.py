"""Last iterate vs. the average of the last iterates (Polyak-Ruppert) at the end of an SVI run.

Issue 16 item 11: the README's setting (Adam lr 0.02, 3000 steps) on a one-parameter normal
model (``ppl_lvm.testing.NormalNormalGlobal(num_data=20, prior_loc=0, prior_scale=10)``: x_i ~
N(z, 1), z ~ N(0, 10^2)); its guide N(loc, scale) contains the exact posterior, so the distance
of loc from the exact posterior mean (in posterior sds) and the ratio of scale to the exact sd
measure where the run ended.  Prints one row per setting over 6 seeds.

    python benchmarks/iterate_averaging.py              # 3000 steps
    python benchmarks/iterate_averaging.py --steps 10000
"""

import argparse

import pyro
import torch

from ppl_lvm import SVI
from ppl_lvm.testing import NormalNormalGlobal


def main(seeds=6, num_steps=3000):
    torch.set_num_threads(1)
    fx = NormalNormalGlobal(num_data=20, prior_loc=0.0, prior_scale=10.0)
    post_mean, post_sd = float(fx.exact_posterior_mean()["z"]), float(fx.exact_posterior_sd()["z"])
    print(f"{'average_last':>12}  {'|loc - mean| / sd (min-max, mean)':>36}  {'scale / sd (min-max)':>22}")
    for avg in (0.0, 0.2):
        offs, ratios = [], []
        for seed in range(seeds):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            SVI(fx.model, fx.guide, optim=pyro.optim.Adam({"lr": 0.02})).run(*fx.args, num_steps=num_steps,
                                                                             progress=False, average_last=avg)
            offs.append(abs(float(pyro.param("normal_global.loc").detach()) - post_mean) / post_sd)
            ratios.append(float(pyro.param("normal_global.scale").detach()) / post_sd)
        print(f"{avg:>12}  {min(offs):>12.3f} - {max(offs):.3f} ({sum(offs) / seeds:.3f})        "
              f"{min(ratios):>8.3f} - {max(ratios):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    main(num_steps=parser.parse_args().steps)
