"""Sparse IBP factorization of the Reuters document-term counts against sklearn's KL-NMF.

Data: ``lda.datasets.load_reuters()`` (395 documents x 4258 words, 84,010 tokens).  Each
document's tokens are split 80/20 at random (binomial thinning of every count with p = 0.2, seed
0); every method fits the 80% part and is scored on the 20% part by the held-out Poisson
log-likelihood per token, the predictive rate being the fitted rate times 0.2/0.8 (the IBP
models: the log posterior predictive over the kept Gibbs draws; NMF: the plug-in rate).  Rates
get the floor eps(float64) (a held-out token on a zero rate scores about -36).

Columns: held-out log-likelihood per token, number of active features (IBP: posterior mean
over kept draws; NMF: components with a non-zero loading row), the fraction of kept draws in
which every one of the K columns is used (the truncation binds where this is near 1), mean
active features per document (the sparsity of Z; IBP: posterior mean of sum_k z_nk averaged
over documents; NMF: exactly non-zero entries of W per row), fraction of exactly-zero loadings
among the active features (IBP: mean over draws; NMF: of H), fit time.  NMF is run at
the restricted 3-IBP's number of active features (rounded posterior mean).  Top words of the
restricted 3-IBP's most used features are printed.

The IBP models: the restricted three-parameter IBP with f = Poisson(``--num-active-rate``)
features per document (default 2 = alpha, the unrestricted per-row law), the one-parameter IBP,
and, with ``--small-law-rate R``, the restricted 3-IBP with the smaller law f = Poisson(R).

Run by hand::

    PPL_LVM_PROGRESS=0 python benchmarks/ibp_reuters.py --num-steps 120 --truncation 80 --small-law-rate 1
"""

import argparse
import time

import numpy as np
import torch

from ppl_lvm.models.ibp import SparseIBPFactorization


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-steps", type=int, default=150, help="Gibbs sweeps per IBP model (half warmup)")
    ap.add_argument("--truncation", type=int, default=30, help="num_features_max K")
    ap.add_argument("--alpha", type=float, default=2.0, help="IBP mass of every IBP model")
    ap.add_argument("--num-active-rate", type=float, default=2.0,
                    help="restricted 3-IBP: f = Poisson(rate) features per document")
    ap.add_argument("--small-law-rate", type=float, default=None,
                    help="also fit the restricted 3-IBP with f = Poisson(this rate)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import pyro.distributions as dist
    t_start = time.perf_counter()

    import lda.datasets

    X = np.asarray(lda.datasets.load_reuters(), dtype=np.int64)
    vocab = lda.datasets.load_reuters_vocab()
    rng = np.random.default_rng(args.seed)
    test = rng.binomial(X, 0.2)
    train = X - test
    scale = 0.2 / 0.8
    xtr = torch.as_tensor(train, dtype=torch.float64)
    xte = torch.as_tensor(test, dtype=torch.float64)
    print(f"Reuters: {X.shape[0]} x {X.shape[1]}, {X.sum()} tokens; train {train.sum()}, held-out {test.sum()}")

    rows = []
    fits = {}
    configs = [(f"restricted-3IBP (alpha {args.alpha:g}, c 1, sigma 0.25, f = Poisson({args.num_active_rate:g}))",
                dict(prior="restricted-3ibp", alpha=args.alpha, concentration=1.0, discount=0.25,
                     num_active=dist.Poisson(torch.tensor(args.num_active_rate)))),
               (f"one-parameter IBP (alpha {args.alpha:g})", dict(prior="ibp", alpha=args.alpha))]
    if args.small_law_rate is not None:
        configs.append((f"restricted-3IBP (alpha {args.alpha:g}, c 1, sigma 0.25, f = Poisson({args.small_law_rate:g}))",
                        dict(prior="restricted-3ibp", alpha=args.alpha, concentration=1.0, discount=0.25,
                             num_active=dist.Poisson(torch.tensor(args.small_law_rate)))))
    for label, kw in configs:
        m = SparseIBPFactorization(args.truncation, loading_density=0.2, **kw)
        t0 = time.perf_counter()
        fit = m.fit_gibbs(xtr, num_steps=args.num_steps, seed=args.seed)
        el = time.perf_counter() - t0
        fits[label] = fit
        per_doc = float(torch.stack([z.sum(1).mean() for z in fit.z]).mean())
        binds = float((fit.num_active >= args.truncation).mean())
        rows.append((label, fit.heldout_log_likelihood(xte, scale=scale), float(fit.num_active.mean()), binds,
                     per_doc, fit.zero_loading_fraction(), el))
        print(f"  {label}: {el:.0f} s, active features over the kept draws {fit.num_active.min()}-"
              f"{fit.num_active.max()}, log-lik first/last sweep {fit.log_likelihood_trace[0]:.0f} / "
              f"{fit.log_likelihood_trace[-1]:.0f}, stick acceptance {fit.stick_acceptance.mean():.2f}", flush=True)

    from sklearn.decomposition import NMF

    k_nmf = max(1, int(round(rows[0][2])))
    t0 = time.perf_counter()
    nmf = NMF(n_components=k_nmf, beta_loss="kullback-leibler", solver="mu", init="nndsvda", max_iter=500,
              random_state=args.seed)
    W = nmf.fit_transform(train.astype(np.float64))
    H = nmf.components_
    el = time.perf_counter() - t0
    rate = scale * W @ H + np.finfo(np.float64).eps
    from scipy.special import gammaln
    ll = float((test * np.log(rate) - rate - gammaln(test + 1)).sum() / test.sum())
    active = np.flatnonzero(H.sum(1) > 0)
    rows.append((f"sklearn NMF (KL, mu), {k_nmf} comps", ll, float(len(active)), float("nan"),
                 float((W > 0).sum(1).mean()), float((H[active] == 0).mean()), el))

    print()
    print("| method | held-out log-lik / token | active features | draws with all K used | features / doc "
          "| zero loadings | fit time (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, ll, act, binds, per_doc, zf, el in rows:
        b = "-" if binds != binds else f"{binds:.2f}"
        print(f"| {label} | {ll:.3f} | {act:.1f} | {b} | {per_doc:.2f} | {zf:.3f} | {el:.1f} |")
    print(f"\n(K = {args.truncation}, {args.num_steps} Gibbs sweeps, half warmup; NMF max_iter=500, "
          f"{nmf.n_iter_} iterations; whole script {time.perf_counter() - t_start:.0f} s)")

    fit = fits[configs[0][0]]
    print("\nrestricted-3IBP: top words of the 8 most used features")
    use = fit.feature_usage().sum(0)
    for k, items in fit.top_items(vocab, num_items=8)[:8]:
        print(f"  feature {k:2d} ({use[k]:.0f} docs): " + ", ".join(w for w, _ in items))
    post = fit.feature_count_posterior()
    print("\nrestricted-3IBP posterior of the number of active features:",
          {k: round(v, 2) for k, v in post.items()})
    print("stick acceptance (mean):", round(float(fit.stick_acceptance.mean()), 2),
          "| log-lik first/last sweep:", round(fit.log_likelihood_trace[0]), round(fit.log_likelihood_trace[-1]))


if __name__ == "__main__":
    main()
