"""The paper's three networks (Encoder, Decoder, Discriminator) and the bundle a run trains.

Layer tables follow the 64x64 architecture of Larsen et al. 2016 (arXiv 1512.09300).
`NetworkConfig.width` scales every channel and hidden-unit count so that small networks exist
for CPUs and tests; width 1.0 is the paper's. With `label_dim` > 0 the networks are conditional:
the label y is appended to the input of every convolution and linear layer (`label_layers`
"every", as the authors' code does: as constant image channels, or concatenated to z and to
vectors) or of each network's first layer only ("first"); label_dim 0 builds exactly the
unconditional networks.
A "model" is the method variant (`MODELS`): which of the three networks it owns. Pure modules:
no I/O, no training logic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

LEAK = 0.2  # LeakyReLU slope everywhere


class ConfigError(ValueError):
    """A network setting that cannot build a network; the message says what to change."""


@dataclass(frozen=True)
class NetworkConfig:
    image_size: int = 64   # square images; any multiple of 8 from 16 up
    channels: int = 1      # 1 (grey) or 3 (RGB)
    latent_dim: int = 128  # size of z
    width: float = 1.0     # multiplies every channel and hidden-unit count
    recon_layer: int = 4   # Dis_l: output of this discriminator conv (1..4), before its BatchNorm
    label_dim: int = 0     # size of the label y the networks are conditioned on (0: unconditional)
    label_layers: str = "every"  # where y enters: every layer, or each network's "first" layer only

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % 8:
            raise ConfigError(
                f"image size {self.image_size} is not allowed: the networks halve the image "
                "three times, so it must be a multiple of 8 and at least 16 (for example 32, 64 or 128)."
            )
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), not {self.channels}.")
        if self.latent_dim < 1:
            raise ConfigError(f"latent size {self.latent_dim} gives an empty latent layer; use 1 or more (the paper uses 128).")
        if not (self.width > 0 and math.isfinite(self.width)):
            raise ConfigError(f"width {self.width} must be a positive number (1.0 is the paper's network, 0.25 a small one).")
        narrowest = min(ENCODER_WIDTHS + DECODER_WIDTHS + DISCRIMINATOR_WIDTHS)
        if round(narrowest * self.width) < 1:
            raise ConfigError(
                f"width {self.width} gives an empty layer (the narrowest layer has {narrowest} channels at "
                f"width 1.0, so {narrowest} x {self.width} rounds to 0); use a width of at least {0.5 / narrowest:.3g}."
            )
        if self.recon_layer not in (1, 2, 3, 4):
            raise ConfigError(f"--recon-layer {self.recon_layer} is out of range: the discriminator has convolutions 1 to 4.")
        if self.label_dim < 0:
            raise ConfigError(f"label size {self.label_dim} must not be negative (0: unconditional networks).")
        if self.label_layers not in LABEL_LAYERS:
            raise ConfigError(f"label layers {self.label_layers!r} is not one of {', '.join(LABEL_LAYERS)}.")

    def scaled(self, units: int) -> int:
        """A channel or hidden-unit count of the paper's network, scaled by `width`."""
        return round(units * self.width)

    @property
    def deep_label_dim(self) -> int:
        """Label inputs added to each layer after the first (0 unless y enters every layer)."""
        return self.label_dim if self.label_layers == "every" else 0

    @property
    def bottom_size(self) -> int:
        """Side of the smallest feature map (the image halved three times)."""
        return self.image_size // 8


LABEL_LAYERS = ("first", "every")

# Channel and unit counts of the paper's 64x64 networks (width 1.0).
ENCODER_WIDTHS = [64, 128, 256, 2048]
DECODER_WIDTHS = [256, 256, 128, 32]
DISCRIMINATOR_WIDTHS = [32, 128, 256, 256, 512]


