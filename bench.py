"""Benchmark the training step against a naive step and the machine's matmul rate, in one process.

    python3 bench.py [--image-size 64] [--channels 1] [--width 1.0] [--batch-size 64] [--amp auto]
                     [--device auto] [--steps N] [--[no-]channels-last] [--compile] [--json FILE]

The measurements alternate (A B C A B C ...) after a warm-up, so that drift on a noisy machine
affects all of them alike:
  project                  step.train_step as training runs it by default: in the default
                           precision (--amp auto: bf16 where the device has bfloat16 matrix
                           units) and memory format (channels-last on the CPU);
  naive                    the same forward pass in float32, then one full backward pass per
                           network's loss with retain_graph (how most public ports do it);
  project_fp32             the project's step in float32 (when the default is not float32);
  project_contiguous       ... in NCHW: channels-last's speed-up;
  project_memory_returned  ... with glibc returning freed memory (CPU): keeping it's speed-up;
  project_compile          ... with torch.compile (--compile);
  matmul_fp32, _bf16       a large matrix product in each precision timed: the machine's rate,
                           which each step's FLOP/s is compared with in its own precision.
Every step updates all three networks (equilibrium gate off), so that they do equal work. Peak
memory is measured afterwards, in one more step of each, so that measuring it does not slow the
timed ones: on the CPU, peak MiB is the growth of resident memory with every large block mapped
on its own, alloc MiB the peak growth of what PyTorch's allocator handed out (from the
profiler's memory events).

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
    generated = torch.cat([nets.decoder(z), nets.decoder(z_prior)])
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
          device: str = "auto", steps: int = 5, warmup: int = 1, amp: str = "auto",
          channels_last: bool | None = None, compile: bool = False, replicas: Replicas = SINGLE) -> dict:
    """Run the measurements alternately; returns the report as a dict."""
    dev = replicas.device if replicas.active else config.resolve_device(device)
    kernels.keep_freed_memory(dev)  # as training does
    layout = kernels.default_channels_last(dev) if channels_last is None else channels_last
    precision = config.resolve_amp(amp, dev)[0]
    torch.manual_seed(replicas.rank)  # under torchrun each process its own images
    network_cfg = NetworkConfig(image_size=image_size, channels=channels, width=width)
    x = torch.rand(batch_size, channels, image_size, image_size, device=dev) * 2 - 1
    cases = step_cases(network_cfg, x, precision, layout, compile, replicas)
    matmuls = {"off": "matmul_fp32", "bf16": "matmul_bf16", "fp16": "matmul_fp16"}
    for amp_name in {"off"} | {case["precision"] for case in cases.values()}:
        run, flops = matmul_case(dev, config.AMP_DTYPES[amp_name] or torch.float32)
        cases[matmuls[amp_name]] = {"run": run, "flops": flops, "images": 0, "precision": amp_name}
    for name, case in cases.items():  # the fast paths do the arithmetic of the eager step in its precision
        case.setdefault("flops", count_flops(case["run"]) if name in ("project", "naive") else None)
    for case in cases.values():
        case["flops"] = case["flops"] or cases["project"]["flops"]
    times = time_alternately(cases, dev, steps, warmup)
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
        "precision": precision,
        "config": {"image_size": image_size, "channels": channels, "width": width, "batch_size": batch_size,
                   "channels_last": layout, "steps": steps, "warmup": warmup},
        "results": {},
    }
    for name, case in cases.items():
        seconds = statistics.median(times[name])
        report["results"][name] = {
            "seconds": seconds, "precision": case["precision"],
            "images_per_second": case["images"] / seconds if case["images"] else None,
            "flops": case["flops"],
            "flop_per_second": case["flops"] / seconds,
            "peak_memory_bytes": peaks[name]["bytes"],
            **({"peak_allocated_bytes": peaks[name]["allocated_bytes"]} if "allocated_bytes" in peaks[name] else {}),
        }
    for name, result in report["results"].items():
        if not name.startswith("matmul"):  # each step against the matmul rate of its own precision
            result["share_of_matmul"] = result["flop_per_second"] / report["results"][
                matmuls[result["precision"]]]["flop_per_second"]
    add_ratios(report)
    return report


def step_cases(network_cfg: NetworkConfig, x: torch.Tensor, precision: str, layout: bool, compile: bool,
               replicas: Replicas) -> dict[str, dict]:
    """The steps to time: the training step as the defaults run it ("project", in `precision`), and
    each thing that makes it fast switched off in turn; one process: also the naive float32 step."""
    images = len(x) * replicas.world_size
    if replicas.active:  # the two ways of averaging gradients, instead of the naive step
        return {name: {"run": fast_path_case(network_cfg, x, precision, layout,
                                             replicas=dataclasses.replace(replicas, grad_sync=sync)),
                       "images": images, "precision": precision}
                for name, sync in (("project", "ddp"), ("project_allreduce", "allreduce"))}
    cases = {"project": {"run": fast_path_case(network_cfg, x, precision, layout), "precision": precision}}
    nets = models.build_networks(network_cfg, x.device)
    optimizers = step.build_optimizers(nets, 3e-4, 0.9)
    naive_x = in_format(nets, x, layout)
    cases["naive"] = {"run": lambda: naive_step(nets, optimizers, naive_x, ALL_UPDATES), "precision": "off"}
    if precision != "off":
        cases["project_fp32"] = {"run": fast_path_case(network_cfg, x, "off", layout), "precision": "off"}
    if layout:
        cases["project_contiguous"] = {"run": fast_path_case(network_cfg, x, precision, False), "precision": precision}
    if kernels.glibc() is not None and x.device.type == "cpu":
        cases["project_memory_returned"] = {"run": memory_returned(fast_path_case(network_cfg, x, precision, layout),
                                                                   x.device), "precision": precision}
    if compile:
        cases["project_compile"] = {"run": fast_path_case(network_cfg, x, precision, layout, compile=True),
                                    "precision": precision}
    for case in cases.values():
        case["images"] = images
    return cases


def memory_returned(run: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """`run` with glibc returning freed memory to the system (its default), as training would without
    kernels.keep_freed_memory; training's setting is restored afterwards."""
    def returned() -> None:
        kernels.keep_freed_memory(device, keep=False)
        kernels.glibc().malloc_trim(0)
        try:
            run()
        finally:
            kernels.keep_freed_memory(device)
    return returned


