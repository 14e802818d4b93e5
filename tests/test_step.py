"""The training step routes every gradient as Algorithm 1 says.

The project's step (step.compute_gradients) is compared, parameter by parameter, with
a plain reference written here: the same forward pass, then each network's loss on its
own and torch.autograd.grad of it. Float64, a tiny model, tolerance 1e-6, unconditional and
conditional (a label y into every network, at its first or at every layer). Broken references
(the bugs of public ports) show that the comparison catches each bug.
"""
import copy
from dataclasses import replace

import pytest
import torch

import config
import losses
import models
import step
from models import NetworkConfig

TINY = NetworkConfig(image_size=16, channels=1, latent_dim=8, width=0.125, recon_layer=3)
LABELS = 3  # classes of the conditional networks' label


def reference_gradients(nets, x, cfg, noise, bug=None, y=None):
    """Each network's gradient from its own loss, computed plainly (no routing tricks); `y`: labels."""
    eps, z_prior = noise
    n = len(x)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    if nets.encoder is not None:
        mean, logvar = nets.encoder(x, y)
        z = mean + torch.exp(0.5 * logvar) * eps
        l_prior = (-0.5 * (1 + logvar - mean**2 - logvar.exp()).sum(1)).mean()
    if cfg.model == "vae":
        recon = nets.decoder(z, y)
        l_pixel = (0.5 * ((recon - x) ** 2).flatten(1).sum(1)).mean()
        return {"encoder": torch.autograd.grad(l_prior + l_pixel, list(nets.encoder.parameters()), retain_graph=True),
                "decoder": torch.autograd.grad(l_pixel, list(nets.decoder.parameters()))}

    # x~ and x_p are decoded as two batches: BatchNorm normalises each by its own statistics.
    if nets.encoder is None:
        generated = nets.decoder(z_prior, y)
    elif bug == "x~ and x_p in one decoder batch":
        generated = nets.decoder(torch.cat([z, z_prior]), None if y is None else torch.cat([y, y]))
    else:
        generated = torch.cat([nets.decoder(z, y), nets.decoder(z_prior, y)])
    fake_labels = None if y is None else torch.cat([y] * (len(generated) // n))
    logits, dis_l = nets.discriminator(torch.cat([x, generated]), labels=None if y is None else torch.cat([y, fake_labels]))
    real, fake = logits[:n], logits[n:]
    bce_real = bce(real, torch.ones_like(real))
    bce_fake = bce(fake, torch.zeros_like(fake))
    if bug == "drop reconstructions from the fakes":
        bce_fake = bce(fake[n:], torch.zeros_like(fake[n:]))
    l_gan = cfg.real_weight * bce_real + (1 - cfg.real_weight) * bce_fake
    if cfg.gan_loss == "minimax":
        dec_gan = -l_gan
    else:
        dec_gan = (1 - cfg.real_weight) * bce(fake, torch.ones_like(fake))
    if bug == "decoder helps the discriminator":
        dec_gan = l_gan
    losses = {"discriminator": l_gan}
    if nets.encoder is not None:
        l_llike = (0.5 * ((dis_l[n:2 * n] - dis_l[:n]) ** 2).sum(1)).mean()
        losses["encoder"] = l_prior + cfg.llike_weight * l_llike
        if bug == "GAN gradient into the encoder":
            losses["encoder"] = losses["encoder"] + (1 - cfg.gamma) * dec_gan
        if bug == "L_llike into the discriminator":
            losses["discriminator"] = l_gan + l_llike
    losses["decoder"] = {"vaegan": lambda: cfg.gamma * l_llike + (1 - cfg.gamma) * dec_gan,
                         "vae-disl": lambda: l_llike, "gan": lambda: dec_gan}[cfg.model]()

    # The equilibrium rule, written out; vae-disl has no GAN game to balance, so no gate.
    update = {"encoder": True, "decoder": True, "discriminator": True}
    if cfg.equilibrium is not None and cfg.model != "vae-disl":
        low, high = cfg.equilibrium - cfg.margin, cfg.equilibrium + cfg.margin
        winning = (bce_real.item() < low, bce_fake.item() < low)
        update["discriminator"] = not (all(winning) if cfg.dis_gate == "both" else any(winning))
        update["decoder"] = bce_real.item() <= high and bce_fake.item() <= high
        if not update["discriminator"] and not update["decoder"]:
            update["discriminator"] = update["decoder"] = True

    return {name: torch.autograd.grad(loss, list(getattr(nets, name).parameters()), retain_graph=True)
            if update[name] else None for name, loss in losses.items()}


def project_gradients(nets, x, cfg, noise, y=None):
    step.compute_gradients(nets, x, cfg, noise, labels=y)
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


def setup(seed=0, model="vaegan", conditional=None):
    """Float64 networks, a batch and its noise; with `conditional` (the networks' label_layers), also
    one-hot labels y (else None)."""
    torch.manual_seed(seed)
    labelled = replace(TINY, label_dim=LABELS, label_layers=conditional) if conditional else TINY
    nets = models.build_networks(labelled, "cpu", model)
    for module in nets.modules().values():
        module.double()
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64) * 2 - 1
    noise = (torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64))
    y = torch.nn.functional.one_hot(torch.arange(6) % LABELS, LABELS).double() if conditional else None
    return nets, x, noise, y


