"""One training step of the VAE/GAN: Algorithm 1 of Larsen et al. 2016 (arXiv 1512.09300).

`train_step` does one forward pass of the networks, then gives each network the gradient of its
own objective only (the gradient routing of `adversarial_gradients`), then steps the optimizers.
Also here: the precision the step computes in, the optimizers, the decoder's weight average, and
which networks the step calls (channels-last, torch.compile, DistributedDataParallel).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

import losses
from config import AMP_DTYPES, LossConfig
from distributed import SINGLE, Replicas
from models import Networks

# The loss terms each model computes; a NaN or infinity in one of them stops the run.
LOSS_TERMS = {"vaegan": ("loss_prior", "loss_llike", "loss_gan", "loss_dec_gan"), "vae": ("loss_prior", "loss_llike"),
              "vae-disl": ("loss_prior", "loss_llike", "loss_gan"), "gan": ("loss_gan", "loss_dec_gan")}


@dataclass
class Precision:
    """How the step computes: autocast dtype (None: float32) and, for float16, loss scaling."""
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self, device_type: str) -> torch.autocast:
        return torch.autocast(device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss multiplied by the current loss scale (float16), else unchanged."""
        return self.scaler.scale(loss) if self.scaler is not None else loss


FLOAT32 = Precision()


def build_optimizers(nets: Networks, lr: float, alpha: float) -> dict[str, torch.optim.Optimizer]:
    """One RMSprop per network."""
    return {name: torch.optim.RMSprop(module.parameters(), lr=lr, alpha=alpha) for name, module in nets.modules().items()}


def weight_average(decoder: nn.Module, decay: float) -> AveragedModel | None:
    """A moving average of the decoder's weights and BatchNorm statistics (None for decay 0), updated
    after each step by `update_parameters`. A GAN's generator wanders around a good solution as the
    discriminator moves; the average sits nearer its centre."""
    if decay == 0:
        return None
    return AveragedModel(decoder, multi_avg_fn=debiased_ema(decay), use_buffers=True)


def debiased_ema(decay: float) -> Callable:
    """AveragedModel's update: after n steps, every step's weights weighted by decay^(steps since),
    normalised to sum to 1, so that early in a run the average is not dominated by the initial weights."""
    @torch.no_grad()
    def update(averages: list[torch.Tensor], currents: list[torch.Tensor], steps_before: torch.Tensor) -> None:
        weight = (1 - decay) / (1 - decay ** (steps_before.float() + 1))  # a tensor: no device sync (MPS: no float64)
        for average, current in zip(averages, currents):
            if average.is_floating_point():
                average.lerp_(current, weight.to(average.dtype))
            else:  # BatchNorm's count of batches
                average.copy_(current)
    return update


def fast_paths(nets: Networks, amp: str, channels_last: bool, compile: bool, device: torch.device,
               replicas: Replicas = SINGLE) -> tuple[Networks, Precision, list[str]]:
    """The networks the step should call and its precision, per --amp, --channels-last and --compile
    (and, under torchrun, wrapped in DistributedDataParallel).

    Returns notes that say what was switched on, or why a path fell back.
    """
    notes, dtype, scaler = [], AMP_DTYPES[amp], None
    if dtype is torch.float16:
        try:
            scaler = torch.amp.GradScaler(device.type)
        except (RuntimeError, ValueError) as error:
            notes.append(f"--amp fp16 falls back to float32: no loss scaling on {device.type} ({error})")
            dtype = None
    if channels_last:
        for module in nets.modules().values():
            module.to(memory_format=torch.channels_last)
        notes.append("channels-last memory format")
    step_nets = Networks(**{name: replicas.wrap(m) for name, m in nets.modules().items()})
    if compile:
        torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly, with a warning
        torch._functorch.config.donated_buffer = False  # the step walks some graphs backward twice (retain_graph)
        step_nets = Networks(**{name: torch.compile(m) for name, m in step_nets.modules().items()})
        notes.append("torch.compile: the first steps are slow while the networks compile")
    return step_nets, Precision(dtype, scaler), notes


