"""Train a VAE/GAN (Larsen et al. 2016, arXiv 1512.09300): the command line and the loop.

    python3 main.py --dataset mnist

One training step is `train_step`: one forward pass of the three networks, then each
network's gradient from its own loss only (Algorithm 1), then the optimizer steps.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.nn as nn

import data
import distributed
import losses
import utils
from distributed import SINGLE, Replicas
from models import ConfigError, Decoder, Discriminator, Encoder, ModelConfig, count_parameters

# Values a preset fills in when the command line leaves them out: `paper` is the paper's
# 64x64 network; `cpu` a reduced one that shows digits within minutes on a CPU, its values
# chosen from real MNIST runs (see the README).
PRESETS = {
    "paper": dict(image_size=64, width=1.0, epochs=25),
    "cpu": dict(image_size=32, width=0.25, epochs=5),
}
SAMPLE_GRID = 64          # prior samples in each sample grid (8x8)
RECONSTRUCTION_PAIRS = 32  # held-out images (and their reconstructions) in each reconstruction grid
TIMING_STEPS = 10          # report the measured step time after this many steps
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
T = TypeVar("T")


class UsageError(Exception):
    """A command line that cannot run; the message says what to do instead."""


class TrainingDiverged(Exception):
    """A loss became NaN or infinite."""


class FollowerExit(Exception):
    """Under torchrun: rank 0 met an error (and reports it); the other processes leave quietly."""


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LossConfig:
    """How the losses are weighted and which updates the equilibrium rule allows."""
    gamma: float = 1e-5               # decoder: gamma * L_llike - (1 - gamma) * L_GAN
    real_weight: float = 0.5          # weight of the real-image part of L_GAN
    gan_loss: str = "minimax"         # or "nonsaturating"
    equilibrium: float | None = 0.68  # None: always update both
    margin: float = 0.35
    llike_weight: float = 1.0         # encoder: L_prior + llike_weight * L_llike
    model: str = "vaegan"             # which objectives: see MODELS


@dataclass
class TrainConfig:
    """Every setting of a run, resolved (config.json holds this)."""
    dataset: str = "mnist"
    model: str = "vaegan"
    data_root: str = "./data"
    out: str = ""
    preset: str = "auto"
    image_size: int = 64
    channels: int = 1
    latent_dim: int = 128
    width: float = 1.0
    recon_layer: int = 4
    batch_size: int = 64
    lr: float = 3e-4
    rmsprop_alpha: float = 0.9
    epochs: int = 25
    max_steps: int | None = None
    gamma: float = 1e-5
    real_weight: float = 0.5
    gan_loss: str = "minimax"
    equilibrium: float | None = 0.68
    margin: float = 0.35
    llike_weight: float = 1.0
    sample_every: int = 0
    checkpoint_every: int = 0
    detect_anomaly: bool = False
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    overwrite: bool = False

    def model_config(self) -> ModelConfig:
        return ModelConfig(self.image_size, self.channels, self.latent_dim, self.width, self.recon_layer)

    def loss_config(self) -> LossConfig:
        return LossConfig(self.gamma, self.real_weight, self.gan_loss, self.equilibrium, self.margin,
                          self.llike_weight, self.model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Train a VAE/GAN (Larsen et al. 2016) and write sample grids, reconstruction grids, "
                    "loss plots, metrics.csv and a checkpoint.",
        epilog="Training is the default (`main.py train ...` is the same). On a trained checkpoint: "
               "main.py sample|reconstruct|interpolate|attributes|evaluate --checkpoint RUN_DIR ... "
               "(each has its own --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    preset_help = "values from --preset"
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", choices=sorted(data.DATASETS), help="what to train on")
    g.add_argument("--data-root", default="./data", help="where datasets are read or downloaded (folder: the image folder)")
    g.add_argument("--image-size", type=int, help=f"square image side, a multiple of 8 from 16 ({preset_help})")
    g.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3; only for --dataset folder (default 3)")
    g.add_argument("--num-workers", type=int, default=2, help="loader processes for file datasets")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vaegan", choices=list(MODELS),
                   help="vaegan (the paper), or a baseline: vae (pixel error), vae-disl (Dis_l error, no GAN "
                        "gradient to the decoder), gan (no encoder)")
    g.add_argument("--preset", default="auto", choices=("auto", "paper", "cpu"),
                   help="auto: paper on CUDA/MPS, cpu on a CPU; explicit flags always win")
    g.add_argument("--latent-dim", type=int, default=128, help="size of z")
    g.add_argument("--width", type=float, help=f"multiplies every channel and hidden-unit count ({preset_help})")
    g.add_argument("--recon-layer", type=int, default=4, help="discriminator convolution (1-4) whose output is Dis_l")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=64, help="images per step")
    g.add_argument("--lr", type=float, default=3e-4, help="RMSprop learning rate of all three networks")
    g.add_argument("--rmsprop-alpha", type=float, default=0.9, help="RMSprop smoothing constant")
    g.add_argument("--epochs", type=int, help=f"passes over the training split ({preset_help})")
    g.add_argument("--max-steps", type=int, help="stop after this many steps in all")
    g.add_argument("--gamma", type=float, default=1e-5, help="decoder weight of L_llike against L_GAN")
    g.add_argument("--llike-weight", type=float, default=1.0, help="encoder weight of L_llike; below 1 is a stronger prior")
    g.add_argument("--real-weight", type=float, default=0.5, help="weight of real images in L_GAN")
    g.add_argument("--gan-loss", default="minimax", choices=losses.GAN_LOSSES, help="decoder's GAN objective")
    g.add_argument("--equilibrium", type=float, default=0.68, help="centre of the BCE band that gates updates")
    g.add_argument("--margin", type=float, default=0.35, help="half-width of that band")
    g.add_argument("--no-equilibrium", action="store_true", help="update both networks every step")
    g.add_argument("--seed", type=int, default=0, help="makes a run repeatable")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto: CUDA, then MPS, then CPU)")
    g.add_argument("--amp", default="off", choices=AMP_DTYPES, help="mixed precision (fp16 with loss scaling)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="NHWC memory format for the networks and images (default: on for the CPU, where it measured "
                        "up to 1.23x faster, off elsewhere)")
    g.add_argument("--compile", action="store_true", help="torch.compile the three networks (falls back to eager)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over all processes' images (SyncBatchNorm)")
    g.add_argument("--grad-sync", default="auto", choices=("auto", *distributed.GRAD_SYNCS),
                   help="under torchrun, how gradients are averaged: DDP's hooks or bucketed all-reduces "
                        "(auto: allreduce on the CPU, ddp on CUDA)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default: runs/<dataset>-<date-time>)")
    g.add_argument("--sample-every", type=int, default=0, help="also write grids every N steps (0: each epoch only)")
    g.add_argument("--overwrite", action="store_true", help="reuse an --out folder that already holds a run")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="also save checkpoint.pt every N steps (0: at each epoch end only)")
    g.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="continue a run exactly where its checkpoint left it, in the same folder")
    g.add_argument("--detect-anomaly", action="store_true", help="torch.autograd anomaly detection (slow; for debugging)")
    return p


def resolve_device(name: str) -> torch.device:
    """auto: CUDA, then MPS, then CPU; UsageError for a device this machine lacks."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name} asks for a GPU, but PyTorch finds no CUDA GPU here; use --device cpu or auto.")
        if (device.index or 0) >= count:
            raise UsageError(f"--device {name} does not exist: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps asks for Apple's GPU, which PyTorch cannot use here; use --device cpu or auto.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps.")
    return device


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def default_channels_last(device: torch.device) -> bool:
    """NHWC on the CPU, where oneDNN's convolutions ran the step up to 1.23x faster (README); GPUs keep NCHW."""
    return device.type == "cpu"


