import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from conftest import ROOT
from kernels import Convolution, FastConv2d, FastConvTranspose2d

# (fast module, PyTorch's module, constructor arguments, input size): every fast form in the model
FAST_CASES = {
    "decoder 6x6 stride 2, 8 channels out": (FastConvTranspose2d, nn.ConvTranspose2d, (16, 8, 6, 2, 2), 6),
    "decoder last layer, grey": (FastConvTranspose2d, nn.ConvTranspose2d, (8, 1, 5, 1, 2), 12),
    "discriminator first layer, grey": (FastConv2d, nn.Conv2d, (1, 8, 5, 1, 2), 12),
    "5x5 stride 2 from 8 channels": (FastConv2d, nn.Conv2d, (8, 32, 5, 2, 2), 12),
    "5x5 stride 2 from grey": (FastConv2d, nn.Conv2d, (1, 16, 5, 2, 2), 16),
}


def twins(fast_cls, torch_cls, args, memory_format, bias=True):
    torch.manual_seed(0)
    fast = fast_cls(*args, bias=bias).double().to(memory_format=memory_format)
    reference = torch_cls(*args, bias=bias).double().to(memory_format=memory_format)
    reference.load_state_dict(fast.state_dict())
    return fast, reference


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("case", FAST_CASES)
def test_fast_forms_equal_pytorchs_convolutions(case, memory_format):
    fast_cls, torch_cls, args, size = FAST_CASES[case]
    for bias, batch in ((True, 5), (False, 1)):
        fast, reference = twins(fast_cls, torch_cls, args, memory_format, bias)
        x = torch.randn(batch, args[0], size, size, dtype=torch.float64).contiguous(memory_format=memory_format)
        x.requires_grad_()
        y = fast(x)
        assert isinstance(y.grad_fn, Convolution._backward_cls)  # the fast form ran
        upstream = torch.randn_like(y)
        expected = reference(x)
        params = [x, fast.weight] + ([fast.bias] if bias else [])
        got = torch.autograd.grad(y, params, upstream)
        want = torch.autograd.grad(expected, [x, reference.weight] + ([reference.bias] if bias else []), upstream)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        for name, a, b in zip(["image", "weight", "bias"], got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{name} gradient")
    if memory_format == torch.channels_last:
        assert y.is_contiguous(memory_format=memory_format) and got[0].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("cls, args, size", [
    (FastConvTranspose2d, (8, 16, 6, 2, 2), 6),
    (FastConvTranspose2d, (8, 3, 5, 1, 2), 12),
    (FastConv2d, (8, 32, 5, 2, 2), 13),
], ids=["16 channels out", "RGB out", "odd size: its gradient has no output padding"])
def test_other_layers_are_pytorchs_own(cls, args, size):
    x = torch.randn(2, args[0], size, size, requires_grad=True)
    assert not isinstance(cls(*args)(x).grad_fn, Convolution._backward_cls)


def test_non_square_images_through_a_transposed_layer():
    fast, reference = twins(FastConvTranspose2d, nn.ConvTranspose2d, (16, 8, 6, 2, 2), torch.channels_last)
    x = torch.randn(3, 16, 4, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = fast(x)
    assert isinstance(y.grad_fn, Convolution._backward_cls)
    torch.testing.assert_close(y, reference(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls, setting", [
    (FastConv2d, dict(dilation=2)), (FastConv2d, dict(groups=2)), (FastConv2d, dict(padding="same")),
    (FastConv2d, dict(padding_mode="reflect")), (FastConv2d, dict(kernel_size=(5, 3))),
    (FastConvTranspose2d, dict(output_padding=1, stride=2)),
])
def test_settings_the_fast_forms_do_not_cover_are_refused(cls, setting):
    with pytest.raises(ValueError, match="square settings"):
        cls(**(dict(in_channels=2, out_channels=8, kernel_size=5, stride=1, padding=2) | setting))


def test_autocast_float16_unbatched_and_output_size_are_left_to_pytorch():
    layer = FastConvTranspose2d(8, 1, 5, 1, 2)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not isinstance(layer(x).grad_fn, Convolution._backward_cls)
    assert not isinstance(layer(x, output_size=[12, 12]).grad_fn, Convolution._backward_cls)
    assert not isinstance(layer(x[0]).grad_fn, Convolution._backward_cls)  # one image, no batch dimension
    assert layer(x[0]).shape == (1, 12, 12)
    assert not isinstance(layer.half()(x.half()).grad_fn, Convolution._backward_cls)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["decoder 6x6 stride 2, 8 channels out", "discriminator first layer, grey"])
def test_a_backward_pass_computes_only_the_gradients_it_is_asked_for(case):
    fast_cls, _, args, size = FAST_CASES[case]
    layer = fast_cls(*args)
    x = torch.randn(3, args[0], size, size).requires_grad_()
    images = x * 1  # not a leaf, like the generated images the training step differentiates
    y = layer(images)
    with CountOps() as image_only:
        torch.autograd.backward([y], [torch.ones_like(y)], inputs=[x], retain_graph=True)
    with CountOps() as image_only_by_grad:
        torch.autograd.grad([y], [images], [torch.ones_like(y)], retain_graph=True)
    with CountOps() as weights_only:
        torch.autograd.backward([y], [torch.ones_like(y)], inputs=[layer.weight, layer.bias])
    for ops in (image_only, image_only_by_grad):
        assert "convolution_backward.default" not in ops.names  # the weight gradient's kernel
    assert layer.weight.grad is not None and layer.bias.grad is not None
    assert "convolution.default" not in weights_only.names  # the image gradient's kernel


@pytest.mark.skipif(kernels.glibc() is None, reason="malloc tuning is for glibc (Linux)")
def test_cpu_training_keeps_freed_memory_for_reuse():
    """A 64 MiB block allocated and freed step after step: kept, its pages are reused once the heap
    has settled; otherwise every page is faulted in afresh each time (what each training step
    would pay for its activations)."""
    code = ("import resource, sys, torch, kernels\n"
            "applied = kernels.keep_freed_memory(torch.device(sys.argv[1]), keep=sys.argv[2] == 'keep')\n"
            "for step in range(8):\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    block = torch.ones(1 << 24)\n"
            "    del block\n"
            "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {}
    # On a GPU the activations are not in malloc's memory: left alone. keep=False is how bench.py
    # measures memory: every large block mapped on its own and returned when freed.
    for device, keep in (("cpu", "keep"), ("cuda", "keep"), ("cpu", "exact")):
        result = subprocess.run([sys.executable, "-c", code, device, keep], capture_output=True, text=True, cwd=ROOT)
        applied, faults[device, keep] = result.stdout.split()
        assert applied == str(device == "cpu")
    assert int(faults["cpu", "keep"]) < 1000  # 64 MiB is 16,384 pages of 4 KiB
    assert int(faults["cuda", "keep"]) > 10_000 and int(faults["cpu", "exact"]) > 10_000
