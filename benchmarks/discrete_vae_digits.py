"""GFlowNet-EM's discrete-VAE experiment, scaled to a CPU: binarized digits, a grid of categorical codes.

Run by hand:  python benchmarks/discrete_vae_digits.py [--steps 3000] [--seeds 0 1 2]
              [--grids 2x2:8 4x4:4] [--steps-4x4 1000] [--eval-particles 1000]

Hu et al. (ICML 2023, section 5.2) fit a VAE whose latent is a 4x4 grid of codes from a
codebook of K entries, on binarized MNIST, with GFlowNet-EM and with a VQ-VAE.  Here the data are
sklearn's 8x8 digits (1438 train / 359 test images, 64 binary pixels,
``ppl_lvm.datasets.load_digits_binary``) and the model is ``ppl_lvm.models.DiscreteVAE``: a
uniform prior over the code grid, a learned codebook (embeddings of size 16) and an MLP decoder
(one hidden layer of 256).  Three methods train that same decoder architecture for the same
number of steps on minibatches of the same size:

* **GFlowNet-EM** (``ppl_lvm.inference.GFlowNetEM``, no guide): the policy builds each image's
  code grid one code at a time (E-step: trajectory balance, epsilon-uniform exploration); the
  decoder ascends log p(x, z) at the policy's draws (M-step, every step, after a warm-up of
  E-steps only).
* **Gumbel-softmax** (``DiscreteVAE.relaxed_loss``): the relaxed ELBO with a factorized
  categorical encoder, temperature annealed geometrically from 1.0 to 0.5; torch Adam on encoder
  and decoder.
* **VQ-VAE** (``DiscreteVAE.vq_loss``): deterministic nearest-codebook encoder, straight-through
  gradients, codebook + 0.25 x commitment loss; torch Adam on its encoder and the decoder.

Test NLL per image (nats, lower is better), all under the same likelihood
p(x) = sum_z p(z) p(x | z) with the uniform prior:

* exact, by enumerating all C^L code grids (only for the 2x2 grid: 8^4 = 4096 grids);
* importance sampling with K particles per image and each method's own proposal: GFlowNet-EM's
  policy (``fit.log_evidence(K, data.test, subsample_size=None)``; the policy was trained on
  training images only), the Gumbel encoder's categorical ``softmax(encoder_logits(x))``, and for
  the VQ-VAE the categorical ``softmax(-||h_l(x) - e_c||^2)`` over codes (negative squared
  distances of its encoder outputs to the codebook as logits; the VQ-VAE never trains such a
  proposal, so this is the natural one it has, not a good one).  ``k-hat max`` is the largest
  PSIS k-hat over the test images (above 0.7: the IS estimate of that image is unreliable).

Reported: mean ± sd over seeds.  The default configuration (2x2:8 with 3000 steps, 4x4:4 with
1000 steps, 3 seeds, K=1000) took 558 s on one thread of a shared 2-core CPU.  GFlowNet-EM:
4 trajectories per image, epsilon 0.05, an M-step at every step, Adam learning rates 3e-3 (policy),
1e-3 (decoder; also the baselines' learning rate) and 0.05 (the scalar offset of log Z).
"""

import argparse
import math
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from ppl_lvm.datasets import load_digits_binary
from ppl_lvm.diagnostics import psis_khats
from ppl_lvm.inference import GFlowNetEM
from ppl_lvm.models import DiscreteVAE

BATCH = 100


def parse_grid(text):
    """'2x2:8' -> ((2, 2), 8)."""
    g, c = text.split(":")
    return tuple(int(v) for v in g.split("x")), int(c)


def categorical_is(dv, x, logits, num_samples, chunk=250):
    """Importance sampling with a factorized categorical proposal: (log p-hat(x_i) (N,), k-hat (N,)).
    The same estimator as ``DiscreteVAE.importance_log_likelihood``, keeping the weights for k-hat."""
    q = dist.Categorical(logits=logits)
    parts = []
    with torch.no_grad():
        for s in range(0, num_samples, chunk):
            z = q.sample((min(chunk, num_samples - s),))  # (k, N, L)
            parts.append(dv.log_joint(x, z) - q.log_prob(z).sum(-1))
    lw = torch.cat(parts)
    return lw.logsumexp(0) - math.log(num_samples), psis_khats(lw)


def max_khat(khats):
    """The largest finite k-hat (nan when none is finite, e.g. a proposal so peaked that all
    draws coincide, whose weights have no tail to fit)."""
    khats = np.asarray(khats, dtype=float)
    return float(np.max(khats[np.isfinite(khats)])) if np.isfinite(khats).any() else float("nan")


def exact_nll(dv, x):
    if dv.codebook ** dv.num_codes > 2 ** 16:
        return float("nan")
    return -float(dv.exact_log_likelihood(x).mean())


def train_gfn(dv, data, steps, args):
    optim = pyro.optim.Adam(lambda m, n: {"lr": args.gfn_logz_lr if n.endswith("log_z_base") else
                                          (args.gfn_policy_lr if m == "gflownet_em_policy" else args.lr)})
    be = GFlowNetEM(dv.model, optim=optim, num_particles=args.gfn_particles, hidden=(256,),
                    epsilon=args.gfn_epsilon, m_step_warmup=args.gfn_warmup)
    t0 = time.perf_counter()
    fit = be.run(data.train, num_steps=steps, subsample_size=BATCH, progress=False)
    return time.perf_counter() - t0, fit