def glibc() -> ctypes.CDLL | None:
    """The C library if it is GNU's (Linux), whose malloc can be tuned; else None."""
    try:
        is_glibc = bool(os.confstr("CS_GNU_LIBC_VERSION"))  # "glibc 2.36"; None or an error elsewhere
    except (ValueError, OSError, AttributeError):
        return None
    return ctypes.CDLL(None) if is_glibc else None


def keep_freed_memory(device: torch.device, keep: bool = True) -> bool:
    """Training on a CPU under glibc: allocate from malloc's heap and keep freed memory for reuse.

    By default glibc serves large blocks (the activations) with fresh pages from the kernel and
    returns them when they are freed, so every step page-faults and zeroes the same buffers
    again. Keeping them made the paper network's CPU step 1.3x faster here, for about 15% more
    resident memory, which then stays at its peak (README, Speed). keep=False instead maps
    every block from 128 KiB up on its own and returns it when freed, so that resident memory
    follows the tensors alive (bench.py measures peak memory so). Returns whether it applied.
    """
    libc = glibc() if device.type == "cpu" else None
    if libc is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
    if keep:
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)) and bool(libc.mallopt(M_MMAP_MAX, 1 << 20))


def resolve_config(args: argparse.Namespace, device: torch.device) -> tuple[TrainConfig, str]:
    """Fill preset values the command line left out; returns the config and a line saying what was chosen."""
    preset = args.preset if args.preset != "auto" else ("cpu" if device.type == "cpu" else "paper")
    chosen = {key: getattr(args, key) if getattr(args, key) is not None else value
              for key, value in PRESETS[preset].items()}
    spec = data.DATASETS[args.dataset]
    if args.channels is not None and spec.channels is not None and args.channels != spec.channels:
        raise UsageError(f"--channels {args.channels} does not fit {args.dataset}, whose images have "
                         f"{spec.channels} channel(s); leave --channels out (it is for --dataset folder).")
    given = {f.name for f in fields(TrainConfig)} & vars(args).keys()
    cfg = TrainConfig(**{**{k: getattr(args, k) for k in given}, **chosen,
                         "preset": preset, "device": str(device),
                         "channels_last": default_channels_last(device) if args.channels_last is None
                         else args.channels_last,
                         "channels": spec.channels or args.channels or 3,
                         "equilibrium": None if args.no_equilibrium else args.equilibrium,
                         "out": args.out or f"runs/{args.dataset}-{datetime.now():%Y%m%d-%H%M%S}"})
    validate(cfg)
    why = f"auto on {device.type}" if args.preset == "auto" else "asked for"
    values = ", ".join(f"{key.replace('_', ' ')} {getattr(cfg, key):g}" for key in PRESETS[preset])
    other = {"paper": "--preset cpu gives the reduced CPU configuration",
             "cpu": "--preset paper gives the paper's 64x64 network"}[preset]
    return cfg, f"preset {preset} ({why}): {values}; {other}; explicit flags win."