def equilibrium_gate(bce_real: float, bce_fake: float, cfg: LossConfig) -> tuple[bool, bool]:
    """The authors' rule: (update the discriminator?, update the decoder?) from this batch's BCEs.

    With dis_gate "both" the discriminator pauses only while it wins on real and generated images
    alike: under the authors' "either", a discriminator sure of the real images stops learning even
    while the decoder fools it on every generated one, and the decoder can then collapse onto what
    fools the frozen discriminator.
    """
    if cfg.equilibrium is None:
        return True, True
    low = (bce_real < cfg.equilibrium - cfg.margin, bce_fake < cfg.equilibrium - cfg.margin)
    update_dis = not (all(low) if cfg.dis_gate == "both" else any(low))
    update_dec = not (bce_real > cfg.equilibrium + cfg.margin or bce_fake > cfg.equilibrium + cfg.margin)
    if not (update_dis or update_dec):
        return True, True
    return update_dis, update_dec


def backward_into(params: list[nn.Parameter], outputs: list[torch.Tensor],
                  grad_outputs: list[torch.Tensor] | None = None, retain_graph: bool = False) -> None:
    """Set the .grad of `params` (and only theirs) to the gradient of `outputs`.

    torch.autograd.backward with `inputs` accumulates into those parameters alone, so that
    DistributedDataParallel's hooks fire and average them across processes.
    """
    torch.autograd.backward(outputs, grad_outputs, retain_graph=retain_graph, inputs=params)


