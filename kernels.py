"""CPU speed: faster forms of the convolutions oneDNN runs slowly, the memory format, and malloc.

oneDNN, behind PyTorch's CPU convolutions, computes 16 output channels at a time (one AVX-512
register of float32), so a convolution with fewer wastes the rest of the register. In this model
that hits the layers that write a grey image (the decoder's last) or its gradient (the
discriminator's first), and at narrow widths the 8-channel layers too. Each has an exactly
equivalent convolution with more output channels:

  * one output channel, stride 1: a depthwise convolution with the flipped kernel, summed over
    the input channels;
  * a 6x6 stride-2 transposed convolution with padding 2 (the decoder's): per output phase (row
    and column parity) a 3x3 convolution; the four run as one with 4x the output channels and
    are then interleaved. The image gradient of a 5x5 stride-2 convolution (the encoder's and
    discriminator's) is the same with a 6x6 kernel whose last row and column are zero.

FastConv2d and FastConvTranspose2d are nn.Conv2d and nn.ConvTranspose2d (same parameters, same
results up to float rounding) that use these forms on the CPU in eager mode, where they apply;
weight and bias gradients are PyTorch's own.
"""
from __future__ import annotations

import ctypes
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

NARROW = 16  # fewer output channels than this run at a fraction of oneDNN's speed

# Row 2m + r of a 6x6 stride-2 transposed convolution with padding 2 sums input rows m + t - 1
# (t = 0, 1, 2) times kernel row r + 4 - 2t; the same holds for columns.
PHASE_TAPS = torch.tensor([[4, 2, 0], [5, 3, 1]])  # [r, t] -> kernel row


def fast_form(out_channels: int, kernel: int, stride: int, padding: int, output_padding: int) -> str | None:
    """Which equivalent form conv_transpose uses for these settings, None for PyTorch's own.

    `out_channels` are the transposed convolution's: a plain convolution's input channels when
    it computes that convolution's image gradient.
    """
    if out_channels == 1 and stride == 1 and output_padding == 0 and padding < kernel:
        return "depthwise"
    if out_channels < NARROW and stride == 2 and padding == 2 and kernel + output_padding == 6:
        return "phases"
    return None


def conv_transpose(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
                   output_padding: int = 0) -> torch.Tensor:
    """F.conv_transpose2d (square kernel and settings), in its fast form where there is one."""
    in_ch, out_ch, kernel, _ = weight.shape
    form = fast_form(out_ch, kernel, stride, padding, output_padding)
    if form == "depthwise":
        y = F.conv2d(x, weight.flip(-2, -1), None, 1, kernel - 1 - padding, groups=in_ch).sum(1, keepdim=True)
        return y if bias is None else y + bias.view(1, 1, 1, 1)
    if form == "phases":
        memory_format = layout(x, weight)
        weight = F.pad(weight, (0, 6 - kernel, 0, 6 - kernel))                  # (in, out, 6, 6)
        phases = weight[:, :, PHASE_TAPS][:, :, :, :, PHASE_TAPS]                # (in, out, r, t, r', t')
        kernel3 = phases.permute(2, 4, 1, 0, 3, 5).reshape(4 * out_ch, in_ch, 3, 3)
        y = F.conv2d(x.contiguous(memory_format=memory_format), kernel3.contiguous(memory_format=memory_format),
                     None if bias is None else bias.repeat(4), 1, 1)             # (N, (r, r', out), H, W)
        n, _, h, w = y.shape
        out = torch.empty(n, out_ch, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=memory_format)
        out.unflatten(3, (w, 2)).unflatten(2, (h, 2)).copy_(y.unflatten(1, (2, 2, out_ch)).permute(0, 3, 4, 1, 5, 2))
        return out
    return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)


def layout(*tensors: torch.Tensor) -> torch.memory_format:
    """Channels-last if any of the 4-D tensors is unambiguously so (as PyTorch's convolutions decide)."""
    channels_last = any(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in tensors)
    return torch.channels_last if channels_last else torch.contiguous_format


