"""Benchmark the training step against a naive step and the machine's matmul rate, in one process.

    python3 bench.py [--image-size 64] [--channels 1] [--width 1.0] [--batch-size 64]
                     [--device auto] [--steps N] [--[no-]channels-last] [--json FILE]

Three measurements alternate (A B C A B C ...) after a warm-up, so drift on a noisy
machine affects all of them alike:
  project  step.train_step, the step the training loop runs;
  naive    the same forward pass, then one full backward pass per network's loss with
           retain_graph and zeroed gradients in between (how most public ports do it),
           then the three optimizer steps;
  matmul   a large float32 matrix product (on CUDA also bfloat16): the machine's rate;
  and, with --amp or --compile, the project's step with that path on, reported as a
  speed-up over the float32 eager step.
Both steps update all three networks (equilibrium gate off) so that they do equal work, in
the memory format training uses on the device (channels-last on the CPU, else NCHW;
--[no-]channels-last overrides it); in channels-last the float32 eager step is also timed
in NCHW (project_contiguous), which gives channels-last's speed-up. Peak memory is measured
afterwards, in one more step of each, so that measuring it does not slow the timed ones. On the
CPU the process keeps freed memory for reuse while timing, as training does, and measures
memory with every large block mapped on its own (kernels.keep_freed_memory): peak MiB is the
growth of resident memory, alloc MiB the peak growth of what PyTorch's allocator handed out
(from the profiler's memory events), which leaves out the C library's and oneDNN's own.

Under torchrun (torchrun --nproc-per-node N bench.py ...) it times instead the two ways of
averaging gradients across the processes, each in every process on its own images:
  project            DistributedDataParallel's hooks, overlapping with the backward passes;
  project_allreduce  explicit all-reduces in 25 MiB buckets after the backward passes;
images per second then count all processes' images, and rank 0 prints the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import config
import distributed
import kernels
import losses
import models
import step
from config import LossConfig, UsageError
from distributed import SINGLE, Replicas
from models import NetworkConfig, Networks

ALL_UPDATES = LossConfig(gamma=1e-2, equilibrium=None)  # every network updated every step


def naive_step(nets: Networks, optimizers: dict[str, torch.optim.Optimizer], x: torch.Tensor,
               cfg: LossConfig, noise: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Same forward as the project's step; each network's loss then gets its own full backward pass."""
    n = x.shape[0]
    eps, z_prior = noise if noise is not None else torch.randn(2, n, nets.encoder.mean.out_features, device=x.device)
    mean, logvar = nets.encoder(x)
    z = losses.reparameterize(mean, logvar, eps)
    generated = nets.decoder(torch.cat([z, z_prior]))
    logits, dis_l = nets.discriminator(x, generated)
    loss_prior = losses.kl_divergence(mean, logvar)
    loss_llike = losses.feature_nll(dis_l[n:2 * n], dis_l[:n])
    loss_gan = losses.discriminator_loss(logits[:n], logits[n:], cfg.real_weight)
    loss_dec_gan = losses.decoder_gan_loss(logits[:n], logits[n:], cfg.real_weight, cfg.gan_loss)
    objectives = {
        "encoder": loss_prior + cfg.llike_weight * loss_llike,
        "decoder": cfg.gamma * loss_llike + (1 - cfg.gamma) * loss_dec_gan,
        "discriminator": loss_gan,
    }
    modules = nets.modules()
    kept = {}
    for index, (name, loss) in enumerate(objectives.items()):
        for module in modules.values():
            module.zero_grad(set_to_none=True)
        loss.backward(retain_graph=index < len(objectives) - 1)
        kept[name] = [p.grad for p in modules[name].parameters()]
    for name, grads in kept.items():
        for param, grad in zip(modules[name].parameters(), grads):
            param.grad = grad
        optimizers[name].step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or on the CPU peak resident growth (sampled) and
    the peak growth of PyTorch's allocations (from the profiler).

    On the CPU (glibc) malloc first returns its free memory to the system and maps every large
    block on its own while measuring, so that resident memory follows the tensors alive rather
    than what earlier blocks left for reuse; afterwards it keeps freed memory again, as training does.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.libc = kernels.glibc()

    def resident(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    @contextmanager
    def measure(self) -> Iterator[dict]:
        result = {"bytes": 0}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield result
            result["bytes"] = torch.cuda.max_memory_allocated(self.device) - start
            return
        if kernels.keep_freed_memory(self.device, keep=False):
            self.libc.malloc_trim(0)
        start, peak, done = self.resident(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], self.resident())
                time.sleep(0.0005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            with c_stderr_hidden(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
                yield result
        finally:
            done.set()
            thread.join()
            result["bytes"] = max(0, max(peak[0], self.resident()) - start)
            with c_stderr_hidden():
                result["allocated_bytes"] = peak_allocated(profiler)
            kernels.keep_freed_memory(self.device)


@contextmanager
def c_stderr_hidden() -> Iterator[None]:
    """Hide what C++ code writes to stderr (the profiler logs its start and stop there)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_allocated(profiler: profile) -> int:
    """Peak growth of the bytes PyTorch's CPU allocator handed out, from the profiler's memory events."""
    with tempfile.TemporaryDirectory() as folder:
        trace = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(trace)
        with open(trace) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    totals = [e["Total Allocated"] for e in events]  # after each allocation (Bytes > 0) or free (< 0)
    return max(totals) - (totals[0] - events[0]["Bytes"]) if events else 0


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_case(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], None], int]:
    size = 4096 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    repeats = 20 if device.type == "cuda" else 1

    def run() -> None:
        for _ in range(repeats):
            torch.mm(a, b)

    return run, 2 * size**3 * repeats


def in_format(nets: Networks, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Put the networks (in place) and the images in NHWC or NCHW memory format; returns the images."""
    layout = kernels.memory_format(channels_last)
    for module in nets.modules().values():
        module.to(memory_format=layout)
    return x.contiguous(memory_format=layout)


def fast_path_case(network_cfg: NetworkConfig, x: torch.Tensor, amp: str = "off", channels_last: bool = False,
                   compile: bool = False, replicas: Replicas = SINGLE) -> Callable[[], None]:
    """The project's step with one of the GPU fast paths switched on (and, under torchrun, its
    gradients averaged across the processes as `replicas` says)."""
    nets = models.build_networks(network_cfg, x.device)
    optimizers = step.build_optimizers(nets, 3e-4, 0.9)
    step_nets, precision, notes = step.fast_paths(nets, amp, channels_last, compile, x.device, replicas)
    for note in notes if replicas.is_main else []:
        print(f"{note}", file=sys.stderr)
    x = x.contiguous(memory_format=kernels.memory_format(channels_last))  # fast_paths put the networks in it
    return lambda: step.train_step(step_nets, optimizers, x, ALL_UPDATES, precision=precision, replicas=replicas)


def bench(image_size: int = 64, channels: int = 1, width: float = 1.0, batch_size: int = 64,
          device: str = "auto", steps: int = 5, warmup: int = 1, amp: str = "off",
          channels_last: bool | None = None, compile: bool = False, replicas: Replicas = SINGLE) -> dict:
    """Run the measurements alternately; returns the report as a dict."""
    dev = replicas.device if replicas.active else config.resolve_device(device)
    kernels.keep_freed_memory(dev)  # as training does
    layout = kernels.default_channels_last(dev) if channels_last is None else channels_last
    torch.manual_seed(replicas.rank)  # under torchrun each process its own images
    network_cfg = NetworkConfig(image_size=image_size, channels=channels, width=width)
    x = torch.rand(batch_size, channels, image_size, image_size, device=dev) * 2 - 1
    images = batch_size * replicas.world_size
    if replicas.active:  # the two ways of averaging gradients, instead of the naive step
        cases: dict[str, dict] = {
            name: {"run": fast_path_case(network_cfg, x, channels_last=layout,
                                         replicas=dataclasses.replace(replicas, grad_sync=sync)), "images": images}
            for name, sync in (("project", "ddp"), ("project_allreduce", "allreduce"))}
    else:
        cases = {"project": {"run": fast_path_case(network_cfg, x, channels_last=layout), "images": batch_size}}
        nets = models.build_networks(network_cfg, dev)
        optimizers = step.build_optimizers(nets, 3e-4, 0.9)
        naive_x = in_format(nets, x, layout)
        cases["naive"] = {"run": lambda: naive_step(nets, optimizers, naive_x, ALL_UPDATES), "images": batch_size}
    fast = {f"project_amp_{amp}": dict(amp=amp, channels_last=layout)} if amp != "off" else {}
    if compile:
        fast["project_compile"] = dict(compile=True, channels_last=layout)
    if layout:
        fast["project_contiguous"] = dict(channels_last=False)
    like_project = dataclasses.replace(replicas, grad_sync="ddp")  # under torchrun "project" is the DDP step
    for name, options in fast.items():
        cases[name] = {"run": fast_path_case(network_cfg, x, **options, replicas=like_project), "images": images}
    matmuls = [("matmul_fp32", torch.float32)] + ([("matmul_bf16", torch.bfloat16)] if dev.type == "cuda" else [])
    for name, dtype in matmuls:
        run, flops = matmul_case(dev, dtype)
        cases[name] = {"run": run, "flops": flops, "images": 0}
    for name in ("project", "naive") if "naive" in cases else ("project",):
        cases[name]["flops"] = count_flops(cases[name]["run"])
    for name in [*fast, "project_allreduce"] if replicas.active else fast:  # the same arithmetic as "project"
        cases[name]["flops"] = cases["project"]["flops"]

    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(warmup + steps):
        for name, case in cases.items():
            synchronize(dev)
            start = time.perf_counter()
            case["run"]()
            synchronize(dev)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    memory = PeakMemory(dev)  # measured apart, so that its sampling thread does not slow the timed rounds
    peaks: dict[str, dict] = {}
    for name, case in cases.items():
        with memory.measure() as peak:
            case["run"]()
            synchronize(dev)
        peaks[name] = peak

    report = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "processes": replicas.world_size,
        "torch": torch.__version__,
        "config": {"image_size": image_size, "channels": channels, "width": width, "batch_size": batch_size,
                   "channels_last": layout, "steps": steps, "warmup": warmup},
        "results": {},
    }
    for name, case in cases.items():
        seconds = statistics.median(times[name])
        report["results"][name] = {
            "seconds": seconds,
            "images_per_second": case["images"] / seconds if case["images"] else None,
            "flops": case["flops"],
            "flop_per_second": case["flops"] / seconds,
            "peak_memory_bytes": peaks[name]["bytes"],
            **({"peak_allocated_bytes": peaks[name]["allocated_bytes"]} if "allocated_bytes" in peaks[name] else {}),
        }
    reference = report["results"]["matmul_fp32"]["flop_per_second"]
    for name in cases.keys() - {name for name, _ in matmuls}:
        report["results"][name]["share_of_matmul"] = report["results"][name]["flop_per_second"] / reference
    project_seconds = report["results"]["project"]["seconds"]
    if replicas.active:
        report["allreduce_over_ddp"] = report["results"]["project_allreduce"]["seconds"] / project_seconds
    else:
        report["naive_over_project"] = report["results"]["naive"]["seconds"] / project_seconds
    for name in fast.keys() - {"project_contiguous"}:
        report["results"][name]["speedup_over_fp32_eager"] = project_seconds / report["results"][name]["seconds"]
    if "project_contiguous" in fast:
        report["channels_last_speedup"] = report["results"]["project_contiguous"]["seconds"] / project_seconds
    return report


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def format_report(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"{report['device_name']} ({report['device']}, {report['threads']} threads), torch {report['torch']}"
        + (f", {report['processes']} processes (images/s: all of them)" if report["processes"] > 1 else ""),
        f"config: {cfg['channels']}x{cfg['image_size']}x{cfg['image_size']}, width {cfg['width']}, "
        f"batch {cfg['batch_size']}, {'channels-last (NHWC)' if cfg['channels_last'] else 'NCHW'}, "
        f"median of {cfg['steps']} after {cfg['warmup']} warm-up",
        f"{'':18} {'s/step':>9} {'images/s':>9} {'GFLOP':>9} {'GFLOP/s':>9} {'of matmul':>9} {'peak MiB':>9}"
        + (f" {'alloc MiB':>9}" if any("peak_allocated_bytes" in r for r in report["results"].values()) else ""),
    ]
    for name, r in report["results"].items():
        images = f"{r['images_per_second']:9.1f}" if r["images_per_second"] else f"{'':9}"
        share = f"{r['share_of_matmul']:9.0%}" if "share_of_matmul" in r else f"{'':9}"
        allocated = f" {r['peak_allocated_bytes'] / 2**20:9.1f}" if "peak_allocated_bytes" in r else ""
        lines.append(f"{name:18} {r['seconds']:9.4f} {images} {r['flops'] / 1e9:9.2f} "
                     f"{r['flop_per_second'] / 1e9:9.1f} {share} {r['peak_memory_bytes'] / 2**20:9.1f}{allocated}")
    if "naive_over_project" in report:
        lines.append(f"naive / project: {report['naive_over_project']:.2f}x")
    else:
        lines.append(f"gradients averaged by DDP hooks (project) vs bucketed all-reduce: the all-reduce step takes "
                     f"{report['allreduce_over_ddp']:.2f}x as long")
    for name, r in report["results"].items():
        if "speedup_over_fp32_eager" in r:
            lines.append(f"{name} / project (fp32 eager): {r['speedup_over_fp32_eager']:.2f}x faster")
    if "channels_last_speedup" in report:
        lines.append(f"channels-last speed-up over NCHW (project_contiguous / project): "
                     f"{report['channels_last_speedup']:.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--amp", default="off", choices=config.AMP_DTYPES, help="also time the step in this precision")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="memory format of the timed steps (default: as training on the device: NHWC on the CPU)")
    p.add_argument("--compile", action="store_true", help="also time the step with torch.compile")
    p.add_argument("--json", help="also write the report as JSON to this file")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    replicas = SINGLE
    try:
        if args.batch_size < 2 or args.steps < 1 or args.warmup < 0:
            raise UsageError("--batch-size must be at least 2, --steps at least 1 and --warmup at least 0.")
        if distributed.launched_by_torchrun():
            replicas = distributed.start(args.device)
        report = bench(args.image_size, args.channels, args.width, args.batch_size, args.device, args.steps,
                       args.warmup, args.amp, args.channels_last, args.compile, replicas)
    except (UsageError, models.ConfigError, distributed.LaunchError) as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process meets it; rank 0 says so
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.stop(replicas)
    if not replicas.is_main:
        return 0
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run())