def compute_gradients(nets: Networks, x: torch.Tensor, cfg: LossConfig,
                      noise: tuple[torch.Tensor, torch.Tensor] | None = None,
                      precision: Precision = FLOAT32, replicas: Replicas = SINGLE,
                      labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One forward pass, then set each network's .grad from its own loss (None if not updated).

    `noise` = (eps for the reparameterisation, z_p for prior samples); drawn if None.
    `labels`: the batch's label vectors y, for conditional networks; every network sees them (the
    prior samples are drawn for the batch's labels too), and the routing is the same.
    With a loss scaler the gradients are those of the scaled losses (the scaler unscales them).
    Under torchrun the gate decides from statistics averaged over `replicas`.
    Returns the step's statistics as 0-d tensors (NaN for what the model does not have).
    """
    for module in nets.modules().values():
        module.zero_grad(set_to_none=True)  # free the last step's gradients first
    decoder = getattr(nets.decoder, "module", nets.decoder)  # the Decoder inside a DDP wrapper
    eps, z_prior = noise if noise is not None else torch.randn(2, len(x), decoder.latent_dim, device=x.device)
    if cfg.model == "vae":
        return vae_gradients(nets, x, eps, precision, labels)
    return adversarial_gradients(nets, x, cfg, eps, z_prior, precision, replicas, labels)


def vae_gradients(nets: Networks, x: torch.Tensor, eps: torch.Tensor, precision: Precision,
                  y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The plain VAE: encoder <- grad(L_prior + L_llike^pixel), decoder <- grad(L_llike^pixel)."""
    with precision.autocast(x.device.type):
        mean, logvar = nets.encoder(x, y)
        recon = nets.decoder(losses.reparameterize(mean, logvar, eps), y)
    loss_prior = losses.kl_divergence(at_least_float32(mean), at_least_float32(logvar))
    loss_llike = losses.pixel_nll(at_least_float32(recon), x)
    params = [p for m in nets.modules().values() for p in m.parameters()]
    # L_prior does not depend on the decoder, so one backward pass gives each network its own loss's gradient.
    backward_into(params, [precision.scaled(loss_prior + loss_llike)])
    nan = torch.tensor(math.nan)
    with torch.no_grad():
        return {"loss_prior": loss_prior, "loss_llike": loss_llike, "loss_gan": nan, "loss_dec_gan": nan,
                "bce_real": nan, "bce_fake": nan, "d_real": nan, "d_recon": nan, "d_prior": nan,
                "recon_mse": (recon.float() - x).pow(2).mean(), "update_dis": nan, "update_dec": torch.tensor(1.0)}


def adversarial_forward(nets: Networks, x: torch.Tensor, eps: torch.Tensor, z_prior: torch.Tensor,
                        precision: Precision, y: torch.Tensor | None
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of every network: (mean, logvar) of q(z|x) (None, None without an encoder), the
    generated images [x~,] x_p, and the discriminator's logits and Dis_l on x, [x~,] x_p.

    The decoder takes x~ and x_p as two batches, so BatchNorm normalises the prior samples by their
    own statistics, as when sampling: the GAN term then trains the images the grids show."""
    mean = logvar = None
    with precision.autocast(x.device.type):
        if nets.encoder is not None:
            mean, logvar = nets.encoder(x, y)                             # (n, latent) each
            generated = torch.cat([nets.decoder(losses.reparameterize(mean, logvar, eps), y),
                                   nets.decoder(z_prior, y)])  # (2n, C, S, S): x~, x_p
        else:
            generated = nets.decoder(z_prior, y)                # (n, C, S, S): x_p
        code_labels = None if y is None else y.repeat(len(generated) // len(x), 1)  # x~ and x_p have x's labels
        logits, dis_l = nets.discriminator(x, generated,        # one pass over x, [x~,] x_p
                                           labels=None if y is None else torch.cat([y, code_labels]))
    return mean, logvar, generated, at_least_float32(logits), at_least_float32(dis_l)


def adversarial_gradients(nets: Networks, x: torch.Tensor, cfg: LossConfig, eps: torch.Tensor, z_prior: torch.Tensor,
                          precision: Precision, replicas: Replicas, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The models with a discriminator (Algorithm 1 for vaegan):

    Encoder       <- grad(L_prior + llike_weight * L_llike)                  (vaegan, vae-disl)
    Decoder       <- grad(gamma * L_llike + (1 - gamma) * decoder GAN term)  (vaegan; if the gate allows)
                     grad(L_llike)                                            (vae-disl: no GAN gradient, no gate)
                     grad(decoder GAN term)                                   (gan; if the gate allows)
    Discriminator <- grad(L_GAN)                                              (if the gate allows)
    """
    n, has_encoder = len(x), nets.encoder is not None
    dec_llike_weight, dec_gan_weight = {"vaegan": (cfg.gamma, 1.0 - cfg.gamma), "vae-disl": (1.0, 0.0),
                                        "gan": (0.0, 1.0)}[cfg.model]
    mean, logvar, generated, logits, dis_l = adversarial_forward(nets, x, eps, z_prior, precision, y)
    logits_real, logits_fake = logits[:n], logits[n:]
    loss_gan = losses.discriminator_loss(logits_real, logits_fake, cfg.real_weight)
    loss_dec_gan = losses.decoder_gan_loss(logits_real, logits_fake, cfg.real_weight, cfg.gan_loss)
    with torch.no_grad():  # averaged over processes, so that all of them take the same decisions
        bce = replicas.average(torch.stack([losses.bce_real(logits_real), losses.bce_fake(logits_fake)])).tolist()
    if cfg.model == "vae-disl":
        update_dis = update_dec = True  # no GAN game to balance: the discriminator simply trains on L_GAN
    else:
        update_dis, update_dec = equilibrium_gate(*bce, cfg)

    # The image gradients (with respect to `generated`) are routed by hand: the backward passes
    # through the discriminator stop at the images and do not enter the decoder.
    # Discriminator <- grad L_GAN. For the minimax loss the decoder's GAN term is -L_GAN, so the
    # same backward pass also yields its image gradient.
    needs_gan_images = update_dec and dec_gan_weight > 0
    reuse = update_dis and needs_gan_images and cfg.gan_loss == "minimax"
    grad_gan_images = None
    if update_dis:
        dis_params = list(nets.discriminator.parameters())
        backward_into(dis_params + [generated] if reuse else dis_params, [precision.scaled(loss_gan)],
                      retain_graph=True)
        grad_gan_images = -generated.grad if reuse else None
    if needs_gan_images and grad_gan_images is None:
        grad_gan_images, = torch.autograd.grad(precision.scaled(loss_dec_gan), generated, retain_graph=has_encoder)
    upstream = dec_gan_weight * grad_gan_images if needs_gan_images else torch.zeros_like(generated)

    losses_vae = {"loss_prior": torch.tensor(math.nan), "loss_llike": torch.tensor(math.nan)}
    if has_encoder:
        loss_prior = losses.kl_divergence(at_least_float32(mean), at_least_float32(logvar))
        loss_llike = losses.feature_nll(dis_l[n:2 * n], dis_l[:n])
        losses_vae = {"loss_prior": loss_prior, "loss_llike": loss_llike}
        # Image gradient of L_llike: through the discriminator, which it must not train.
        grad_llike_images, = torch.autograd.grad(precision.scaled(loss_llike), generated)
        upstream = upstream + dec_llike_weight * grad_llike_images
    # Decoder <- its objective, through the generated images.
    if update_dec:
        dec_params = list(nets.decoder.parameters())
        backward_into(dec_params, [generated], [upstream.to(generated.dtype)], retain_graph=has_encoder)
    # Encoder <- grad(L_prior + llike_weight * L_llike): L_llike reaches it through the decoder, no GAN term does.
    if has_encoder:
        enc_params = list(nets.encoder.parameters())
        backward_into(enc_params, [precision.scaled(loss_prior), generated],
                      [torch.ones_like(loss_prior), (cfg.llike_weight * grad_llike_images).to(generated.dtype)])
    return {**losses_vae, "loss_gan": loss_gan, "loss_dec_gan": loss_dec_gan,
            **adversarial_stats(x, generated, logits, bce, has_encoder),
            "update_dis": torch.tensor(float(update_dis)), "update_dec": torch.tensor(float(update_dec))}


@torch.no_grad()
def adversarial_stats(x: torch.Tensor, generated: torch.Tensor, logits: torch.Tensor, bce: list[float],
                      has_encoder: bool) -> dict[str, torch.Tensor]:
    """What the step reports besides its losses: the gate's BCEs, D's mean rating of x, x~ and x_p
    (x~ NaN without an encoder), and the reconstructions' pixel MSE."""
    n = len(x)
    probability = torch.sigmoid(logits)
    recon, prior = (probability[n:2 * n], probability[2 * n:]) if has_encoder else (probability[:0], probability[n:])
    return {"bce_real": torch.tensor(bce[0]), "bce_fake": torch.tensor(bce[1]),
            "d_real": probability[:n].mean(), "d_recon": recon.mean(), "d_prior": prior.mean(),
            "recon_mse": (generated[:n].float() - x).pow(2).mean() if has_encoder else torch.tensor(math.nan)}


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Losses are computed in float32 at least, whatever the autocast dtype."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def train_step(nets: Networks, optimizers: dict[str, torch.optim.Optimizer], x: torch.Tensor, cfg: LossConfig,
               noise: tuple[torch.Tensor, torch.Tensor] | None = None, precision: Precision = FLOAT32,
               replicas: Replicas = SINGLE, labels: torch.Tensor | None = None) -> dict[str, float]:
    """Compute every gradient (averaged over processes under torchrun), then step the optimizers
    of the networks that got one. The statistics returned are averaged over processes too.
    `labels`: the batch's label vectors, for conditional networks."""
    stats = compute_gradients(nets, x, cfg, noise, precision, replicas, labels)
    replicas.average_gradients(list(nets.modules().values()))
    for name, module in nets.modules().items():
        if next(module.parameters()).grad is not None:
            if precision.scaler is not None:
                precision.scaler.step(optimizers[name])  # unscales; skips the step if a gradient overflowed
            else:
                optimizers[name].step()
    if precision.scaler is not None:
        precision.scaler.update()
    values = replicas.average(torch.stack([v.to(x.device, torch.float32) for v in stats.values()])).tolist()
    return dict(zip(stats, values))