def with_label(h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """h with the label y (N, L) appended: as L constant channels to images (N, C, S, S), as L more
    features to vectors (N, F); h unchanged if y is None."""
    if y is None:
        return h
    y = y.to(h.dtype)
    if h.dim() == 4:
        y = y[:, :, None, None].expand(-1, -1, *h.shape[2:])
    return torch.cat([h, y], 1)


def run_labelled(layers: nn.Sequential, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """`layers` applied to h, the label y appended to the input of each convolution and linear layer."""
    for layer in layers:
        h = layer(with_label(h, y) if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) else h)
    return h


def conv_block(in_ch: int, out_ch: int, kernel: int, stride: int, batch_norm: bool = True) -> list[nn.Module]:
    """Conv (padding keeps size/stride), optional BatchNorm, LeakyReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(LEAK))
    return layers


def deconv_block(in_ch: int, out_ch: int) -> list[nn.Module]:
    """ConvTranspose 6x6/2 (doubles the size), BatchNorm, LeakyReLU."""
    return [nn.ConvTranspose2d(in_ch, out_ch, 6, 2, padding=2), nn.BatchNorm2d(out_ch), nn.LeakyReLU(LEAK)]


class Encoder(nn.Module):
    """x (N, C, S, S) [and label y (N, label_dim)] -> mean, logvar of q(z|x, y), each (N, latent_dim).

    y enters as constant image channels (and, with label_layers "every", at every layer)."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        c1, c2, c3, hidden = (cfg.scaled(u) for u in ENCODER_WIDTHS)
        extra = cfg.deep_label_dim
        self.deep_labels = extra > 0
        self.features = nn.Sequential(
            *conv_block(cfg.channels + cfg.label_dim, c1, 5, 2),  # S/2
            *conv_block(c1 + extra, c2, 5, 2),            # S/4
            *conv_block(c2 + extra, c3, 5, 2),            # S/8
            nn.Flatten(),
            nn.Linear(c3 * cfg.bottom_size**2 + extra, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(LEAK),
        )
        self.mean = nn.Linear(hidden + extra, cfg.latent_dim)
        self.logvar = nn.Linear(hidden + extra, cfg.latent_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.deep_labels:
            h = with_label(run_labelled(self.features, x, y), y)
        else:
            h = self.features(with_label(x, y))
        return self.mean(h), self.logvar(h)


class Decoder(nn.Module):
    """z (N, latent_dim) [and label y (N, label_dim), concatenated to z, and with label_layers
    "every" as constant channels at every later layer] -> image (N, C, S, S) in [-1, 1]."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.latent_dim = cfg.latent_dim
        c0, c1, c2, c3 = (cfg.scaled(u) for u in DECODER_WIDTHS)
        side, extra = cfg.bottom_size, cfg.deep_label_dim
        self.deep_labels = extra > 0
        self.net = nn.Sequential(
            nn.Linear(cfg.latent_dim + cfg.label_dim, c0 * side**2),
            nn.BatchNorm1d(c0 * side**2),
            nn.LeakyReLU(LEAK),
            nn.Unflatten(1, (c0, side, side)),  # S/8
            *deconv_block(c0 + extra, c1),      # S/4
            *deconv_block(c1 + extra, c2),      # S/2
            *deconv_block(c2 + extra, c3),      # S
            nn.ConvTranspose2d(c3 + extra, cfg.channels, 5, 1, padding=2),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return run_labelled(self.net, z, y) if self.deep_labels else self.net(with_label(z, y))


class Discriminator(nn.Module):
    """x (N, C, S, S) [and label y (N, label_dim), as constant image channels, and with label_layers
    "every" at every layer] -> logits (N,), Dis_l (N, features).

    Dis_l is the output of convolution `recon_layer` before its BatchNorm (before the
    LeakyReLU for the first convolution, which has no BatchNorm), flattened.
    """

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        c1, c2, c3, c4, hidden = (cfg.scaled(u) for u in DISCRIMINATOR_WIDTHS)
        self.recon_layer = cfg.recon_layer
        extra = cfg.deep_label_dim
        self.deep_labels = extra > 0
        # Each stage starts with its convolution, so Dis_l is a stage's first output.
        self.stages = nn.ModuleList([
            nn.Sequential(*conv_block(cfg.channels + cfg.label_dim, c1, 5, 1, batch_norm=False)),  # S
            nn.Sequential(*conv_block(c1 + extra, c2, 5, 2)),                      # S/2
            nn.Sequential(*conv_block(c2 + extra, c3, 5, 2)),                      # S/4
            nn.Sequential(*conv_block(c3 + extra, c4, 5, 2)),                      # S/8
        ])
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c4 * cfg.bottom_size**2 + extra, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(LEAK),
            nn.Linear(hidden + extra, 1),
        )

    def forward(self, *images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One or more image batches, treated exactly as their concatenation (one batch for BatchNorm);
        `labels`: the labels of that concatenation (conditional networks).

        The batches are concatenated only where the first BatchNorm mixes their rows, after the
        second convolution. Up to there each row is computed alone, so a backward pass that needs
        the gradient of some batches only (the generated images, not the real ones) skips the
        others' share of the first two convolutions.
        """
        first, second, *deeper = self.stages
        ys = labels.split([len(x) for x in images]) if labels is not None else [None] * len(images)
        deep_ys, deep = (ys, labels) if self.deep_labels else ([None] * len(images), None)
        conv1 = [first[0](with_label(x, y)) for x, y in zip(images, ys)]  # (N_i, c1, S, S) each
        # (N, c2, S/2, S/2): the batches meet
        conv2 = torch.cat([second[0](with_label(first[1:](h), y)) for h, y in zip(conv1, deep_ys)])
        convs = [torch.cat(conv1) if self.recon_layer == 1 else None, conv2]
        h = second[1:](conv2)
        for stage in deeper:
            convs.append(stage[0](with_label(h, deep)))
            h = stage[1:](convs[-1])
        return run_labelled(self.classifier, h, deep).squeeze(1), convs[self.recon_layer - 1].flatten(1)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


MODELS = {  # --model: the networks it owns (only these are built, saved and updated)
    "vaegan": ("encoder", "decoder", "discriminator"),    # the paper's method
    "vae": ("encoder", "decoder"),                        # element-wise (pixel) reconstruction error
    "vae-disl": ("encoder", "decoder", "discriminator"),  # Dis_l error, but no GAN gradient to the decoder
    "gan": ("decoder", "discriminator"),                  # the decoder as a plain GAN generator
}


@dataclass
class Networks:
    """The networks of one run; those its model does not own are None."""
    decoder: nn.Module
    encoder: nn.Module | None = None
    discriminator: nn.Module | None = None

    def modules(self) -> dict[str, nn.Module]:
        """The networks present, by name, in a fixed order."""
        named = {"encoder": self.encoder, "decoder": self.decoder, "discriminator": self.discriminator}
        return {name: module for name, module in named.items() if module is not None}


def build_networks(cfg: NetworkConfig, device: torch.device | str = "cpu", model: str = "vaegan") -> Networks:
    """The networks that `model` owns, freshly initialised."""
    classes = {"encoder": Encoder, "decoder": Decoder, "discriminator": Discriminator}
    return Networks(**{name: classes[name](cfg).to(device) for name in MODELS[model]})


def batch_norms(module: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    return (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def shapes_only(cfg: NetworkConfig, model: str = "vaegan") -> Networks:
    """The networks with parameters that have shapes but no memory (the meta device): to count and trace."""
    with torch.device("meta"):
        return build_networks(cfg, "meta", model)


def layer_outputs(layers: nn.Module, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """(numbers output by all the layers in `layers`, the shape it outputs) for one input of `shape`."""
    total = 0
    for layer in (m for m in layers.modules() if not list(m.children())):
        if isinstance(layer, nn.Conv2d):
            side = (shape[-1] + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
            shape = (layer.out_channels, side, side)
        elif isinstance(layer, nn.ConvTranspose2d):
            side = (shape[-1] - 1) * layer.stride[0] - 2 * layer.padding[0] + layer.kernel_size[0]
            shape = (layer.out_channels, side, side)
        elif isinstance(layer, nn.Linear):
            shape = (layer.out_features,)
        elif isinstance(layer, nn.Flatten):
            shape = (math.prod(shape),)
        elif isinstance(layer, nn.Unflatten):
            shape = tuple(layer.unflattened_size)
        total += math.prod(shape)  # BatchNorm and activations keep the shape
    return total, shape


def activation_elements(cfg: NetworkConfig, model: str = "vaegan") -> int:
    """Numbers the layers of one training step's forward pass output, per image of the batch: the
    encoder sees the batch once, the decoder twice ([z; z_p]) and the discriminator three times
    ([x; x~; x_p]), as in the step (once and twice for the gan, which has no encoder)."""
    image = (cfg.channels, cfg.image_size, cfg.image_size)
    nets = shapes_only(cfg)
    encoder = layer_outputs(nets.encoder.features, image)[0] + 2 * cfg.latent_dim
    decoder = layer_outputs(nets.decoder.net, (cfg.latent_dim,))[0]
    discriminator = nets.discriminator
    convolutions, features = layer_outputs(discriminator.stages, image)
    discriminator_outputs = convolutions + layer_outputs(discriminator.classifier, features)[0]
    owned = MODELS[model]
    fakes = 2 if "encoder" in owned else 1
    return ((encoder if "encoder" in owned else 0) + fakes * decoder
            + ((1 + fakes) * discriminator_outputs if "discriminator" in owned else 0))


def in_batches(x: torch.Tensor, y: torch.Tensor | None, size: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Rows of `x` and of their label vectors `y` (None: unconditional) split alike into batches of `size`."""
    chunks = x.split(size)
    return list(zip(chunks, y.split(size) if y is not None else [None] * len(chunks)))


SAMPLE_BATCH = 64  # prior samples normalised together when decoding with batch statistics, as in a grid


@torch.no_grad()
def decode_with_batch_statistics(decoder: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Decode (with labels `y`, for conditional networks) in batches of SAMPLE_BATCH codes, BatchNorm
    normalising each by its own statistics and leaving the running ones untouched.

    This is how the sample grids are drawn: prior samples look better so than with the running
    averages (docs/reproduction.md compares the two).
    """
    norms = list(batch_norms(decoder))
    was_training = decoder.training
    decoder.train()
    for m in norms:
        m.track_running_stats = False
    try:
        return torch.cat([decoder(chunk, label) for chunk, label in in_batches(z, y, SAMPLE_BATCH)])
    finally:
        for m in norms:
            m.track_running_stats = True
        decoder.train(was_training)


@torch.no_grad()
def decode_with_running_statistics(decoder: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None,
                                   batch: int = 500) -> torch.Tensor:
    """Decode (with labels `y`, for conditional networks) in evaluation mode, so that BatchNorm uses its
    running statistics and each image depends on its own code alone; batches only bound the memory."""
    was_training = decoder.training
    decoder.eval()
    try:
        return torch.cat([decoder(chunk, label) for chunk, label in in_batches(z, y, batch)])
    finally:
        decoder.train(was_training)


@torch.no_grad()
def reconstruct(nets: Networks, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Dec(mean of q(z|x[, y])[, y]) with the networks in evaluation mode (their running statistics)."""
    modes = nets.encoder.training, nets.decoder.training
    nets.encoder.eval()
    nets.decoder.eval()
    try:
        mean, _ = nets.encoder(x, y)
        return nets.decoder(mean, y)
    finally:
        nets.encoder.train(modes[0])
        nets.decoder.train(modes[1])