def validate(cfg: TrainConfig) -> None:
    """UsageError for values the networks or losses cannot use."""
    cfg.model_config()  # raises ConfigError for sizes, widths and layers
    checks = [
        (cfg.batch_size >= 2, f"--batch-size {cfg.batch_size} is too small: BatchNorm needs at least 2 images per batch (the paper uses 64)."),
        (cfg.lr > 0, f"--lr {cfg.lr} must be positive (the paper uses 3e-4)."),
        (0 <= cfg.rmsprop_alpha < 1, f"--rmsprop-alpha {cfg.rmsprop_alpha} must be in [0, 1) (the authors use 0.9)."),
        (cfg.epochs >= 1, f"--epochs {cfg.epochs} must be at least 1."),
        (cfg.max_steps is None or cfg.max_steps >= 1, f"--max-steps {cfg.max_steps} must be at least 1."),
        (0 <= cfg.gamma <= 1, f"--gamma {cfg.gamma} must be in [0, 1] (the paper uses 1e-5)."),
        (0 < cfg.real_weight < 1, f"--real-weight {cfg.real_weight} must be strictly between 0 and 1 (default 0.5)."),
        (cfg.margin >= 0, f"--margin {cfg.margin} must not be negative (default 0.35)."),
        (cfg.llike_weight >= 0, f"--llike-weight {cfg.llike_weight} must not be negative (1 is the paper's)."),
        (cfg.sample_every >= 0, f"--sample-every {cfg.sample_every} must not be negative (0 turns it off)."),
        (cfg.checkpoint_every >= 0, f"--checkpoint-every {cfg.checkpoint_every} must not be negative (0: epoch ends only)."),
        (cfg.num_workers >= 0, f"--num-workers {cfg.num_workers} must not be negative."),
        (all(math.isfinite(v) for v in (cfg.lr, cfg.gamma, cfg.real_weight, cfg.margin, cfg.llike_weight,
                                         cfg.equilibrium or 0.0)),
         "--lr, --gamma, --real-weight, --margin, --llike-weight and --equilibrium must be finite numbers."),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


# ---------------------------------------------------------------------------
# The training step (Algorithm 1)
# ---------------------------------------------------------------------------

MODELS = {  # --model: the networks it owns (only these are built, saved and updated)
    "vaegan": ("encoder", "decoder", "discriminator"),   # the paper's method
    "vae": ("encoder", "decoder"),                       # element-wise (pixel) reconstruction error
    "vae-disl": ("encoder", "decoder", "discriminator"), # Dis_l error, but no GAN gradient to the decoder
    "gan": ("decoder", "discriminator"),                 # the decoder as a plain GAN generator
}


@dataclass
class Networks:
    decoder: Decoder
    encoder: Encoder | None = None
    discriminator: Discriminator | None = None

    def modules(self) -> dict[str, nn.Module]:
        """The networks present, by name, in a fixed order."""
        named = {"encoder": self.encoder, "decoder": self.decoder, "discriminator": self.discriminator}
        return {name: module for name, module in named.items() if module is not None}


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


def build_networks(cfg: ModelConfig, device: torch.device | str = "cpu", model: str = "vaegan") -> Networks:
    """The networks that `model` owns."""
    classes = {"encoder": Encoder, "decoder": Decoder, "discriminator": Discriminator}
    return Networks(**{name: classes[name](cfg).to(device) for name in MODELS[model]})


def build_optimizers(nets: Networks, lr: float, alpha: float) -> dict[str, torch.optim.Optimizer]:
    """One RMSprop per network."""
    return {name: torch.optim.RMSprop(module.parameters(), lr=lr, alpha=alpha) for name, module in nets.modules().items()}


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
    if dtype is not None:
        notes.append(f"mixed precision: autocast to {amp}" + (" with dynamic loss scaling" if scaler else ""))
    if channels_last:
        for module in nets.modules().values():
            module.to(memory_format=torch.channels_last)
        notes.append("channels-last memory format")
    step_nets = Networks(**{name: replicas.wrap(m) for name, m in nets.modules().items()})
    if compile:
        from torch import _dynamo
        _dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly, with a warning
        step_nets = Networks(**{name: torch.compile(m) for name, m in step_nets.modules().items()})
        notes.append("torch.compile: the first steps are slow while the networks compile")
    return step_nets, Precision(dtype, scaler), notes


def equilibrium_gate(bce_real: float, bce_fake: float, cfg: LossConfig) -> tuple[bool, bool]:
    """The authors' rule: (update the discriminator?, update the decoder?) from this batch's BCEs."""
    if cfg.equilibrium is None:
        return True, True
    update_dis = not (bce_real < cfg.equilibrium - cfg.margin or bce_fake < cfg.equilibrium - cfg.margin)
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
                      precision: Precision = FLOAT32, replicas: Replicas = SINGLE) -> dict[str, torch.Tensor]:
    """One forward pass, then set each network's .grad from its own loss (None if not updated).

    `noise` = (eps for the reparameterisation, z_p for prior samples); drawn if None.
    With a loss scaler the gradients are those of the scaled losses (the scaler unscales them).
    Under torchrun the gate decides from statistics averaged over `replicas`.
    Returns the step's statistics as 0-d tensors (NaN for what the model does not have).
    """
    for module in nets.modules().values():
        module.zero_grad(set_to_none=True)  # free the last step's gradients first
    decoder = getattr(nets.decoder, "module", nets.decoder)  # the Decoder inside a DDP wrapper
    eps, z_prior = noise if noise is not None else torch.randn(2, len(x), decoder.latent_dim, device=x.device)
    if cfg.model == "vae":
        return vae_gradients(nets, x, eps, precision)
    return adversarial_gradients(nets, x, cfg, eps, z_prior, precision, replicas)


