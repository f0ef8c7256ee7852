"""Builds tutorials/10_ibp_factorization.ipynb with nbformat (run by hand, then execute the
notebook to check it: ``python -m pytest -q tests/test_tutorials.py -k 10_ibp``)."""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(r"""# Sparse IBP factorization of count data

A count matrix $X$ (documents x words, images x pixels, cells x genes) is explained as

$$x_{nd} \sim \mathrm{Poisson}\Big(\sum_k z_{nk}\, w_{nk}\, \phi_{kd}\Big),$$

with a binary feature matrix $Z$ from an Indian buffet prior (three-parameter, or restricted to a
chosen law of the number of features per row), Gamma weights $w$, and spike-and-slab loadings
$\phi$ with exact zeros. The number of features is not fixed in advance: the truncation
`num_features_max` is an upper bound. `fit_gibbs` (the multinomial augmentation) is the route
for real matrices. See `docs/ibp.md` for the model and the Reuters benchmark."""),
    new_code_cell("""import os
import numpy as np
import torch
import matplotlib.pyplot as plt
from sklearn.datasets import load_digits
from ppl_lvm.models import SparseIBPFactorization, IndianBuffet
from ppl_lvm.models.ibp import expected_num_features

smoke_test = bool(os.environ.get("CI"))
num_rows, num_steps = (300, 40) if smoke_test else (1797, 300)
torch.manual_seed(0)"""),
    new_markdown_cell("""## The prior: how many features does it expect?

$E[K_N]$ of the three-parameter IBP in closed form, against draws of the truncated
stick-breaking prior (`IndianBuffet`); a discount $\\sigma > 0$ makes the number of features
grow like $N^\\sigma$."""),
    new_code_cell("""for a, c, s in [(2, 1, 0), (2, 1.5, 0.3)]:
    ib = IndianBuffet(a, 50, 150, concentration=c, discount=s)
    kn = (ib.sample((100 if smoke_test else 400,)).sum(-2) > 0).sum(-1).double()
    print(f"alpha={a}, c={c}, sigma={s}: E[K_50] = {expected_num_features(50, a, c, s):.3f}, "
          f"draws {kn.mean():.2f} +- {kn.std() / len(kn) ** 0.5:.2f} (truncation bias <= {ib.truncation_bias():.3f})")"""),
    new_markdown_cell("""## Digits as counts

`load_digits` gives 8x8 images with pixel intensities 0..16: a 1797 x 64 count matrix. Each
feature found is a sparse stroke pattern; each image uses a few of them."""),
    new_code_cell("""X = torch.as_tensor(load_digits().data[:num_rows], dtype=torch.float64)
model = SparseIBPFactorization(12, prior="restricted-3ibp", alpha=3.0, discount=0.25, loading_density=0.3)
fit = model.fit_gibbs(X, num_steps=num_steps, seed=0)
print(f"{fit.elapsed:.1f} s; posterior of the number of active features:", fit.feature_count_posterior())
print("fraction of exactly-zero loadings:", round(fit.zero_loading_fraction(), 3))"""),
    new_code_cell("""phi = fit.loadings_mean()
order = fit.active_features()
fig, axes = plt.subplots(1, len(order), figsize=(1.3 * len(order), 1.6))
for ax, k in zip(np.atleast_1d(axes), order.tolist()):
    ax.imshow(phi[k].reshape(8, 8).numpy(), cmap="Greys")
    ax.set_axis_off()
    ax.set_title(f"{k}", fontsize=8)
fig.suptitle("posterior mean loadings, features ordered by usage", fontsize=9)
plt.show()"""),
    new_code_cell("""fig, axes = plt.subplots(1, 3, figsize=(13, 3))
fit.plot_features(ax=axes[0], max_rows=100)
fit.plot_loadings(int(order[0]), labels=[f"px{d}" for d in range(64)], num_items=12, ax=axes[1])
fit.plot_feature_count(ax=axes[2])
plt.tight_layout(); plt.show()"""),
    new_markdown_cell("""## Reconstruction and held-out likelihood

The posterior mean rate reconstructs the images; splitting each image's counts 80/20 gives a
held-out Poisson log-likelihood per count unit (the predictive rate is the fitted rate x 0.25)."""),
    new_code_cell("""g = np.random.default_rng(0)
test = torch.as_tensor(g.binomial(X.numpy().astype(np.int64), 0.2), dtype=torch.float64)
train = X - test
fit2 = SparseIBPFactorization(12, prior="restricted-3ibp", alpha=3.0, discount=0.25,
                              loading_density=0.3).fit_gibbs(train, num_steps=num_steps, seed=1)
print("held-out log-likelihood per unit:", round(fit2.heldout_log_likelihood(test, scale=0.25), 3))
rec = fit.reconstruction()
fig, axes = plt.subplots(2, 6, figsize=(7, 2.6))
for i in range(6):
    axes[0, i].imshow(X[i].reshape(8, 8).numpy(), cmap="Greys"); axes[0, i].set_axis_off()
    axes[1, i].imshow(rec[i].reshape(8, 8).numpy(), cmap="Greys"); axes[1, i].set_axis_off()
axes[0, 0].set_title("data", fontsize=8, loc="left"); axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
plt.show()"""),
]

nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
path = pathlib.Path(__file__).resolve().parents[1] / "tutorials" / "10_ibp_factorization.ipynb"
nbformat.write(nb, str(path))
print("wrote", path)
