import math

import torch
import torch.nn.functional as F

import losses


def test_kl_divergence_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(5, 7), torch.randn(5, 7)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(7), torch.ones(7))
    expected = torch.distributions.kl_divergence(q, p).sum(1).mean()
    assert torch.allclose(losses.kl_divergence(mean, logvar), expected, atol=1e-5)
    assert losses.kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)) == 0


def test_reparameterize():
    mean, logvar, eps = torch.tensor([[1.0]]), torch.tensor([[math.log(4.0)]]), torch.tensor([[0.5]])
    assert losses.reparameterize(mean, logvar, eps).item() == 2.0  # 1 + 2 * 0.5


def test_feature_nll_sums_features_and_averages_batch():
    recon = torch.zeros(2, 3, 2, 2)
    real = torch.ones(2, 3, 2, 2)
    real[1] *= 2
    # image 0: 12 features off by 1 -> 6; image 1: off by 2 -> 24; mean 15
    assert losses.feature_nll(recon, real).item() == 15.0


def test_discriminator_loss_weights_real_and_generated():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5, -2.0, 0.0])
    expected = 0.3 * F.softplus(-real).mean() + 0.7 * F.softplus(fake).mean()
    assert torch.allclose(losses.discriminator_loss(real, fake, 0.3), expected)


def test_decoder_gan_losses():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
    minimax = losses.decoder_gan_loss(real, fake, 0.4, "minimax")
    assert torch.allclose(minimax, -losses.discriminator_loss(real, fake, 0.4))
    nonsaturating = losses.decoder_gan_loss(real, fake, 0.4, "nonsaturating")
    assert torch.allclose(nonsaturating, 0.6 * F.softplus(-fake).mean())


def test_bce_helpers_are_the_binary_cross_entropy_of_probabilities():
    logits = torch.tensor([0.3, -2.0, 4.0])
    p = torch.sigmoid(logits)
    assert torch.allclose(losses.bce_real(logits), -(p.log()).mean())
    assert torch.allclose(losses.bce_fake(logits), -((1 - p).log()).mean())
