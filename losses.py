"""The VAE/GAN loss terms of Larsen et al. 2016 (arXiv 1512.09300) as pure functions.

Every function returns a scalar: summed over features or latent dimensions, averaged
over the batch. Which network descends which term is decided in main.train_step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GAN_LOSSES = ("minimax", "nonsaturating")


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """L_prior = KL(q(z|x) || N(0, I)) (paper Eq. 2), summed over z, mean over the batch."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(1).mean()


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I)."""
    return mean + torch.exp(0.5 * logvar) * eps


def feature_nll(dis_l_recon: torch.Tensor, dis_l_real: torch.Tensor) -> torch.Tensor:
    """L_llike^Dis_l (paper Eqs. 4-5): -log N(Dis_l(x) | Dis_l(x~), I) up to a constant.

    0.5 * sum over features of (Dis_l(x~) - Dis_l(x))^2, mean over the batch.
    """
    return 0.5 * (dis_l_recon - dis_l_real).pow(2).flatten(1).sum(1).mean()


def pixel_nll(recon: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Element-wise L_llike^pixel (paper Eq. 2) of the plain VAE: -log N(x | x~, I) up to a constant.

    0.5 * sum over pixels of (x~ - x)^2, mean over the batch.
    """
    return 0.5 * (recon - real).pow(2).flatten(1).sum(1).mean()


def bce_real(logits_real: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the discriminator on real images (label 1)."""
    return F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))


def bce_fake(logits_fake: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the discriminator on generated images (label 0)."""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, real_weight: float) -> torch.Tensor:
    """L_GAN (paper Eq. 7) read as the discriminator's loss, which it descends.

    BCE on real x (label 1) weighted by `real_weight`, plus BCE on the generated images,
    reconstructions x~ and prior samples x_p together (label 0), weighted by 1 - real_weight.
    """
    return real_weight * bce_real(logits_real) + (1.0 - real_weight) * bce_fake(logits_fake)


def decoder_gan_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, real_weight: float, kind: str) -> torch.Tensor:
    """The decoder's GAN term, which it descends (paper Eq. 8 reads it as -L_GAN).

    minimax: exactly -L_GAN, so the decoder ascends the discriminator's loss. (Its real-image
    part reaches the decoder only through the discriminator's batch statistics.)
    nonsaturating: (1 - real_weight) * BCE(D(fake), 1), the usual stronger-gradient variant.
    """
    if kind == "minimax":
        return -discriminator_loss(logits_real, logits_fake, real_weight)
    if kind == "nonsaturating":
        return (1.0 - real_weight) * bce_real(logits_fake)
    raise ValueError(f"unknown GAN loss {kind!r}; choose one of {', '.join(GAN_LOSSES)}")