def vae_gradients(nets: Networks, x: torch.Tensor, eps: torch.Tensor, precision: Precision) -> dict[str, torch.Tensor]:
    """The plain VAE: encoder <- grad(L_prior + L_llike^pixel), decoder <- grad(L_llike^pixel)."""
    with precision.autocast(x.device.type):
        mean, logvar = nets.encoder(x)
        recon = nets.decoder(losses.reparameterize(mean, logvar, eps))
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


def adversarial_gradients(nets: Networks, x: torch.Tensor, cfg: LossConfig, eps: torch.Tensor,
                          z_prior: torch.Tensor, precision: Precision, replicas: Replicas) -> dict[str, torch.Tensor]:
    """The models with a discriminator (Algorithm 1 for vaegan):

    Encoder       <- grad(L_prior + llike_weight * L_llike)                  (vaegan, vae-disl)
    Decoder       <- grad(gamma * L_llike + (1 - gamma) * decoder GAN term)  (vaegan; if the gate allows)
                     grad(L_llike)                                            (vae-disl: no GAN gradient, no gate)
                     grad(decoder GAN term)                                   (gan; if the gate allows)
    Discriminator <- grad(L_GAN)                                              (if the gate allows)
    """
    n = len(x)
    has_encoder = nets.encoder is not None
    dec_llike_weight, dec_gan_weight = {"vaegan": (cfg.gamma, 1.0 - cfg.gamma), "vae-disl": (1.0, 0.0),
                                        "gan": (0.0, 1.0)}[cfg.model]
    with precision.autocast(x.device.type):
        if has_encoder:
            mean, logvar = nets.encoder(x)                                # (n, latent) each
            codes = torch.cat([losses.reparameterize(mean, logvar, eps), z_prior])
        else:
            codes = z_prior
        generated = nets.decoder(codes)                         # (2n or n, C, S, S): [x~,] x_p
        logits, dis_l = nets.discriminator(x, generated)        # one pass over x, [x~,] x_p
    logits, dis_l = at_least_float32(logits), at_least_float32(dis_l)
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

    stats = {"loss_prior": torch.tensor(math.nan), "loss_llike": torch.tensor(math.nan)}
    if has_encoder:
        loss_prior = losses.kl_divergence(at_least_float32(mean), at_least_float32(logvar))
        loss_llike = losses.feature_nll(dis_l[n:2 * n], dis_l[:n])
        stats = {"loss_prior": loss_prior, "loss_llike": loss_llike}
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

    with torch.no_grad():
        probability = torch.sigmoid(logits)
        recon, prior = (probability[n:2 * n], probability[2 * n:]) if has_encoder else (probability[:0], probability[n:])
        return {
            **stats, "loss_gan": loss_gan, "loss_dec_gan": loss_dec_gan,
            "bce_real": torch.tensor(bce[0]), "bce_fake": torch.tensor(bce[1]),
            "d_real": probability[:n].mean(), "d_recon": recon.mean(), "d_prior": prior.mean(),
            "recon_mse": (generated[:n].float() - x).pow(2).mean() if has_encoder else torch.tensor(math.nan),
            "update_dis": torch.tensor(float(update_dis)), "update_dec": torch.tensor(float(update_dec)),
        }


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Losses are computed in float32 at least, whatever the autocast dtype."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def train_step(nets: Networks, optimizers: dict[str, torch.optim.Optimizer], x: torch.Tensor, cfg: LossConfig,
               noise: tuple[torch.Tensor, torch.Tensor] | None = None, precision: Precision = FLOAT32,
               replicas: Replicas = SINGLE) -> dict[str, float]:
    """Compute every gradient (averaged over processes under torchrun), then step the optimizers
    of the networks that got one. The statistics returned are averaged over processes too."""
    stats = compute_gradients(nets, x, cfg, noise, precision, replicas)
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


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------

