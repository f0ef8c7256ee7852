"""GPFA (ppl_lvm) against Elephant's GPFA on identical simulated spike trains; prints a table.

Run by hand: ``python benchmarks/gpfa_vs_elephant.py`` (needs ``pip install elephant``; without
it, only our rows are printed).  Both run single-threaded.

Data: 3 latent GP trajectories (RBF, timescales 100/200/300 ms) drive 50 neurons,
rate = exp(C x + d) (about 20 Hz), Poisson spike trains in continuous time (spikes placed
uniformly within 20 ms bins).  Elephant receives ``neo.SpikeTrain``s and bins them itself; we
bin the same spike times with the same edges and check that the counts are identical.  Both fit
Gaussian GPFA to the square-rooted counts (Elephant's default transform), with the same number
of EM iterations.  Held-out log-likelihood: exact marginal log-likelihood of held-out trials
(square-rooted counts) under each fit, per trial.  Latent R^2: true latents regressed on each
method's orthonormalized posterior means (per true dim, min over dims shown).

Rows: Elephant (exact EM, RBF, training cut into 20-bin segments); ours dense RBF (cut into the
same 20-bin segments); ours linear-time form (Matern-3/2, Kalman E-step, whole trials).  Transform
(posterior of the whole training trials) is timed for each.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from ppl_lvm.models import GPFA  # noqa: E402
from ppl_lvm.models.gpfa import latent_r2  # noqa: E402

BIN_MS = 20.0


def simulate(num_trials, num_bins, num_neurons=50, seed=0):
    """Spike times (list of trials of lists of arrays, ms), counts (trials, bins, neurons),
    true latents (trials, bins, 3)."""
    times = torch.arange(num_bins, dtype=torch.float64) * BIN_MS
    _, _, truth = GPFA.simulate(num_trials=num_trials, num_bins=num_bins, num_latents=3, obs_dim=num_neurons,
                                kernel="rbf", tau=[100.0, 200.0, 300.0], likelihood="poisson", times=times,
                                base_rate=20.0 * BIN_MS / 1000.0, seed=seed)
    rng = np.random.default_rng(seed)
    counts = rng.poisson(truth["rate"].numpy())  # (trials, bins, neurons)
    spikes = []
    for n in range(num_trials):
        trial = []
        for j in range(num_neurons):
            c = counts[n, :, j]
            b = np.repeat(np.arange(num_bins), c)
            t = (b + rng.uniform(0.02, 0.98, size=b.size)) * BIN_MS
            trial.append(np.sort(t))
        spikes.append(trial)
    return spikes, counts, truth["x"]


def bin_ours(spikes, num_bins):
    edges = np.arange(num_bins + 1) * BIN_MS
    return np.stack([np.stack([np.histogram(t, edges)[0] for t in trial], -1) for trial in spikes])


def to_neo(spikes, num_bins):
    import neo
    import quantities as pq

    return [[neo.SpikeTrain(t * pq.ms, t_start=0 * pq.ms, t_stop=num_bins * BIN_MS * pq.ms) for t in trial]
            for trial in spikes]


def run_elephant(train_st, test_st, iters, num_bins, x_true):
    import quantities as pq
    from elephant.conversion import BinnedSpikeTrain
    from elephant.gpfa import GPFA as EGPFA

    ecounts = np.stack([BinnedSpikeTrain(trial, bin_size=BIN_MS * pq.ms).to_array().T for trial in train_st])
    model = EGPFA(bin_size=BIN_MS * pq.ms, x_dim=3, em_max_iters=iters, tau_init=100.0 * pq.ms)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(train_st)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lat = model.transform(train_st, returned_data=["latent_variable_orth"])
    tr_s = time.perf_counter() - t0
    lat = np.stack([np.asarray(v).T for v in lat])  # (trials, bins, 3)
    ll = model.score(test_st) / len(test_st)
    r2 = latent_r2(x_true, torch.as_tensor(lat)).numpy()
    return dict(fit=fit_s, transform=tr_s, r2=r2, ll=float(ll)), ecounts


def run_ours(y, y_test, times, iters, x_true, kernel, method, segment_length):
    model = GPFA(3, y.shape[-1], kernel=kernel, method=method, tau_init=100.0, name=f"bench_{method}")
    t0 = time.perf_counter()
    model.fit_em(y, times, max_iter=iters, tol=0.0, segment_length=segment_length)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.transform(y, times)
    tr_s = time.perf_counter() - t0
    ll = float(model.log_likelihood(y_test, times).mean())
    r2 = latent_r2(x_true, out["mean_orth"]).numpy()
    return dict(fit=fit_s, transform=tr_s, r2=r2, ll=ll)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer trials (smoke run)")
    args = ap.parse_args()
    configs = [(200, 50, 100), (20, 1000, 50)]  # trials, bins, EM iterations (as in REFERENCES.md)
    if args.quick:
        configs = [(40, 50, 20), (4, 300, 10)]
    try:
        import elephant  # noqa: F401
        have_elephant = True
    except ImportError:
        have_elephant = False
        print("elephant is not installed (pip install elephant scikit-learn): printing our rows only.")
    rows = []
    # warm-up: the first L-BFGS/linalg call in a process imports parts of torch (~1 s, once);
    # Elephant's imports are likewise outside its timings
    wy, wt, _ = GPFA.simulate(num_trials=2, num_bins=10, num_latents=3, obs_dim=5)
    for kernel, method in (("rbf", "dense"), ("matern32", "kalman")):
        GPFA(3, 5, kernel=kernel, method=method, name=f"warm_{method}").fit_em(wy, wt, max_iter=2)
    for trials, bins, iters in configs:
        spikes, counts, x_true = simulate(trials + trials // 4, bins, seed=bins)
        train, test = spikes[:trials], spikes[trials:]
        ours = bin_ours(spikes, bins)
        if not np.array_equal(ours, counts):
            raise RuntimeError("our binning of the spike times differs from the simulated counts")
        times = torch.arange(bins, dtype=torch.float64) * BIN_MS
        y = torch.as_tensor(np.sqrt(ours[:trials]), dtype=torch.float64)
        y_test = torch.as_tensor(np.sqrt(ours[trials:]), dtype=torch.float64)
        x_train = x_true[:trials]
        size = f"50 x {trials} x {bins}"
        if have_elephant:
            res, ecounts = run_elephant(to_neo(train, bins), to_neo(test, bins), iters, bins, x_train)
            same = np.array_equal(ecounts, ours[:trials])
            rows.append((size, "Elephant (RBF, 20-bin segments)", iters, res, same))
            base = res
        else:
            base = None
        seg = 20  # Elephant's default segment length, used for its training at both sizes
        rows.append((size, "ours dense RBF (20-bin segments)", iters,
                     run_ours(y, y_test, times, iters, x_train, "rbf", "dense", seg), None))
        rows.append((size, "ours linear-time Matern-3/2 (Kalman)", iters,
                     run_ours(y, y_test, times, iters, x_train, "matern32", "kalman", None), None))
        for r in rows[-2:]:
            r[3]["fit_ratio"] = r[3]["fit"] / base["fit"] if base else float("nan")
            r[3]["tr_ratio"] = r[3]["transform"] / base["transform"] if base else float("nan")
    print()
    print("| data (neurons x trials x bins) | method | EM iters | fit s | transform s | fit / Elephant | "
          "transform / Elephant | latent R^2 (per true dim) | held-out LL / trial | same counts |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, name, iters, r, same in rows:
        r2 = "/".join(f"{v:.3f}" for v in r["r2"])
        ratio = f"{r.get('fit_ratio', 1.0):.2f}" if "fit_ratio" in r else "1"
        tratio = f"{r.get('tr_ratio', 1.0):.3f}" if "tr_ratio" in r else "1"
        print(f"| {size} | {name} | {iters} | {r['fit']:.2f} | {r['transform']:.3f} | {ratio} | {tratio} | {r2} | "
              f"{r['ll']:.2f} | {'' if same is None else ('yes' if same else 'NO')} |")


if __name__ == "__main__":
    main()