def applies(x: torch.Tensor) -> bool:
    """The fast forms are for batches on the CPU in eager mode, float32 (or float64, which tests use
    to check them exactly); autocast and torch.compile choose their own kernels."""
    return (x.dim() == 4 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def computes_gradient(ctx, index: int) -> bool:
    """Whether this backward pass uses the gradient of forward input `index`.

    ctx.needs_input_grad says only whether the input requires grad; a backward pass restricted
    with `inputs=` (as the training step's are) may not need it, which the engine knows.
    """
    if not ctx.needs_input_grad[index]:
        return False
    try:
        return torch._C._will_engine_execute_node(ctx.next_functions[index][0])
    except (AttributeError, RuntimeError):  # a private call, which cannot answer for a leaf that
        return True                         # torch.autograd.grad was asked the gradient of


class Convolution(torch.autograd.Function):
    """A convolution or transposed convolution whose slow direction (the forward of a transposed one,
    the image gradient of a plain one) runs through conv_transpose."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
                transposed: bool) -> torch.Tensor:
        y = conv_transpose(x, weight, bias, stride, padding) if transposed else F.conv2d(x, weight, bias, stride, padding)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.transposed = stride, padding, transposed
        ctx.memory_format = layout(y, x)  # the backward pass runs in the forward's memory format
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, transposed = ctx.stride, ctx.padding, ctx.transposed
        grad = grad.contiguous(memory_format=ctx.memory_format)
        grad_x = None
        if computes_gradient(ctx, 0):
            grad_x = (F.conv2d(grad, weight, None, stride, padding) if transposed
                      else conv_transpose(grad, weight, None, stride, padding,
                                          gradient_output_padding(x.shape[-1], grad.shape[-1], weight.shape[-1], stride,
                                                                  padding)))
        needs_weight, needs_bias = computes_gradient(ctx, 1), computes_gradient(ctx, 2)
        grad_weight = grad_bias = None
        if needs_weight or needs_bias:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[1] if transposed else weight.shape[0]], [stride] * 2, [padding] * 2,
                [1, 1], transposed, [0, 0], 1, [False, needs_weight, needs_bias])
        return grad_x, grad_weight, grad_bias, None, None, None


def gradient_output_padding(in_size: int, out_size: int, kernel: int, stride: int, padding: int) -> int:
    """The output padding of the transposed convolution that maps a convolution's output size back to its input size."""
    return in_size - ((out_size - 1) * stride - 2 * padding + kernel)


def check_settings(layer: nn.Conv2d | nn.ConvTranspose2d) -> None:
    """The fast forms take one kernel size, stride and padding for both sides, and no dilation,
    groups, output padding or padding mode."""
    square = not isinstance(layer.padding, str) and all(
        a == b for a, b in (layer.kernel_size, layer.stride, layer.padding))
    plain = (layer.dilation == (1, 1) and layer.groups == 1 and tuple(layer.output_padding) == (0, 0)
             and layer.padding_mode == "zeros")
    if not (square and plain):
        raise ValueError(f"{type(layer).__name__} takes square settings without dilation, groups, output "
                         f"padding or a padding mode; use torch.nn's own layer for {layer}.")


class FastConv2d(nn.Conv2d):
    """nn.Conv2d (square settings: see check_settings) whose image gradient on the CPU uses its fast form."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_settings(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride, padding, kernel = self.stride[0], self.padding[0], self.kernel_size[0]
        size = x.shape[-1]
        extra = gradient_output_padding(size, (size + 2 * padding - kernel) // stride + 1, kernel, stride, padding)
        if (x.requires_grad and size == x.shape[-2] and applies(x)
                and fast_form(self.in_channels, kernel, stride, padding, extra)):
            return Convolution.apply(x, self.weight, self.bias, stride, padding, False)
        return super().forward(x)


class FastConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d (square settings: see check_settings) whose forward on the CPU uses its fast form."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_settings(self)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        stride, padding, kernel = self.stride[0], self.padding[0], self.kernel_size[0]
        if output_size is None and applies(x) and fast_form(self.out_channels, kernel, stride, padding, 0):
            return Convolution.apply(x, self.weight, self.bias, stride, padding, True)
        return super().forward(x, output_size)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def default_channels_last(device: torch.device) -> bool:
    """NHWC on the CPU, where oneDNN's convolutions ran the step faster (docs/benchmarks.md); GPUs keep NCHW."""
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
    again. Keeping them makes the step faster for more resident memory, which then stays at its
    peak (docs/benchmarks.md). keep=False instead maps every block from 128 KiB up on its own and
    returns it when freed, so that resident memory follows the tensors alive (bench.py measures
    peak memory so). Returns whether it applied.
    """
    libc = glibc() if device.type == "cpu" else None
    if libc is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
    if keep:
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)) and bool(libc.mallopt(M_MMAP_MAX, 1 << 20))