@torch.no_grad()
def decode_with_batch_statistics(decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    """Decode with BatchNorm normalising by this batch's statistics, leaving the running ones untouched.

    Prior samples look better this way than with the running averages (measured; see the README).
    """
    norms = [m for m in decoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = decoder.training
    decoder.train()
    for m in norms:
        m.track_running_stats = False
    try:
        return decoder(z)
    finally:
        for m in norms:
            m.track_running_stats = True
        decoder.train(was_training)


@torch.no_grad()
def reconstruct(nets: Networks, x: torch.Tensor) -> torch.Tensor:
    """Dec(mean of q(z|x)) with the networks in evaluation mode."""
    nets.encoder.eval()
    nets.decoder.eval()
    try:
        mean, _ = nets.encoder(x)
        return nets.decoder(mean)
    finally:
        nets.encoder.train()
        nets.decoder.train()


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def prepare_out_dir(cfg: TrainConfig, resuming: bool) -> Path:
    """Create the run folder; refuse one that holds another run unless resuming or --overwrite."""
    out = Path(cfg.out).expanduser()
    if (out / "config.json").exists() and not (resuming or cfg.overwrite):
        raise UsageError(f"{out} already holds a run (its config.json is there); continue it with "
                         f"--resume {out}, choose another --out, or add --overwrite to replace it.")
    try:
        for sub in ("", "samples", "reconstructions", "plots"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write into --out {out} ({error.strerror}); choose a writable folder.") from None
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_grids(nets: Networks, out: Path, tag: str, fixed_z: torch.Tensor, heldout: torch.Tensor,
                write: bool = True) -> None:
    """The sample grid of `fixed_z` and the held-out reconstruction grid (computed; saved if `write`)."""
    samples = decode_with_batch_statistics(nets.decoder, fixed_z)
    pairs = utils.interleave(heldout, reconstruct(nets, heldout)) if len(heldout) and nets.encoder is not None else None
    if write:
        utils.save_grid(samples, out / "samples" / f"{tag}.png")
        if pairs is not None:
            utils.save_grid(pairs, out / "reconstructions" / f"{tag}.png")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


BAR_FIELDS = [("loss_prior", "KL", ".1f"), ("loss_llike", "llike", ".1f"), ("loss_gan", "GAN", ".2f"),
              ("d_real", "D(x)", ".2f")]
SUMMARY_FIELDS = [("loss_prior", "L_prior", ".2f"), ("loss_llike", "L_llike", ".2f"), ("loss_gan", "L_GAN", ".3f"),
                  ("recon_mse", "pixel MSE", ".4f"), ("d_real", "D(x)", ".2f"), ("d_recon", "D(x~)", ".2f"),
                  ("d_prior", "D(x_p)", ".2f"), ("update_dis", "D updated", ".0%"), ("update_dec", "Dec updated", ".0%")]


def epoch_summary(epoch: int, cfg: TrainConfig, rows: list[dict[str, float]], seconds: float) -> str:
    """One line: steps, time and the epoch's mean of each figure the model has."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    figures = " ".join(f"{label} {mean[key]:{spec}}" for key, label, spec in SUMMARY_FIELDS if math.isfinite(mean[key]))
    return (f"epoch {epoch}/{cfg.epochs}: {len(rows)} steps in {format_duration(seconds)} "
            f"({seconds / len(rows):.3f} s/step) | {figures}")


class StopRequest:
    """SIGINT and SIGTERM ask the loop to save a checkpoint and stop after the current step.

    A second Ctrl-C stops at once (the last checkpoint on disk is kept).
    """
    EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self, quiet: bool = False) -> None:
        self.signum: int | None = None
        self.quiet = quiet  # under torchrun the processes other than rank 0 do not announce it
        self.previous = {s: signal.signal(s, self.handle) for s in self.EXIT_CODES}

    def handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to stop "
                  "at once, losing the steps since the last checkpoint)...", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = StopRequest.EXIT_CODES[signum]


def checkpoint_state(nets: Networks, optimizers: dict[str, torch.optim.Optimizer], cfg: TrainConfig,
                     step: int, epoch: int, epoch_batches: int, log: utils.MetricsLog) -> dict:
    """Everything a run needs to continue exactly: weights, optimizers, position, RNG, history."""
    return {"config": asdict(cfg), "step": step, "epoch": epoch, "epoch_batches": epoch_batches,
            **{name: m.state_dict() for name, m in nets.modules().items()},
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "rng": utils.rng_state(), "history": log.history()}


def load_networks(state: dict, nets: Networks) -> None:
    """Load a checkpoint's weights; CheckpointError if they were made for another model."""
    for name, module in nets.modules().items():
        if name not in state:
            raise utils.CheckpointError(f"the checkpoint holds no {name}, which its model needs; it is damaged or "
                                        "edited. Use a checkpoint written by this tool.")
        try:
            module.load_state_dict(state[name])
        except RuntimeError as error:
            raise utils.CheckpointError(
                f"the checkpoint's {name} does not fit the model its config describes ({str(error).splitlines()[0]}); "
                "it was made for another model or edited. Use a checkpoint written by this tool.") from None


def train(cfg: TrainConfig, preset_line: str = "", resume: dict | None = None,
          replicas: Replicas = SINGLE) -> Path:
    """Run the training loop described by `cfg`, from scratch or from a checkpoint; returns the run folder.

    Under torchrun every process runs this loop on its own shard; rank 0 alone prints and writes.
    """
    from tqdm import tqdm

    device = torch.device(cfg.device)
    say = print if replicas.is_main else (lambda *args, **kwargs: None)
    if cfg.sync_bn and replicas.active and device.type != "cuda":
        raise UsageError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU. Leave it out "
                         "(each process then normalises by the statistics of its own batch).")
    # Rank 0 first: it downloads what is missing, then the others read what it wrote.
    splits = rank_0_first(replicas, lambda: data.load_dataset(cfg.dataset, cfg.data_root, cfg.image_size,
                                                              cfg.channels), then_the_others=True)
    batches = data.Batches(splits.train, cfg.batch_size, cfg.image_size, device, cfg.seed, cfg.num_workers,
                           replicas.rank, replicas.world_size)
    if len(batches) == 0:
        each = f" for each of {replicas.world_size} processes" if replicas.active else ""
        raise UsageError(f"the training split has {len(splits.train)} images, fewer than --batch-size "
                         f"{cfg.batch_size}{each}; lower --batch-size or add images.")
    rank_0_first(replicas, lambda: prepare_out_dir(cfg, resuming=resume is not None), then_the_others=False)
    out = Path(cfg.out).expanduser()
    seed_everything(cfg.seed)  # the same initial weights in every process
    model_cfg, loss_cfg = cfg.model_config(), cfg.loss_config()
    nets = build_networks(model_cfg, device, cfg.model)
    sync_bn_note = convert_sync_batchnorm(nets, replicas) if cfg.sync_bn else ""
    optimizers = build_optimizers(nets, cfg.lr, cfg.rmsprop_alpha)
    step_nets, precision, fast_path_notes = fast_paths(nets, cfg.amp, cfg.channels_last, cfg.compile, device, replicas)
    layout = memory_format(cfg.channels_last)
    fixed_z = torch.randn(SAMPLE_GRID, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    heldout = data.heldout_images(splits.heldout, RECONSTRUCTION_PAIRS, cfg.image_size).to(device)
    counts = {name: count_parameters(m) for name, m in nets.modules().items()}
    step, epoch, epoch_batches = 0, 1, 0
    if resume is None:
        if replicas.is_main:
            utils.write_json({**asdict(cfg), "torch_version": torch.__version__, "parameters": counts,
                              "processes": replicas.world_size, "grad_sync": replicas.grad_sync,
                              "device_name": device_name(device)},
                             out / "config.json")
    else:
        load_networks(resume, nets)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(resume["optimizers"][name])
            for group in optimizer.param_groups:  # a changed --lr or --rmsprop-alpha wins over the saved one
                group.update(lr=cfg.lr, alpha=cfg.rmsprop_alpha)
        utils.set_rng_state(resume["rng"])
        if precision.scaler is not None and resume.get("scaler"):
            precision.scaler.load_state_dict(resume["scaler"])
        step, epoch, epoch_batches = resume["step"], resume["epoch"], resume["epoch_batches"]
        saved_processes = resume.get("processes", 1)
        if saved_processes != replicas.world_size:  # the same images done, in this run's (global) batches
            epoch_batches = epoch_batches * saved_processes // replicas.world_size
            say(f"note: the checkpoint was written by {saved_processes} process(es) and this run has "
                f"{replicas.world_size}: the rest of epoch {epoch} is shared out anew from batch {epoch_batches}")
    if replicas.rank > 0:  # its own noise (eps, z_p) in every other process
        seed_everything(cfg.seed + 1_000_003 * replicas.rank + step)
    log = utils.MetricsLog(out / "metrics.csv", resume["history"] if resume else None) if replicas.is_main else None
    if epoch_batches >= len(batches):  # the checkpoint was written at an epoch's end
        epoch, epoch_batches = epoch + 1, 0

    say(f"device: {device}" + (f" ({device_name(device)})" if device.type == "cuda" else ""))
    if replicas.active:
        say(f"processes: {replicas.world_size} ({dist_backend()}, gradients averaged by {replicas.grad_sync}), each on "
            f"its own shard with --batch-size {cfg.batch_size}: {replicas.world_size * cfg.batch_size} images per step "
            "in all")
    if preset_line:
        say(preset_line)
    say("parameters: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()))
    for note in fast_path_notes + [sync_bn_note] * bool(sync_bn_note):
        say(note)
    say(f"data: {cfg.dataset}, {len(splits.train):,} training images, {len(batches)} steps per epoch; writing to {out}")
    if resume is not None:
        say(f"resuming at step {step}: epoch {epoch}, batch {epoch_batches} of {len(batches)}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.autograd.set_detect_anomaly(cfg.detect_anomaly)

    def save(epoch_batches: int) -> None:
        if replicas.is_main:  # the replicas are identical, so one checkpoint serves them all
            state = checkpoint_state(nets, optimizers, cfg, step, epoch, epoch_batches, log)
            state["scaler"] = precision.scaler.state_dict() if precision.scaler is not None else {}
            state["processes"] = replicas.world_size
            log.flush()
            utils.save_checkpoint(state, out / "checkpoint.pt")

    def grids(tag: str) -> None:
        """Rank 0 writes the grids; with SyncBatchNorm every process computes them (its statistics gather over all)."""
        if replicas.is_main or cfg.sync_bn:
            write_grids(nets, out, tag, fixed_z, heldout, write=replicas.is_main)

    def write_outputs(tag: str, epoch_batches: int) -> None:
        """Grids, plots and checkpoint."""
        grids(tag)
        if replicas.is_main:
            utils.plot_metrics(log, out / "plots")
        save(epoch_batches)

    total_steps = min(cfg.epochs * len(batches), cfg.max_steps or math.inf)
    first_step, skipped, bar = step, 0, None
    stop = StopRequest(quiet=not replicas.is_main)
    try:
        for epoch in range(epoch, cfg.epochs + 1):
            position = epoch_batches if step == first_step else 0  # resume inside the first epoch only
            epoch_rows, epoch_start = [], time.perf_counter()
            bar = tqdm(total=max(0, min(len(batches) - position, total_steps - step)), desc=f"epoch {epoch}/{cfg.epochs}",
                       unit="step", dynamic_ncols=True, leave=False, disable=not replicas.is_main)
            batch_iter = batches.epoch(epoch, position)
            while step < total_steps:
                wait_start = time.perf_counter()
                x, dropped = next(batch_iter, (None, 0))
                if x is None:
                    break
                skipped += dropped
                position += 1
                if replicas.any(len(x) < 2):  # every process skips the step if one has no batch to train on
                    continue
                step_start = time.perf_counter()
                row = train_step(step_nets, optimizers, x.contiguous(memory_format=layout), loss_cfg,
                                 precision=precision, replicas=replicas)
                step += 1
                now = time.perf_counter()
                check_finite(row, cfg.model, step, out / "checkpoint.pt")
                row = {"step": step, "epoch": epoch, **row, "sec_per_step": now - step_start,
                       "data_wait": step_start - wait_start}
                if log is not None:
                    log.append(row)
                epoch_rows.append(row)
                bar.update(1)
                bar.set_postfix_str(" ".join(f"{label} {row[key]:{spec}}" for key, label, spec in BAR_FIELDS
                                             if math.isfinite(row[key])))
                if step == first_step + TIMING_STEPS + 2 and replicas.is_main:
                    per_step = float(np.median([r["sec_per_step"] + r["data_wait"] for r in epoch_rows[2:]]))
                    tqdm.write(f"measured {per_step:.3f} s/step: an epoch of {len(batches)} steps takes about "
                               f"{format_duration(per_step * len(batches))}, the remaining {total_steps - first_step} "
                               f"steps about {format_duration(per_step * (total_steps - first_step))}")
                if cfg.sample_every and step % cfg.sample_every == 0:
                    grids(f"step_{step:07d}")
                if replicas.any(stop.signum is not None):  # a signal to any process stops them all here
                    write_outputs(f"step_{step:07d}", position)  # show where it stopped
                    replicas.barrier()  # no process leaves before the checkpoint is on disk
                    signum = stop.signum or signal.SIGTERM
                    raise Stopped(signum, f"stopped at step {step} ({signal.Signals(signum).name}); "
                                  f"checkpoint saved. Continue with: {resume_command(out, replicas)}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save(position)
            bar.close()
            if not epoch_rows:
                break
            write_outputs(f"epoch_{epoch:03d}", position)
            say(epoch_summary(epoch, cfg, epoch_rows, time.perf_counter() - epoch_start), flush=True)
            if skipped:
                print(f"warning: skipped {skipped} unreadable image(s) so far" +
                      (f" (process {replicas.rank})" if replicas.active else ""), file=sys.stderr)
            if step >= total_steps:
                break
    finally:
        stop.restore()
        if bar is not None:
            bar.close()  # clears the progress line before any error message
        if log is not None:
            log.close()
    replicas.barrier()
    say(f"done: {step} steps; grids in {out / 'samples'} and {out / 'reconstructions'}, "
        f"plots in {out / 'plots'}, checkpoint {out / 'checkpoint.pt'}")
    return out


def rank_0_first(replicas: Replicas, action: Callable[[], T], then_the_others: bool) -> T | None:
    """Run `action` in rank 0 (alone, under torchrun); if it fails there, every process stops
    (rank 0 reports why). Then, if `then_the_others`, the other processes run it too."""
    result, failure = None, None
    if replicas.is_main:
        try:
            result = action()
        except (UsageError, data.DataError) as error:
            failure = error
    if replicas.any(failure is not None):
        raise failure or FollowerExit("rank 0 met an error and reports it")
    return action() if then_the_others and not replicas.is_main else result


def convert_sync_batchnorm(nets: Networks, replicas: Replicas) -> str:
    """--sync-bn: BatchNorm layers that normalise by all processes' statistics; returns a note."""
    if not replicas.active:
        return "note: --sync-bn has no effect in a single process"
    for name, module in nets.modules().items():
        setattr(nets, name, nn.SyncBatchNorm.convert_sync_batchnorm(module))
    return "SyncBatchNorm: BatchNorm statistics over all processes' images"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def dist_backend() -> str:
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else "no process group"


def resume_command(out: Path, replicas: Replicas) -> str:
    launcher = f"torchrun --nproc-per-node {replicas.world_size} main.py" if replicas.active else "python3 main.py"
    return f"{launcher} --resume {out}"


LOSS_TERMS = {"vaegan": ("loss_prior", "loss_llike", "loss_gan", "loss_dec_gan"), "vae": ("loss_prior", "loss_llike"),
              "vae-disl": ("loss_prior", "loss_llike", "loss_gan"), "gan": ("loss_gan", "loss_dec_gan")}


def check_finite(row: dict[str, float], model: str, step: int, checkpoint: Path) -> None:
    """TrainingDiverged naming the first loss term that is NaN or infinite."""
    bad = [k for k in LOSS_TERMS[model] if not math.isfinite(row[k])]
    if not bad:
        return
    kept = (f"The last good checkpoint {checkpoint} (step {torch.load(checkpoint, weights_only=True)['step']}) is "
            "untouched; resume from it with" if checkpoint.exists() else "No checkpoint was written yet; try")
    raise TrainingDiverged(f"training diverged: {bad[0]} became {row[bad[0]]} at step {step}. {kept} a lower --lr "
                           "or --gamma, and --detect-anomaly to find the operation that produced it.")


# Settings a resumed run may change (the flag wins, with a note); every other one is fixed by the checkpoint.
CHANGEABLE_ON_RESUME = {"data_root", "lr", "rmsprop_alpha", "epochs", "max_steps", "gamma", "real_weight", "gan_loss",
                        "equilibrium", "margin", "llike_weight", "sample_every", "checkpoint_every", "device",
                        "num_workers", "detect_anomaly", "amp", "channels_last", "compile", "sync_bn"}


def explicit_options(argv: list[str]) -> set[str]:
    """Destinations of the options typed on the command line (not filled in by defaults)."""
    shadow = build_parser()
    for action in shadow._actions:
        action.default = argparse.SUPPRESS
    return set(vars(shadow.parse_args(argv)))


def resume_config(state: dict, args: argparse.Namespace, explicit: set[str], device: torch.device,
                  run_dir: Path, quiet: bool = False) -> TrainConfig:
    """The checkpoint's config with the changeable flags applied; UsageError for a contradiction."""
    saved = TrainConfig(**state["config"])
    given = dict(vars(args))
    given["equilibrium"] = None if args.no_equilibrium else args.equilibrium
    explicit = {"equilibrium" if name == "no_equilibrium" else name for name in explicit}
    changes, conflicts = {"device": str(device), "out": str(run_dir)}, []
    for name in sorted(explicit & {f.name for f in fields(TrainConfig)}):
        old, new = getattr(saved, name), given[name]
        if name == "out":
            new = str(Path(new).expanduser())
            old = str(run_dir)
        if new == old or name in ("device", "overwrite"):
            continue
        if name in CHANGEABLE_ON_RESUME:
            changes[name] = new
            if not quiet:
                print(f"note: --{name.replace('_', '-')} {new} replaces the checkpoint's {old}")
        else:
            conflicts.append(f"--{name.replace('_', '-')} {new} (the checkpoint has {old})")
    if conflicts:
        raise UsageError(f"--resume {run_dir}: {', '.join(conflicts)} contradict(s) the checkpoint, whose values "
                         "are fixed for the run it continues and win. Leave these flags out to resume, or start a "
                         "new run with another --out.")
    cfg = TrainConfig(**{**asdict(saved), **changes})
    validate(cfg)
    return cfg


COMMANDS = ("train", "sample", "reconstruct", "interpolate", "attributes", "evaluate")


def run_command(command: str, argv: list[str]) -> int:
    """The sub-commands that work on a trained checkpoint; 2 for bad input."""
    import evaluate
    import latent
    try:
        written = evaluate.run(argv) if command == "evaluate" else latent.run_command(command, argv)
    except (UsageError, ConfigError, data.DataError, utils.CheckpointError, latent.CommandError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS[1:]:
        return run_command(argv[0], argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    rank = int(os.environ.get("RANK", 0))  # set by torchrun; rank 0 reports what all processes meet
    parser = build_parser()
    if rank > 0:
        parser.error = lambda message: sys.exit(2)
    args = parser.parse_args(argv)
    replicas = SINGLE
    try:
        if distributed.launched_by_torchrun():
            replicas = distributed.start(args.device, args.grad_sync)
            device = replicas.device
        else:
            device = resolve_device(args.device)
        keep_freed_memory(device)
        if args.resume:
            state = utils.load_checkpoint(args.resume)
            run_dir = utils.checkpoint_path(args.resume).parent
            cfg = resume_config(state, args, explicit_options(argv), device, run_dir, quiet=not replicas.is_main)
            train(cfg, resume=state, replicas=replicas)
        else:
            cfg, preset_line = resolve_config(args, device)
            train(cfg, preset_line, replicas=replicas)
    except (UsageError, ConfigError) as error:  # the command line: the same in every process
        report(error, rank, every_machine=False)
        return 2
    except (distributed.LaunchError, data.DataError, utils.CheckpointError) as error:  # may differ between machines
        report(error, rank, every_machine=True)
        return 2
    except FollowerExit:
        return 2
    except OSError as error:  # a full or failing disk while writing outputs
        where = f" writing {error.filename}" if error.filename else ""
        report(f"{error.strerror or error}{where}. Files are written atomically, so the last good checkpoint is "
               "intact; free space (or fix the disk) and continue with --resume RUN_DIR.", rank, every_machine=True)
        return 2
    except TrainingDiverged as error:
        report(error, rank, every_machine=False)
        return 1
    except RuntimeError as error:
        if not distributed.lost_contact(error, replicas):
            raise
        report(f"lost contact with the other training processes ({str(error).strip().splitlines()[0]}): one of them "
               "failed or was stopped, so torchrun stops them all. The last checkpoint on disk is intact; continue "
               "with torchrun ... main.py --resume RUN_DIR.", rank, every_machine=True)
        return 1
    except Stopped as stopped:
        if rank == 0:
            print(str(stopped), file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted at once; the last checkpoint on disk is kept.", file=sys.stderr)
        return 130
    finally:
        distributed.stop(replicas)
    return 0


def report(error: Exception | str, rank: int, every_machine: bool) -> None:
    """The one-paragraph error. Under torchrun rank 0 reports it, and for what can differ between
    machines (devices, files) also the first process of every other machine."""
    other_machine = int(os.environ.get("GROUP_RANK", 0)) > 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0
    if rank == 0 or (every_machine and other_machine):
        print(f"error: {f'process {rank}: ' if rank else ''}{error}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
