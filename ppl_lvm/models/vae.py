r"""Variational autoencoder with Bernoulli observations: the IWAE paper's model family.

.. math::

    z_i \sim \mathcal N(0, I_L), \qquad
    x_i \mid z_i \sim \prod_{d=1}^{D} \mathrm{Bernoulli}\big(\sigma(f_\theta(z_i))_d\big),

with an MLP decoder :math:`f_\theta` (model parameters) and an amortized Gaussian guide
:math:`q_\phi(z_i \mid x_i) = \mathcal N(\mu_\phi(x_i), \mathrm{diag}\,\sigma^2_\phi(x_i))`
from an MLP encoder.  Every latent is local to the ``"data"`` plate, so IWAE's bound is per data
point and minibatches (``subsample_size``) keep it unbiased.  Trained with ``backend="svi"``
(or ``IWAE`` with ``num_particles=1``) it is the VAE of Kingma & Welling (2014); with
``IWAE(num_particles=K)`` it is the IWAE of Burda et al. (2016).

References:

* Kingma, Welling. *Auto-Encoding Variational Bayes*. ICLR 2014.
* Burda, Grosse, Salakhutdinov. *Importance Weighted Autoencoders*. ICLR 2016.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from . import register_model, warn_if_name_in_use

__all__ = ["VAE", "mlp"]


def mlp(sizes, activation=nn.Tanh):
    """A fully connected network with ``activation`` between the layers of widths ``sizes``."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Bernoulli VAE with MLP encoder and decoder (see the module docstring).

    :param int obs_dim: D, pixels per (flattened) image.
    :param int latent_dim: L.
    :param hidden: sizes of the hidden layers of encoder and decoder.
    :param str name: prefix of the Pyro parameter names (distinct VAEs need distinct names).

    Example::

        >>> data = ppl_lvm.datasets.load_digits_binary()
        >>> vae = VAE(64, latent_dim=8)
        >>> fit = ppl_lvm.IWAE(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), num_particles=5).run(
        ...     data.train, num_steps=3000, subsample_size=100)
        >>> fit.log_evidence(5000, data.test, subsample_size=None)
    """

    def __init__(self, obs_dim: int, latent_dim: int = 8, hidden=(64,), name: str = "vae"):
        super().__init__()
        for label, value in (("obs_dim", obs_dim), ("latent_dim", latent_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        hidden = tuple(hidden)
        if any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        self.obs_dim, self.latent_dim, self.name = obs_dim, latent_dim, name
        warn_if_name_in_use(self, name)
        self.encoder = mlp((obs_dim,) + hidden + (2 * latent_dim,))
        self.decoder = mlp((latent_dim,) + hidden[::-1] + (obs_dim,))

    def _check(self, x):
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[-1] != self.obs_dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (N, {self.obs_dim}), got {shape}. "
                             "Flatten images to vectors first.")

    def _plate(self, x, subsample_size):
        return pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1, device=x.device)

    def model(self, x: torch.Tensor, subsample_size: Optional[int] = None):
        self._check(x)
        pyro.module(f"{self.name}.decoder", self.decoder)
        zeros = x.new_zeros(self.latent_dim)
        with self._plate(x, subsample_size) as ind:
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            logits = self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1),
                        obs=x.index_select(0, ind))

    def guide(self, x: torch.Tensor, subsample_size: Optional[int] = None):
        self._check(x)
        pyro.module(f"{self.name}.encoder", self.encoder)
        with self._plate(x, subsample_size) as ind:
            h = self.encoder(x.index_select(0, ind))
            loc = h[..., : self.latent_dim]
            scale = nn.functional.softplus(h[..., self.latent_dim:]) + 1e-4
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities decoded from the encoder's mean code of each row of ``x``."""
        self._check(x)
        return torch.sigmoid(self.decoder(self.encoder(x)[..., : self.latent_dim]))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Pixel probabilities of images decoded from prior draws of z."""
        ref = next(self.decoder.parameters())
        z = torch.randn(num_samples, self.latent_dim, dtype=ref.dtype, device=ref.device)
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's mean code of each row of ``x``: ``(N, L)``."""
        self._check(x)
        return self.encoder(x)[..., : self.latent_dim]

    def plot_reconstructions(self, x: torch.Tensor, num: int = 8, image_shape=None, axes=None):
        """Rows of ``x`` (top) above their reconstructions (bottom): images when ``image_shape``
        (e.g. ``(8, 8)`` for the digits; a square side is guessed when ``obs_dim`` is a square),
        else bar charts of the pixel values.  Returns the axes ``(2, num)``."""
        import matplotlib.pyplot as plt

        self._check(x)
        num = min(int(num), x.shape[0])
        if num < 1:
            raise ValueError("num must be at least 1 (and x must have rows).")
        if image_shape is None:
            side = int(round(self.obs_dim ** 0.5))
            image_shape = (side, side) if side * side == self.obs_dim else None
        elif int(np.prod(image_shape)) != self.obs_dim:
            raise ValueError(f"image_shape {tuple(image_shape)} does not hold obs_dim={self.obs_dim} pixels.")
        rec = self.reconstruct(x[:num]).cpu()
        if axes is None:
            _, axes = plt.subplots(2, num, figsize=(1.3 * num, 2.8), squeeze=False)
        for j in range(num):
            for row, img in ((0, x[j].cpu()), (1, rec[j])):
                ax = axes[row][j]
                if image_shape is not None:
                    ax.imshow(img.reshape(image_shape).numpy(), cmap="gray_r", vmin=0, vmax=1)
                else:
                    ax.bar(np.arange(self.obs_dim), img.numpy(), width=1.0)
                    ax.set_ylim(0, 1)
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0][0].set_ylabel("data")
        axes[1][0].set_ylabel("reconstruction")
        return axes

    def plot_latent(self, x: torch.Tensor, labels=None, dims=(0, 1), ax=None):
        """Scatter of the encoder's mean codes in two latent dimensions ``dims``, coloured by
        ``labels`` (e.g. digit classes) when given.  Returns the axes."""
        import matplotlib.pyplot as plt

        if self.latent_dim < 2:
            raise ValueError("plot_latent needs latent_dim >= 2; plot a histogram of encode(x) instead.")
        i, j = dims
        z = self.encode(x).cpu().numpy()
        ax = ax or plt.subplots(figsize=(4.5, 4))[1]
        sc = ax.scatter(z[:, i], z[:, j], c=None if labels is None else np.asarray(labels), s=8, cmap="tab10")
        if labels is not None:
            ax.figure.colorbar(sc, ax=ax, label="label")
        ax.set_xlabel(f"z[{i}] (encoder mean)")
        ax.set_ylabel(f"z[{j}] (encoder mean)")
        return ax

    @staticmethod
    def simulate(num_data: int = 100, obs_dim: int = 16, latent_dim: int = 2, seed: int = 0):
        """Binary data from a randomly initialized decoder: ``(x, truth)`` with ``truth["z"]``."""
        g = torch.Generator().manual_seed(seed)
        w = 2.0 * torch.randn(latent_dim, obs_dim, generator=g)
        z = torch.randn(num_data, latent_dim, generator=g)
        probs = torch.sigmoid(z @ w)
        x = torch.bernoulli(probs, generator=g)
        return x, {"z": z, "weights": w}


@register_model("vae")
def _matrix_case():
    x, _ = VAE.simulate(num_data=64, obs_dim=16, latent_dim=2, seed=0)
    return VAE(16, latent_dim=2, hidden=(16,), name="matrix_vae"), (x,)
