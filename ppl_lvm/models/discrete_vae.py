r"""Discrete VAE: a grid of categorical codes per image (GFlowNet-EM's discrete VAE).

.. math::

    z_{i,l} \sim \mathrm{Uniform}\{1, \dots, C\}, \quad l = 1..L, \qquad
    x_i \mid z_i \sim \prod_{d=1}^{D} \mathrm{Bernoulli}\big(\sigma(f_\theta(e_{z_{i,1}}, \dots,
    e_{z_{i,L}}))_d\big),

with :math:`L` = the grid size (e.g. 2x2 or 4x4), a codebook of :math:`C` learned embeddings
:math:`e_c \in \mathbb R^E` and an MLP decoder :math:`f_\theta` on the concatenated embeddings.
The prior is fixed and uniform, as in VQ-VAE (van den Oord et al. 2017) and in the discrete-VAE
experiment of GFlowNet-EM (Hu et al. 2023); the decoder and the codebook are the model
parameters.

* ``backend="gflownet_em"`` fits it with no guide: the policy builds each image's code grid
  one code at a time (E-step), the decoder ascends :math:`\log p_\theta(x, z)` at the policy's
  draws (M-step).
* :meth:`guide` is an amortized factorized categorical :math:`q_\phi(z_i \mid x_i)` from an MLP
  encoder, for SVI/IWAE/chi^2-VIS with score-function (VIMCO) gradients.
* :meth:`relaxed_loss` is the Gumbel-softmax (concrete) relaxation of Jang, Gu & Poole (2017)
  and Maddison, Mnih & Teh (2017) for the same decoder, and :meth:`vq_loss` the VQ-VAE objective
  with a deterministic nearest-codebook encoder (straight-through gradients): the two baselines
  of the GFlowNet-EM paper, sharing this model's decoder so that every method is scored by the
  same likelihood.
* :meth:`exact_log_likelihood` sums over all :math:`C^L` code grids (when that is at most
  ``max_states``), the exact test NLL that importance-sampling estimates are checked against.

References:

* Hu, Malkin, Jain, Everett, Graikos, Bengio. *GFlowNet-EM for learning compositional latent
  variable models*. ICML 2023.
* van den Oord, Vinyals, Kavukcuoglu. *Neural Discrete Representation Learning*. NeurIPS 2017.
* Jang, Gu, Poole. *Categorical Reparameterization with Gumbel-Softmax*. ICLR 2017.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from . import register_model, warn_if_name_in_use
from .vae import mlp

__all__ = ["DiscreteVAE"]


class DiscreteVAE(nn.Module):
    """Bernoulli decoder on a grid of categorical codes (see the module docstring).

    :param int obs_dim: D, pixels per flattened image.
    :param grid: the code grid, e.g. ``(2, 2)`` (L = 4 codes per image) or ``(4, 4)``.
    :param int codebook: C, choices per code.
    :param int embed_dim: E, size of each code's embedding.
    :param hidden: hidden widths of the decoder (the encoder uses them reversed).
    :param str name: prefix of the Pyro parameter names.

    Example::

        >>> data = ppl_lvm.datasets.load_digits_binary()
        >>> dvae = DiscreteVAE(64, grid=(2, 2), codebook=8)
        >>> fit = ppl_lvm.GFlowNetEM(dvae.model, num_particles=4).run(
        ...     data.train, num_steps=5000, subsample_size=100)
        >>> dvae.exact_log_likelihood(data.test).mean()
    """

    def __init__(self, obs_dim: int, grid: Sequence[int] = (2, 2), codebook: int = 8, embed_dim: int = 16,
                 hidden: Sequence[int] = (256,), name: str = "dvae"):
        super().__init__()
        for label, value in (("obs_dim", obs_dim), ("codebook", codebook), ("embed_dim", embed_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        grid = tuple(grid)
        if not grid or any(not isinstance(g, int) or g < 1 for g in grid):
            raise ValueError(f"grid must be a tuple of positive ints such as (2, 2), got {grid!r}")
        hidden = tuple(hidden)
        if any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        self.obs_dim, self.grid, self.codebook, self.name = obs_dim, grid, codebook, name
        warn_if_name_in_use(self, name)
        self.num_codes = math.prod(grid)
        # the model's parameters: the codebook and the MLP (one module, registered with pyro.module)
        self.decoder = nn.ModuleDict({"codebook": nn.Embedding(codebook, embed_dim),
                                      "mlp": mlp((self.num_codes * embed_dim,) + hidden + (obs_dim,), nn.ELU)})
        self.encoder = mlp((obs_dim,) + hidden[::-1] + (self.num_codes * codebook,), nn.ELU)
        # VQ-VAE's encoder outputs one embedding per code position
        self.vq_encoder = mlp((obs_dim,) + hidden[::-1] + (self.num_codes * embed_dim,), nn.ELU)

    # ------------------------------------------------------------------ checks and pieces
    def _check(self, x):
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[-1] != self.obs_dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (N, {self.obs_dim}), got {shape}. "
                             "Flatten images to vectors first.")
        if not torch.all((x == 0) | (x == 1)):
            raise ValueError("x must be binary (0./1.): binarize the images first, e.g. (x > 0.5).float().")

    @property
    def embedding(self) -> torch.Tensor:
        """The codebook ``(C, E)``."""
        return self.decoder["codebook"].weight

    def decode_embeddings(self, e: torch.Tensor) -> torch.Tensor:
        """Code embeddings ``(..., L, E)`` -> pixel logits ``(..., D)``."""
        return self.decoder["mlp"](e.flatten(-2))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes ``(..., L)`` (long) -> pixel logits ``(..., D)``."""
        return self.decode_embeddings(self.embedding[z])

    def _plate(self, x, subsample_size):
        return pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1, device=x.device)

    def _prior_logits(self, x):
        return x.new_zeros(self.num_codes, self.codebook)

    # ------------------------------------------------------------------ Pyro programs
    def model(self, x: torch.Tensor, subsample_size: Optional[int] = None):
        self._check(x)
        pyro.module(f"{self.name}.decoder", self.decoder)
        with self._plate(x, subsample_size) as ind:
            z = pyro.sample("z", dist.Categorical(logits=self._prior_logits(x)).to_event(1))
            logits = self.decode(z)
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1),
                        obs=x.index_select(0, ind))

    def encoder_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The amortized guide's logits ``(N, L, C)``."""
        return self.encoder(x).reshape(x.shape[:-1] + (self.num_codes, self.codebook))

    def guide(self, x: torch.Tensor, subsample_size: Optional[int] = None):
        self._check(x)
        pyro.module(f"{self.name}.encoder", self.encoder)
        with self._plate(x, subsample_size) as ind:
            pyro.sample("z", dist.Categorical(logits=self.encoder_logits(x.index_select(0, ind))).to_event(1))

    # ------------------------------------------------------------------ baselines' objectives
    def relaxed_loss(self, x: torch.Tensor, temperature: float = 1.0, hard: bool = False) -> torch.Tensor:
        r"""Negative Gumbel-softmax ELBO per image (mean over the batch): codes relaxed to
        :math:`\mathrm{softmax}((\log \pi + g)/\tau)` mixtures of embeddings; KL to the uniform
        prior in closed form.  ``hard=True`` is the straight-through variant."""
        logits = self.encoder_logits(x)
        y = nn.functional.gumbel_softmax(logits, tau=temperature, hard=hard, dim=-1)  # (N, L, C)
        e = y @ self.embedding
        rec = dist.Bernoulli(logits=self.decode_embeddings(e), validate_args=False).log_prob(x).sum(-1)
        logq = torch.log_softmax(logits, -1)
        kl = (logq.exp() * (logq + math.log(self.codebook))).sum((-1, -2))
        return (kl - rec).mean()

    def vq_codes(self, x: torch.Tensor):
        """VQ-VAE's deterministic encoder: ``(codes (N, L), encoder outputs (N, L, E))``."""
        h = self.vq_encoder(x).reshape(x.shape[:-1] + (self.num_codes, self.embedding.shape[-1]))
        d = (h.unsqueeze(-2) - self.embedding).pow(2).sum(-1)  # (N, L, C)
        return d.argmin(-1), h

    def vq_loss(self, x: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
        """VQ-VAE objective (van den Oord et al. 2017): reconstruction NLL with straight-through
        quantization + codebook loss + ``beta`` x commitment loss, mean over the batch."""
        codes, h = self.vq_codes(x)
        q = self.embedding[codes]
        st = h + (q - h).detach()
        rec = dist.Bernoulli(logits=self.decode_embeddings(st), validate_args=False).log_prob(x).sum(-1)
        codebook = (q - h.detach()).pow(2).sum((-1, -2))
        commit = (h - q.detach()).pow(2).sum((-1, -2))
        return (-rec + codebook + beta * commit).mean()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p_\theta(x_i, z)` for codes ``z`` ``(..., N, L)``: ``(..., N)``."""
        lp = dist.Bernoulli(logits=self.decode(z), validate_args=False).log_prob(x).sum(-1)
        return lp - self.num_codes * math.log(self.codebook)

    @torch.no_grad()
    def exact_log_likelihood(self, x: torch.Tensor, max_states: int = 2 ** 16, chunk: int = 512) -> torch.Tensor:
        r""":math:`\log p_\theta(x_i) = \log \sum_z p_\theta(x_i, z)` by enumerating all
        :math:`C^L` code grids: ``(N,)``."""
        self._check(x)
        n_states = self.codebook ** self.num_codes
        if n_states > max_states:
            raise ValueError(
                f"Enumerating {self.codebook}^{self.num_codes} = {n_states} code grids exceeds max_states="
                f"{max_states}; estimate the likelihood by importance sampling instead "
                "(fit.log_evidence(K, x, subsample_size=None) or importance_log_likelihood).")
        codes = torch.arange(n_states, device=x.device)
        powers = self.codebook ** torch.arange(self.num_codes - 1, -1, -1, device=x.device)
        states = (codes.unsqueeze(-1) // powers) % self.codebook  # (S, L)
        out = None
        for s in range(0, n_states, chunk):
            lj = self.log_joint(x, states[s:s + chunk].unsqueeze(1))  # (chunk, N)
            part = lj.logsumexp(0)
            out = part if out is None else torch.logaddexp(out, part)
        return out

    @torch.no_grad()
    def importance_log_likelihood(self, x: torch.Tensor, proposal_logits: torch.Tensor,
                                  num_samples: int = 1000, chunk: int = 250) -> torch.Tensor:
        r"""Importance-sampling estimate of :math:`\log p_\theta(x_i)` with a factorized
        categorical proposal of logits ``(N, L, C)`` (the encoder's, or a VQ encoder's distances):
        :math:`\log \frac1K \sum_k p(x_i, z_k) / q(z_k \mid x_i)`, ``(N,)``."""
        q = dist.Categorical(logits=proposal_logits)
        parts = []
        for s in range(0, num_samples, chunk):
            k = min(chunk, num_samples - s)
            z = q.sample((k,))  # (k, N, L)
            parts.append(self.log_joint(x, z) - q.log_prob(z).sum(-1))
        lw = torch.cat(parts)
        return lw.logsumexp(0) - math.log(num_samples)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, codes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pixel probabilities decoded from ``codes`` (default: the encoder's most likely codes)."""
        if codes is None:
            codes = self.encoder_logits(x).argmax(-1)
        return torch.sigmoid(self.decode(codes))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Pixel probabilities of images decoded from prior (uniform) code grids."""
        z = torch.randint(self.codebook, (num_samples, self.num_codes), device=self.embedding.device)
        return torch.sigmoid(self.decode(z))

    @staticmethod
    def plot_images(images: torch.Tensor, shape=(8, 8), ncols: int = 10, ax=None, title: Optional[str] = None):
        """Tile flattened images ``(N, H*W)`` into one picture (matplotlib); returns the axes."""
        import matplotlib.pyplot as plt

        imgs = images.detach().cpu().reshape(-1, *shape)
        n = imgs.shape[0]
        nrows = math.ceil(n / ncols)
        canvas = torch.ones(nrows * (shape[0] + 1), ncols * (shape[1] + 1))
        for i in range(n):
            r, c = divmod(i, ncols)
            canvas[r * (shape[0] + 1): r * (shape[0] + 1) + shape[0], c * (shape[1] + 1): c * (shape[1] + 1) + shape[1]] = imgs[i]
        if ax is None:
            _, ax = plt.subplots(figsize=(ncols * 0.6, nrows * 0.6))
        ax.imshow(canvas.numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_axis_off()
        if title:
            ax.set_title(title)
        return ax

    @staticmethod
    def simulate(num_data: int = 100, obs_dim: int = 16, grid=(2,), codebook: int = 3, seed: int = 0):
        """Binary data from a random decoder: ``(x, truth)`` with the true codes ``truth["z"]``."""
        g = torch.Generator().manual_seed(seed)
        L = math.prod(grid)
        w = 3.0 * torch.randn(L, codebook, obs_dim, generator=g)
        z = torch.randint(codebook, (num_data, L), generator=g)
        probs = torch.sigmoid(w[torch.arange(L), z].sum(-2))
        return torch.bernoulli(probs, generator=g), {"z": z, "weights": w}


@register_model("discrete_vae")
def _matrix_case():
    x, _ = DiscreteVAE.simulate(num_data=32, obs_dim=16, grid=(2,), codebook=3, seed=0)
    return DiscreteVAE(16, grid=(2,), codebook=3, embed_dim=4, hidden=(16,), name="matrix_dvae"), (x,)
