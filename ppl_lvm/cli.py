"""The ``ppl-lvm`` command: ``demo``, ``backends``, ``fit`` (Bayesian regression on a CSV)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def _fit_regression(X, y, feature_names, *, num_steps, lr, seed, plot, title, num_samples=2000, guide="mvn",
                    device=None):
    import numpy as np
    import pyro
    import arviz as az

    from . import SVI
    from .models import BayesianLinearRegression

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if device is not None:  # the rule everywhere: move the data and the modules, the rest follows
        X, y = X.to(device), y.to(device)
    reg = BayesianLinearRegression(X.shape[1]).to(dtype=X.dtype, device=X.device)
    if guide == "mvn":  # full-rank Gaussian: keeps the correlations between collinear features
        from pyro.infer.autoguide import AutoMultivariateNormal, init_to_median

        q = AutoMultivariateNormal(reg.model, init_loc_fn=init_to_median, init_scale=0.05)
    else:  # the model's own hand-built mean-field guide
        q = reg.guide
    backend = SVI(reg.model, q, optim=pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / num_steps)}),
                  num_particles=4, vectorize_particles=True)
    t0 = time.perf_counter()
    fit = backend.run(X, y, num_steps=num_steps)
    elapsed = time.perf_counter() - t0
    ev = fit.log_evidence(num_particles=2000)
    idata = fit.to_inferencedata(num_samples=num_samples)
    coords_names = {"w_dim_0": list(feature_names)} if "w_dim_0" in idata.posterior.dims else {}
    if coords_names:
        idata = idata.assign_coords(coords_names, groups="posterior")
    summary = az.summary(idata, var_names=["w", "b", "sigma"], kind="all", round_to=3)
    loo = az.loo(idata)
    print(f"{title}: Bayesian linear regression, N={X.shape[0]}, D={X.shape[1]} (device {X.device})")
    print(f"SVI ({'full-rank' if guide == 'mvn' else 'mean-field'} guide): {num_steps} steps in "
          f"{elapsed:.1f} s, final loss {fit.losses[-1]:.2f}")
    print(summary.to_string())
    print(f"log-evidence (importance sampling, {ev.num_particles} particles): "
          f"{ev.log_evidence:.3f} ± {ev.stderr:.3f}, PSIS k-hat {ev.khat:.2f}")
    print(f"PSIS-LOO elpd: {float(loo.elpd_loo):.2f} ± {float(loo.se):.2f}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        fit.plot_losses(ax=axes[0], smooth=50)
        w = idata.posterior["w"].values.reshape(-1, X.shape[1])
        lo, mid, hi = np.percentile(w, [5, 50, 95], axis=0)
        order = np.argsort(mid)
        axes[1].errorbar(mid[order], np.arange(len(mid)), xerr=[mid[order] - lo[order], hi[order] - mid[order]],
                         fmt="o", capsize=3)
        axes[1].set_yticks(np.arange(len(mid)), [feature_names[i] for i in order])
        axes[1].axvline(0.0, color="gray", lw=0.8)
        axes[1].set_xlabel("coefficient (standardized), 90% interval")
        axes[1].set_title(title)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        plt.close(fig)
        print(f"wrote {plot}")
    return fit


def cmd_demo(args) -> int:
    from .datasets import load_diabetes

    data = load_diabetes(device=args.device)
    _fit_regression(data.X, data.y, data.feature_names, num_steps=args.num_steps, lr=args.lr, seed=args.seed,
                    plot=args.plot, title="scikit-learn diabetes data", guide=args.guide, device=args.device)
    return 0


def cmd_backends(args) -> int:
    from . import list_backends

    rows = list_backends()
    width = max(len(k) for k in rows)
    print(f"{'backend':<{width}}  valid for")
    for name, desc in rows.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def _non_numeric_columns(path, names):
    """``[(column, non-numeric entries, entries, an example)]`` of a CSV's text cells that are
    neither empty nor numbers (numpy would read them as NaN, i.e. missing)."""
    import csv

    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        rows = [r for r in reader if r]
    out = []
    for j, n in enumerate(header):
        if n not in names and n.replace(" ", "_") not in names:
            continue
        wrong = []
        for r in rows:
            c = r[j].strip() if j < len(r) else ""
            if c in ("", "nan", "NaN", "NA"):
                continue
            try:
                float(c)
            except ValueError:
                wrong.append(c)
        if wrong:
            out.append((n, len(wrong), len(rows), wrong[0]))
    return out


def cmd_fit(args) -> int:
    import numpy as np
    import torch

    try:
        table = np.genfromtxt(args.csv, delimiter=",", names=True, dtype=float)
    except OSError as exc:
        print(f"error: cannot read {args.csv}: {exc}", file=sys.stderr)
        return 2
    names = list(table.dtype.names or ())
    bad = _non_numeric_columns(args.csv, names)
    if bad:
        what = "; ".join(f"{n!r} ({k} of {total} entries, e.g. {ex!r})" for n, k, total, ex in bad)
        print(f"error: non-numeric column(s) in {args.csv}: {what}. Encode them as numbers (e.g. 0/1 "
              "dummies) or drop them; empty cells count as missing values.", file=sys.stderr)
        return 2
    if args.target not in names:
        print(f"error: column {args.target!r} not in {args.csv}; columns are {names}", file=sys.stderr)
        return 2
    features = [n for n in names if n != args.target]
    if not features:
        print("error: the CSV needs at least one feature column besides the target", file=sys.stderr)
        return 2
    X = np.stack([table[n] for n in features], axis=-1)
    y = np.asarray(table[args.target])
    rows = np.isfinite(X).all(1) & np.isfinite(y)
    if not rows.all():
        print(f"dropping {int((~rows).sum())} row(s) with missing values")
    X, y = X[rows], y[rows]
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    y = (y - y.mean()) / (y.std() if y.std() > 0 else 1.0)
    _fit_regression(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32), features,
                    num_steps=args.num_steps, lr=args.lr, seed=args.seed, plot=args.plot, title=args.csv,
                    guide=args.guide, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppl-lvm", description="Latent-variable models and inference backends for Pyro.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="fit a Bayesian regression to scikit-learn's diabetes data and print diagnostics")
    d.add_argument("--num-steps", type=int, default=3000)
    d.add_argument("--lr", type=float, default=0.03)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--plot", default="ppl_lvm_demo.png", help="PNG path for the plot ('' for none)")
    d.add_argument("--guide", choices=["mvn", "meanfield"], default="mvn",
                   help="full-rank Gaussian guide (default) or the model's mean-field guide")
    d.add_argument("--device", default=None, help="torch device for data and model, e.g. cuda (default: cpu)")
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("backends", help="list the inference backends and what each needs of a model")
    b.set_defaults(func=cmd_backends)
    f = sub.add_parser("fit", help="Bayesian linear regression on a CSV file with a header row")
    f.add_argument("csv")
    f.add_argument("--target", required=True, help="name of the response column")
    f.add_argument("--num-steps", type=int, default=3000)
    f.add_argument("--lr", type=float, default=0.03)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--plot", default="", help="PNG path for the plot")
    f.add_argument("--guide", choices=["mvn", "meanfield"], default="mvn")
    f.add_argument("--device", default=None, help="torch device for data and model, e.g. cuda (default: cpu)")
    f.set_defaults(func=cmd_fit)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "num_steps", 1) < 1:
        print("error: --num-steps must be at least 1", file=sys.stderr)
        return 2
    if getattr(args, "device", None) is not None:
        from .validation import check_device

        try:
            check_device(args.device, "--device")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