def compare(cfg, bug=None, conditional=None):
    nets, x, noise, y = setup(model=cfg.model, conditional=conditional)
    twin = copy.deepcopy(nets)
    expected = reference_gradients(twin, x, cfg, noise, bug, y)
    return expected, project_gradients(nets, x, cfg, noise, y)


CONDITIONS = [None, "first", "every"]  # no label, or the networks' label_layers
CONDITION_IDS = ["unconditional", "conditional", "conditional-every-layer"]

# Gate settings that force each outcome on a fresh model, whose BCEs are near log 2 = 0.69.
GATES = {
    "off": dict(equilibrium=None),
    "both update": dict(equilibrium=0.68, margin=0.35),
    "discriminator skipped": dict(equilibrium=2.0, margin=0.5),
    "discriminator skipped, both low": dict(equilibrium=2.0, margin=0.5, dis_gate="both"),
    "decoder skipped": dict(equilibrium=0.2, margin=0.1),
}


@pytest.mark.parametrize("conditional", CONDITIONS, ids=CONDITION_IDS)
@pytest.mark.parametrize("gan_loss", losses.GAN_LOSSES)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("model", ["vaegan", "vae-disl", "gan"])
def test_step_gradients_match_reference(model, gan_loss, gate, conditional):
    cfg = config.LossConfig(gamma=0.3, real_weight=0.6, gan_loss=gan_loss, llike_weight=0.5, model=model, **GATES[gate])
    expected, got = compare(cfg, conditional=conditional)
    assert set(got) == set(models.MODELS[model])
    assert mismatches(expected, got) == []
    skipped = {"discriminator skipped": "discriminator", "discriminator skipped, both low": "discriminator",
               "decoder skipped": "decoder"}.get(gate)
    if model == "vae-disl":
        skipped = None  # no gate
    for name in models.MODELS[model]:
        assert (got[name] is None) == (name == skipped)


@pytest.mark.parametrize("conditional", CONDITIONS, ids=CONDITION_IDS)
def test_vae_gradients_match_reference(conditional):
    expected, got = compare(config.LossConfig(model="vae"), conditional=conditional)
    assert set(got) == {"encoder", "decoder"} and mismatches(expected, got) == []


BUGS = {
    "GAN gradient into the encoder": "encoder",
    "L_llike into the discriminator": "discriminator",
    "decoder helps the discriminator": "decoder",
    "drop reconstructions from the fakes": "discriminator",
    "x~ and x_p in one decoder batch": "decoder",
}


@pytest.mark.parametrize("conditional", CONDITIONS, ids=CONDITION_IDS)
@pytest.mark.parametrize("bug", BUGS)
def test_comparison_catches_broken_routing(bug, conditional):  # vaegan
    cfg = config.LossConfig(gamma=0.3, real_weight=0.6, llike_weight=0.5, equilibrium=None)
    expected, got = compare(cfg, bug, conditional)
    assert BUGS[bug] in mismatches(expected, got)


def test_train_step_updates_only_gated_networks():
    cfg = config.LossConfig(**GATES["discriminator skipped"])
    nets, x, noise, _ = setup()
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in nets.modules().items()}
    optimizers = step.build_optimizers(nets, lr=1e-3, alpha=0.9)
    stats = step.train_step(nets, optimizers, x, cfg, noise)
    assert stats["update_dis"] == 0.0 and stats["update_dec"] == 1.0
    for name, module in nets.modules().items():
        changed = any(not torch.equal(p, q) for p, q in zip(module.parameters(), before[name]))
        assert changed == (name != "discriminator"), name