def evaluate_gfn(fit, x, k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the k-hat warning: reported in the table instead
        est = fit.log_evidence(k, x, subsample_size=None)
    return -est.log_evidence / x.shape[0], est.khat


def train_torch(dv, data, steps, args, loss_fn, params):
    opt = torch.optim.Adam(params, lr=args.lr)
    n = data.train.shape[0]
    t0 = time.perf_counter()
    for i in range(steps):
        xb = data.train[torch.randperm(n)[:BATCH]]
        loss = loss_fn(xb, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def run_one(method, grid, codebook, steps, seed, data, args):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    dv = DiscreteVAE(data.train.shape[1], grid=grid, codebook=codebook, embed_dim=16, hidden=(256,),
                     name=f"{method}_{seed}")
    x = data.test
    if method == "GFlowNet-EM":
        secs, fit = train_gfn(dv, data, steps, args)
        nll_is, khat = evaluate_gfn(fit, x, args.eval_particles)
    elif method == "Gumbel-softmax":
        t_start, t_end = 1.0, 0.5

        def loss_fn(xb, i):
            tau = t_start * (t_end / t_start) ** (i / max(1, steps - 1))
            return dv.relaxed_loss(xb, temperature=tau)

        secs = train_torch(dv, data, steps, args, loss_fn,
                           list(dv.encoder.parameters()) + list(dv.decoder.parameters()))
        with torch.no_grad():
            ll, khats = categorical_is(dv, x, dv.encoder_logits(x), args.eval_particles)
        nll_is, khat = -float(ll.mean()), max_khat(khats)
    elif method == "VQ-VAE":
        secs = train_torch(dv, data, steps, args, lambda xb, i: dv.vq_loss(xb),
                           list(dv.vq_encoder.parameters()) + list(dv.decoder.parameters()))
        with torch.no_grad():
            _, h = dv.vq_codes(x)
            logits = -(h.unsqueeze(-2) - dv.embedding).pow(2).sum(-1)  # (N, L, C)
            ll, khats = categorical_is(dv, x, logits, args.eval_particles)
        nll_is, khat = -float(ll.mean()), max_khat(khats)
    else:
        raise ValueError(method)
    return {"secs": secs, "exact": exact_nll(dv, x), "is": nll_is, "khat": khat}


def fmt(vals, digits=2):
    vals = np.asarray(vals, dtype=float)
    if np.all(np.isnan(vals)):
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{vals.mean():.{digits}f} ± {vals.std(ddof=1):.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000, help="training steps (2x2 grid), every method")
    ap.add_argument("--steps-4x4", type=int, default=1000, help="training steps for the 4x4 grid")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--grids", nargs="+", default=["2x2:8", "4x4:4"], help="grid:codebook, e.g. 2x2:8")
    ap.add_argument("--methods", nargs="+", default=["GFlowNet-EM", "Gumbel-softmax", "VQ-VAE"])
    ap.add_argument("--eval-particles", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the decoder (and the "
                    "baselines' encoders)")
    ap.add_argument("--gfn-policy-lr", type=float, default=3e-3)
    ap.add_argument("--gfn-logz-lr", type=float, default=0.05)
    ap.add_argument("--gfn-particles", type=int, default=4)
    ap.add_argument("--gfn-epsilon", type=float, default=0.05)
    ap.add_argument("--gfn-warmup", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_digits_binary()
    t_all = time.perf_counter()
    print(f"binarized digits: {data.train.shape[0]} train / {data.test.shape[0]} test images, 64 pixels; "
          f"batch {BATCH}; seeds {args.seeds}; IS with K={args.eval_particles}")
    print(f"GFlowNet-EM: {args.gfn_particles} trajectories per image, epsilon {args.gfn_epsilon}, "
          f"M-step warm-up {args.gfn_warmup}, lr decoder {args.lr} / policy {args.gfn_policy_lr} / "
          f"log Z offset {args.gfn_logz_lr}", flush=True)
    rows = []
    for spec in args.grids:
        grid, codebook = parse_grid(spec)
        steps = args.steps if math.prod(grid) <= 4 else args.steps_4x4
        for method in args.methods:
            res = []
            for seed in args.seeds:
                r = run_one(method, grid, codebook, steps, seed, data, args)
                res.append(r)
                print(f"  {method:<15} {spec:<6} seed {seed}: train {r['secs']:6.1f} s, exact NLL "
                      f"{r['exact']:8.3f}, IS NLL {r['is']:8.3f}, k-hat max {r['khat']:.2f}", flush=True)
            rows.append((method, "x".join(map(str, grid)), codebook, steps, res))
    print()
    head = (f"{'method':<15} {'grid':<5} {'codebook':>8} {'steps':>6} {'train time s':>13} "
            f"{'test NLL exact':>16} {f'test NLL IS (K={args.eval_particles})':>22} {'k-hat max':>12}")
    print(head)
    print("-" * len(head))
    for method, g, c, steps, res in rows:
        print(f"{method:<15} {g:<5} {c:>8} {steps:>6} {fmt([r['secs'] for r in res], 0):>13} "
              f"{fmt([r['exact'] for r in res]):>16} {fmt([r['is'] for r in res]):>22} "
              f"{fmt([r['khat'] for r in res]):>12}")
    print(f"\nmean ± sd over {len(args.seeds)} seed(s); total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
