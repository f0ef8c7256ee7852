"""Sparse IBP factorization of the Reuters document-term counts against sklearn's KL-NMF.

Data: ``lda.datasets.load_reuters()`` (395 documents x 4258 words, 84,010 tokens).  Each
document's tokens are split 80/20 at random (binomial thinning of every count with p = 0.2, seed
0); every method fits the 80% part and is scored on the 20% part by the held-out Poisson
log-likelihood per token, the predictive rate being the fitted rate times 0.2/0.8 (the IBP
models: the log posterior predictive over the kept Gibbs draws; NMF: the plug-in rate).  Rates
get the floor eps(float64) (a held-out token on a zero rate scores about -36).

Columns: held-out log-likelihood per token, number of active features (IBP: posterior mean
over kept draws; NMF: components with a non-zero loading row), fraction of exactly-zero
loadings among the active features (IBP: mean over draws; NMF: of H), fit time.  NMF is run at
the restricted 3-IBP's number of active features (rounded posterior mean).  Top words of the
restricted 3-IBP's most used features are printed.

Run by hand::

    python benchmarks/ibp_reuters.py --num-steps 150 --truncation 30
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
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

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
    for label, kw in [("restricted-3IBP", dict(prior="restricted-3ibp", alpha=2.0, concentration=1.0, discount=0.25)),
                      ("one-parameter IBP", dict(prior="ibp", alpha=2.0))]:
        m = SparseIBPFactorization(args.truncation, loading_density=0.2, **kw)
        t0 = time.perf_counter()
        fit = m.fit_gibbs(xtr, num_steps=args.num_steps, seed=args.seed)
        el = time.perf_counter() - t0
        fits[label] = fit
        rows.append((label, fit.heldout_log_likelihood(xte, scale=scale), float(fit.num_active.mean()),
                     fit.zero_loading_fraction(), el))

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
    rows.append((f"sklearn NMF (KL, mu), {k_nmf} comps", ll, float(len(active)), float((H[active] == 0).mean()), el))

    print()
    print("| method | held-out log-lik / token | active features | zero loadings | fit time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for label, ll, act, zf, el in rows:
        print(f"| {label} | {ll:.3f} | {act:.1f} | {zf:.3f} | {el:.1f} |")
    print(f"\n(K = {args.truncation}, {args.num_steps} Gibbs sweeps, half warmup; NMF max_iter=500, "
          f"{nmf.n_iter_} iterations)")

    fit = fits["restricted-3IBP"]
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