@pytest.mark.parametrize("model", list(models.MODELS))
def test_each_model_builds_and_updates_only_its_own_networks(model):
    torch.manual_seed(0)
    nets = models.build_networks(NetworkConfig(image_size=16, width=0.125, latent_dim=8), "cpu", model)
    assert tuple(nets.modules()) == models.MODELS[model]
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in nets.modules().items()}
    stats = step.train_step(nets, step.build_optimizers(nets, 1e-3, 0.9), torch.rand(8, 1, 16, 16) * 2 - 1,
                            config.LossConfig(model=model, equilibrium=None))
    for name, module in nets.modules().items():
        assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), before[name])), name
    terms = step.LOSS_TERMS[model]
    assert all(stats[k] == stats[k] for k in terms)  # the model's own terms are numbers, not NaN


def agreement(got, expected):
    """(cosine similarity, relative error) of a network's gradients, all its parameters together."""
    g, e = (torch.cat([t.double().flatten() for t in ts]) for ts in (got, expected))
    return float(torch.nn.functional.cosine_similarity(g, e, dim=0)), float((g - e).norm() / e.norm())


BF16 = {"cosine": 0.98, "relative": 0.25}  # what bf16's 8-bit mantissa leaves of gradients through ~20 layers


@pytest.mark.parametrize("model", ["vaegan", "vae", "gan"])
def test_bf16_step_gradients_match_the_float32_reference_within_bf16_precision(model):
    """The step under bfloat16 autocast routes every gradient as the float32 reference does, within
    what bf16 rounding leaves (measured: cosine 0.989-0.998, relative error 0.07-0.15)."""
    torch.manual_seed(1)
    nets = models.build_networks(NetworkConfig(image_size=16, width=0.25, latent_dim=8, recon_layer=3), "cpu", model)
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    noise = (torch.randn(16, 8), torch.randn(16, 8))
    cfg = config.LossConfig(gamma=0.3, llike_weight=0.5, model=model, equilibrium=None)
    expected = reference_gradients(copy.deepcopy(nets), x, cfg, noise)
    step.compute_gradients(nets, x, cfg, noise, precision=step.Precision(torch.bfloat16))
    for name, module in nets.modules().items():
        cosine, relative = agreement([p.grad for p in module.parameters()], expected[name])
        assert cosine > BF16["cosine"] and relative < BF16["relative"], f"{name}: {cosine:.4f}, {relative:.3f}"
        assert all(p.grad.dtype == torch.float32 for p in module.parameters())  # gradients and state stay float32
    if model == "vaegan":  # routing bugs that this tolerance still catches
        for bug in ("L_llike into the discriminator", "drop reconstructions from the fakes"):
            broken = reference_gradients(copy.deepcopy(nets), x, cfg, noise, bug)["discriminator"]
            cosine, relative = agreement(broken, expected["discriminator"])
            assert cosine < BF16["cosine"] or relative > BF16["relative"], bug


@pytest.mark.parametrize("dis_gate, bce, expected", [
    ("either", (0.2, 0.9), (False, True)),   # sure of the real images, fooled on the generated: paused
    ("both", (0.2, 0.9), (True, True)),      # ... keeps learning under "both"
    ("both", (0.2, 0.3), (False, True)),     # winning on both: paused under either rule
    ("either", (0.5, 1.2), (True, False)),   # the decoder pauses when the discriminator loses badly
])
def test_equilibrium_gate_rules(dis_gate, bce, expected):
    assert step.equilibrium_gate(*bce, config.LossConfig(dis_gate=dis_gate)) == expected


def test_weight_average_weights_every_step_by_decay_to_the_age():
    decoder = models.Decoder(TINY)
    assert step.weight_average(decoder, 0.0) is None
    average = step.weight_average(decoder, 0.9)
    seen = []
    for _ in range(3):
        with torch.no_grad():
            for p in decoder.parameters():
                p.add_(torch.randn_like(p))
        for m in decoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.num_batches_tracked += 1
        seen.append(next(decoder.parameters()).detach().clone())
        average.update_parameters(decoder)
    expected = (0.81 * seen[0] + 0.9 * seen[1] + seen[2]) / 2.71  # decay^age, normalised
    assert torch.allclose(next(average.module.parameters()), expected, atol=1e-5)
    counts = [m.num_batches_tracked.item() for m in average.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert counts and set(counts) == {3}
