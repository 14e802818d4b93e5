import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import models
from models import ConfigError, Decoder, Discriminator, Encoder, NetworkConfig, count_parameters


def test_paper_configuration_parameter_counts():
    cfg = NetworkConfig()  # 1x64x64, latent 128, width 1.0
    assert count_parameters(Encoder(cfg)) == 35_112_064
    assert count_parameters(Decoder(cfg)) == 5_834_753
    assert count_parameters(Discriminator(cfg)) == 10_953_409


def test_batchnorm_uses_pytorch_default_momentum():
    for net in (Encoder(NetworkConfig(width=0.25)), Decoder(NetworkConfig(width=0.25)), Discriminator(NetworkConfig(width=0.25))):
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(m.momentum == 0.1 for m in norms)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 64, 128])
def test_output_shapes(channels, size):
    cfg = NetworkConfig(image_size=size, channels=channels, latent_dim=16, width=0.125)
    x = torch.rand(3, channels, size, size) * 2 - 1
    mean, logvar = Encoder(cfg)(x)
    assert mean.shape == logvar.shape == (3, 16)
    images = Decoder(cfg)(mean)
    assert images.shape == x.shape
    assert images.min() >= -1 and images.max() <= 1
    logits, dis_l = Discriminator(cfg)(x)
    assert logits.shape == (3,)
    assert dis_l.shape == (3, cfg.scaled(256) * (size // 8) ** 2)  # 4th conv at 1/8 size


@pytest.mark.parametrize("layer, channels, scale", [(1, 32, 1), (2, 128, 2), (3, 256, 4), (4, 256, 8)])
def test_every_recon_layer_is_that_convolution_before_batchnorm(layer, channels, scale):
    cfg = NetworkConfig(image_size=32, width=0.25, recon_layer=layer)
    dis = Discriminator(cfg)
    x = torch.rand(2, 1, 32, 32)
    captured = {}
    conv = dis.stages[layer - 1][0]
    conv.register_forward_hook(lambda module, inputs, output: captured.setdefault("out", output))
    _, dis_l = dis(x)
    assert dis_l.shape == (2, cfg.scaled(channels) * (32 // scale) ** 2)
    assert torch.equal(dis_l, captured["out"].flatten(1))


@pytest.mark.parametrize("layer", [1, 2, 3, 4])
def test_several_batches_are_their_concatenation_and_only_the_needed_gradients_are_computed(layer):
    torch.manual_seed(0)
    dis = Discriminator(NetworkConfig(image_size=16, width=0.125, recon_layer=layer)).double()
    real = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    fake = torch.rand(5, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    gradients, flops = [], []
    for batches in ((real, fake * 1), (torch.cat([real, fake * 1]),)):  # * 1: not a leaf, as the decoder's output
        with FlopCounterMode(display=False) as counter:
            logits, dis_l = dis(*batches)
            objective = logits.sin().sum() + dis_l.cos().sum()
            gradients.append((logits, dis_l, *torch.autograd.grad(objective, fake)))
        flops.append(counter.get_total_flops())
    for split, joined in zip(*gradients):
        assert torch.allclose(split, joined, rtol=1e-10, atol=1e-12)
    assert flops[0] < flops[1]  # the real images' share of the first two convolutions' input gradients


def widths(net):
    """Output sizes of every convolution and linear layer, in order."""
    return [m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
            for m in net.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]


def test_width_scales_every_hidden_layer():
    half, full = NetworkConfig(width=0.5), NetworkConfig()
    for net in (Encoder, Decoder, Discriminator):
        small, large = widths(net(half)), widths(net(full))
        outputs = {Encoder: 2, Decoder: 1, Discriminator: 1}[net]  # latent heads / image / logit keep their size
        assert small[-outputs:] == large[-outputs:]
        hidden = list(zip(small, large))[:-outputs]
        if net is Decoder:  # its first layer maps z to the 8x8 feature map: channels x 64
            hidden = hidden[1:]
        assert all(2 * s == l for s, l in hidden), net.__name__


@pytest.mark.parametrize("kwargs, words", [
    (dict(image_size=20), "multiple of 8"),
    (dict(image_size=8), "at least 16"),
    (dict(channels=2), "channels"),
    (dict(latent_dim=0), "empty latent"),
    (dict(width=0.001), "empty layer"),
    (dict(width=0), "positive"),
    (dict(width=float("inf")), "positive number"),
    (dict(recon_layer=5), "out of range"),
    (dict(recon_layer=0), "out of range"),
    (dict(label_dim=-1), "must not be negative"),
    (dict(label_dim=10, label_layers="all"), "not one of first, every"),
])
def test_bad_configurations_say_what_to_change(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        NetworkConfig(**kwargs)


def test_sampling_with_batch_statistics_leaves_running_statistics_alone():
    nets = models.build_networks(NetworkConfig(image_size=16, width=0.125, latent_dim=8))
    before = {k: v.clone() for k, v in nets.decoder.state_dict().items()}
    nets.decoder.eval()
    images = models.decode_with_batch_statistics(nets.decoder, torch.randn(4, 8))
    assert images.shape == (4, 1, 16, 16) and not nets.decoder.training
    assert all(torch.equal(before[k], v) for k, v in nets.decoder.state_dict().items())


def test_decoding_with_running_statistics_gives_each_code_its_own_image():
    """Batches only bound the memory: an image is the same whatever codes share its batch."""
    nets = models.build_networks(NetworkConfig(image_size=16, width=0.125, latent_dim=8))
    nets.decoder(torch.randn(32, 8))  # one training-mode pass moves the running statistics off their start
    z = torch.randn(5, 8)
    whole = models.decode_with_running_statistics(nets.decoder, z)
    assert nets.decoder.training
    assert torch.allclose(models.decode_with_running_statistics(nets.decoder, z, batch=2), whole, atol=1e-6)
    assert torch.allclose(models.decode_with_running_statistics(nets.decoder, z[:1]), whole[:1], atol=1e-6)
    assert not torch.allclose(models.decode_with_batch_statistics(nets.decoder, z), whole, atol=1e-3)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("label_dim", [10, 40])
def test_conditional_networks_shapes_and_parameter_counts(channels, label_dim):
    """y adds label_dim input channels to the first convolution of the encoder and the discriminator
    (5x5 kernels) and label_dim inputs to the decoder's first linear layer; nothing else changes."""
    plain = NetworkConfig(image_size=32, channels=channels, latent_dim=16, width=0.25)
    cfg = NetworkConfig(image_size=32, channels=channels, latent_dim=16, width=0.25, label_dim=label_dim,
                        label_layers="first")
    extra = {Encoder: cfg.scaled(64) * 25, Decoder: cfg.scaled(256) * 4 ** 2, Discriminator: cfg.scaled(32) * 25}
    for net, per_label in extra.items():
        assert count_parameters(net(cfg)) == count_parameters(net(plain)) + label_dim * per_label, net.__name__
    x = torch.rand(3, channels, 32, 32) * 2 - 1
    y = torch.nn.functional.one_hot(torch.tensor([0, 3, 7]), label_dim).float()
    mean, logvar = Encoder(cfg)(x, y)
    assert mean.shape == logvar.shape == (3, 16)
    assert Decoder(cfg)(mean, y).shape == x.shape
    logits, dis_l = Discriminator(cfg)(x, x, labels=torch.cat([y, y]))
    assert logits.shape == (6,) and dis_l.shape == (6, cfg.scaled(256) * 4 ** 2)
    other = torch.roll(y, 1, 0)  # the same images with other labels: every network's output changes
    assert not torch.allclose(Decoder(cfg).eval()(mean, y), Decoder(cfg).eval()(mean, other))
    torch.manual_seed(0)
    encoder, discriminator = Encoder(cfg).eval(), Discriminator(cfg).eval()
    assert not torch.allclose(encoder(x, y)[0], encoder(x, other)[0])
    assert not torch.allclose(discriminator(x, labels=y)[0], discriminator(x, labels=other)[0])


@pytest.mark.parametrize("channels", [1, 3])
def test_labels_at_every_layer_widen_every_convolution_and_linear_layer(channels):
    """label_layers "every": each convolution's and linear layer's input gets label_dim more
    channels (or features), not only the first layer's; outputs keep their shapes, and the label
    still changes what each network outputs."""
    label_dim = 10
    first = NetworkConfig(image_size=32, channels=channels, latent_dim=16, width=0.25, label_dim=label_dim,
                          label_layers="first")
    every = NetworkConfig(image_size=32, channels=channels, latent_dim=16, width=0.25, label_dim=label_dim)
    s = every.scaled
    per_label = {  # the weights each extra input feeds: later convolutions (kernel area x outputs), linears
        Encoder: (s(128) + s(256)) * 25 + s(2048) + 2 * 16,
        Decoder: (s(256) + s(128) + s(32)) * 36 + channels * 25,
        Discriminator: (s(128) + s(256) + s(256)) * 25 + s(512) + 1,
    }
    for net, extra in per_label.items():
        assert count_parameters(net(every)) == count_parameters(net(first)) + label_dim * extra, net.__name__
    x = torch.rand(3, channels, 32, 32) * 2 - 1
    y = torch.nn.functional.one_hot(torch.tensor([0, 3, 7]), label_dim).float()
    other = torch.roll(y, 1, 0)
    torch.manual_seed(0)
    encoder, decoder, discriminator = Encoder(every).eval(), Decoder(every).eval(), Discriminator(every).eval()
    mean, _ = encoder(x, y)
    assert decoder(mean, y).shape == x.shape and not torch.allclose(decoder(mean, y), decoder(mean, other))
    assert not torch.allclose(encoder(x, y)[0], encoder(x, other)[0])
    logits, dis_l = discriminator(x, x, labels=torch.cat([y, y]))
    assert logits.shape == (6,) and dis_l.shape == (6, s(256) * 4 ** 2)
    # Two batches with their own labels are the same as their concatenation, as for "first".
    assert torch.allclose(logits, discriminator(torch.cat([x, x]), labels=torch.cat([y, y]))[0], atol=1e-6)
    assert not torch.allclose(discriminator(x, labels=y)[0], discriminator(x, labels=other)[0])

