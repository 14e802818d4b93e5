"""The training step routes every gradient as Algorithm 1 says.

The project's step (main.compute_gradients) is compared, parameter by parameter, with
a plain reference written here: the same forward pass, then each network's loss on its
own and torch.autograd.grad of it. Float64, a tiny model, tolerance 1e-6. Broken
references (the bugs of public ports) show that the comparison catches each bug.
"""
import copy

import pytest
import torch

import losses
import main
from models import ModelConfig

TINY = ModelConfig(image_size=16, channels=1, latent_dim=8, width=0.125, recon_layer=3)


def reference_gradients(nets, x, cfg, noise, bug=None):
    """Each network's gradient from its own loss, computed plainly (no routing tricks)."""
    eps, z_prior = noise
    n = len(x)
    mean, logvar = nets.encoder(x)
    z = mean + torch.exp(0.5 * logvar) * eps
    generated = nets.decoder(torch.cat([z, z_prior]))
    logits, dis_l = nets.discriminator(torch.cat([x, generated]))
    real, fake = logits[:n], logits[n:]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    bce_real = bce(real, torch.ones_like(real))
    bce_fake = bce(fake, torch.zeros_like(fake))
    if bug == "drop reconstructions from the fakes":
        bce_fake = bce(fake[n:], torch.zeros_like(fake[n:]))
    l_prior = (-0.5 * (1 + logvar - mean**2 - logvar.exp()).sum(1)).mean()
    l_llike = (0.5 * ((dis_l[n:2 * n] - dis_l[:n]) ** 2).sum(1)).mean()
    l_gan = cfg.real_weight * bce_real + (1 - cfg.real_weight) * bce_fake
    if cfg.gan_loss == "minimax":
        dec_gan = -l_gan
    else:
        dec_gan = (1 - cfg.real_weight) * bce(fake, torch.ones_like(fake))
    if bug == "decoder helps the discriminator":
        dec_gan = l_gan
    enc_loss = l_prior + cfg.llike_weight * l_llike
    if bug == "GAN gradient into the encoder":
        enc_loss = enc_loss + (1 - cfg.gamma) * dec_gan
    dec_loss = cfg.gamma * l_llike + (1 - cfg.gamma) * dec_gan
    dis_loss = l_gan + l_llike if bug == "L_llike into the discriminator" else l_gan

    # The equilibrium rule, written out.
    update_dis = update_dec = True
    if cfg.equilibrium is not None:
        low, high = cfg.equilibrium - cfg.margin, cfg.equilibrium + cfg.margin
        update_dis = bce_real.item() >= low and bce_fake.item() >= low
        update_dec = bce_real.item() <= high and bce_fake.item() <= high
        if not update_dis and not update_dec:
            update_dis = update_dec = True

    grads = {}
    for name, loss, update in (("encoder", enc_loss, True), ("decoder", dec_loss, update_dec),
                               ("discriminator", dis_loss, update_dis)):
        params = list(getattr(nets, name).parameters())
        grads[name] = torch.autograd.grad(loss, params, retain_graph=True) if update else None
    return grads


def project_gradients(nets, x, cfg, noise):
    main.compute_gradients(nets, x, cfg, noise)
    out = {}
    for name, module in nets.modules().items():
        got = [p.grad for p in module.parameters()]
        out[name] = None if got[0] is None else tuple(got)
    return out


def mismatches(a, b):
    """Names of the networks whose gradients differ (or are updated in one and not the other)."""
    bad = []
    for name in a:
        if (a[name] is None) != (b[name] is None):
            bad.append(name)
        elif a[name] is not None and not all(torch.allclose(g, h, rtol=1e-6, atol=1e-6) for g, h in zip(a[name], b[name])):
            bad.append(name)
    return bad


def setup(seed=0):
    torch.manual_seed(seed)
    nets = main.build_networks(TINY)
    for module in nets.modules().values():
        module.double()
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64) * 2 - 1
    noise = (torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64))
    return nets, x, noise


def compare(cfg, bug=None):
    nets, x, noise = setup()
    twin = copy.deepcopy(nets)
    expected = reference_gradients(twin, x, cfg, noise, bug)
    return expected, project_gradients(nets, x, cfg, noise)


# Gate settings that force each outcome on a fresh model, whose BCEs are near log 2 = 0.69.
GATES = {
    "off": dict(equilibrium=None),
    "both update": dict(equilibrium=0.68, margin=0.35),
    "discriminator skipped": dict(equilibrium=2.0, margin=0.5),
    "decoder skipped": dict(equilibrium=0.2, margin=0.1),
}


@pytest.mark.parametrize("gan_loss", losses.GAN_LOSSES)
@pytest.mark.parametrize("gate", GATES)
def test_step_gradients_match_reference(gan_loss, gate):
    cfg = main.LossConfig(gamma=0.3, real_weight=0.6, gan_loss=gan_loss, llike_weight=0.5, **GATES[gate])
    expected, got = compare(cfg)
    assert mismatches(expected, got) == []
    skipped = {"discriminator skipped": "discriminator", "decoder skipped": "decoder"}.get(gate)
    for name in ("encoder", "decoder", "discriminator"):
        assert (got[name] is None) == (name == skipped)


BUGS = {
    "GAN gradient into the encoder": "encoder",
    "L_llike into the discriminator": "discriminator",
    "decoder helps the discriminator": "decoder",
    "drop reconstructions from the fakes": "discriminator",
}


@pytest.mark.parametrize("bug", BUGS)
def test_comparison_catches_broken_routing(bug):
    cfg = main.LossConfig(gamma=0.3, real_weight=0.6, llike_weight=0.5, equilibrium=None)
    expected, got = compare(cfg, bug)
    assert BUGS[bug] in mismatches(expected, got)


def test_train_step_updates_only_gated_networks():
    cfg = main.LossConfig(**GATES["discriminator skipped"])
    nets, x, noise = setup()
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in nets.modules().items()}
    optimizers = main.build_optimizers(nets, lr=1e-3, alpha=0.9)
    stats = main.train_step(nets, optimizers, x, cfg, noise)
    assert stats["update_dis"] == 0.0 and stats["update_dec"] == 1.0
    for name, module in nets.modules().items():
        changed = any(not torch.equal(p, q) for p, q in zip(module.parameters(), before[name]))
        assert changed == (name != "discriminator"), name