def time_alternately(cases: dict[str, dict], device: torch.device, steps: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(warmup + steps):
        for name, case in cases.items():
            synchronize(device)
            start = time.perf_counter()
            case["run"]()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def add_ratios(report: dict) -> None:
    """The speed-ups the report's comparisons give: another step's time over the project's."""
    results = report["results"]
    compared = {"allreduce_over_ddp": "project_allreduce", "naive_over_project": "naive",
                "fp32_over_project": "project_fp32", "channels_last_speedup": "project_contiguous",
                "kept_memory_speedup": "project_memory_returned", "compile_slowdown": "project_compile"}
    for key, name in compared.items():
        if name in results:
            report[key] = results[name]["seconds"] / results["project"]["seconds"]


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
        f"project in {config.PRECISIONS[report['precision']].split(' (')[0]}, "
        f"median of {cfg['steps']} after {cfg['warmup']} warm-up",
        f"{'':24} {'s/step':>9} {'images/s':>9} {'GFLOP':>9} {'GFLOP/s':>9} {'of matmul':>9} {'peak MiB':>9}"
        + (f" {'alloc MiB':>9}" if any("peak_allocated_bytes" in r for r in report["results"].values()) else ""),
    ]
    for name, r in report["results"].items():
        images = f"{r['images_per_second']:9.1f}" if r["images_per_second"] else f"{'':9}"
        share = f"{r['share_of_matmul']:9.0%}" if "share_of_matmul" in r else f"{'':9}"
        allocated = f" {r['peak_allocated_bytes'] / 2**20:9.1f}" if "peak_allocated_bytes" in r else ""
        lines.append(f"{name:24} {r['seconds']:9.4f} {images} {r['flops'] / 1e9:9.2f} "
                     f"{r['flop_per_second'] / 1e9:9.1f} {share} {r['peak_memory_bytes'] / 2**20:9.1f}{allocated}")
    explained = {
        "naive_over_project": "naive float32 step / project",
        "fp32_over_project": "float32 step (project_fp32) / project: the default precision's speed-up",
        "channels_last_speedup": "NCHW (project_contiguous) / project: channels-last's speed-up",
        "kept_memory_speedup": "freed memory returned (project_memory_returned) / project: keeping it's speed-up",
        "compile_slowdown": "torch.compile (project_compile) / project: below 1 is a speed-up",
        "allreduce_over_ddp": "bucketed all-reduce / DDP hooks",
    }
    lines += [f"{text}: {report[key]:.2f}x" for key, text in explained.items() if key in report]
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
    p.add_argument("--amp", default="auto", choices=("auto", *config.AMP_DTYPES),
                   help="the precision of the project's step (default: as training, auto); the float32 step is "
                        "timed beside it")
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
