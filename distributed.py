"""Training in several processes under torchrun: the process group and what the processes share.

    torchrun --nproc-per-node N main.py --dataset celeba ...

torchrun starts the processes and sets RANK, LOCAL_RANK and WORLD_SIZE; main.py sees them
and joins the process group here (NCCL on CUDA, gloo on the CPU). Each process trains on its
own shard of every epoch (data.Batches) with --batch-size images per step. Before each
optimizer step the gradients of all three networks are averaged across processes, so every
replica applies the same update; the equilibrium gate decides from statistics averaged the
same way, so every replica skips the same updates.

The training step computes each network's gradient from its own loss with
torch.autograd.backward(..., inputs=that network's parameters), which fires
DistributedDataParallel's hooks: "ddp" lets DDP average the gradients, overlapping with the
backward pass; "allreduce" averages them afterwards in explicit 25 MiB buckets. bench.py
compares the two under torchrun: on the CPU (gloo) the all-reduce was as fast or faster
(docs/benchmarks.md), so "auto" takes it there and DDP on CUDA (NCCL), for which DDP is built.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
GRAD_SYNCS = ("ddp", "allreduce")  # and "auto": allreduce on the CPU, ddp on CUDA
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size
# Control decisions (stop, skip, "rank 0 is ready") travel on a CPU (gloo) group that waits this
# long: rank 0 may spend an hour downloading CelebA while the others wait for it.
CONTROL_TIMEOUT = timedelta(hours=6)


class LaunchError(Exception):
    """A torchrun launch that cannot run here; the message says what to do instead."""


@dataclass(frozen=True)
class Replicas:
    """This process's place among the processes that train one model (one process by default)."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    grad_sync: str = "ddp"
    control: object = None  # the gloo group for decisions (a torch ProcessGroup)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes the run's files."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module the step should call: wrapped in DDP when DDP averages the gradients."""
        if not (self.active and self.grad_sync == "ddp"):
            return module
        # The first convolution of grey images has a (c, 1, k, k) weight, whose size-1 dimension may
        # take either stride. The discriminator applies it to the real and the generated batch, and
        # the sum of the two gradients comes out with the other stride, which DDP copies into its
        # bucket (c*k*k numbers) after warning once per process that this "may impair performance".
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        device_ids = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def average_gradients(self, modules: list[nn.Module]) -> None:
        """Average the gradients the step set, in buckets ("allreduce"; DDP has done it already)."""
        if not (self.active and self.grad_sync == "allreduce"):
            return
        grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
        pending = []
        for bucket in buckets(grads, BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            pending.append((dist.all_reduce(flat, async_op=True), flat, bucket))
        for work, flat, bucket in pending:  # all buckets are in flight before the first wait
            work.wait()
            flat /= self.world_size
            for grad, averaged in zip(bucket, flat.split([g.numel() for g in bucket])):
                grad.copy_(averaged.view_as(grad))

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over processes of a float tensor that every process passes."""
        if not self.active:
            return values
        total = values.detach().to(self.device, torch.float32, copy=True)
        dist.all_reduce(total)
        return (total / self.world_size).to(values.device)

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any of them."""
        if not self.active:
            return flag
        value = torch.tensor([float(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.control)


SINGLE = Replicas()


def buckets(tensors: list[torch.Tensor], cap_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype, each at most `cap_bytes` (or one larger tensor)."""
    runs: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not runs or size + nbytes > cap_bytes or runs[-1][0].dtype != t.dtype:
            runs.append([])
            size = 0
        runs[-1].append(t)
        size += nbytes
    return runs


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def process_device(name: str, local_rank: int, local_world_size: int) -> torch.device:
    """This process's device for --device `name`: the GPU of its local rank, or the CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        name = "cuda" if gpus else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if gpus < local_world_size:
            found = f"PyTorch finds {gpus}" if gpus else "PyTorch finds no CUDA GPU here"
            fewer = f"start torchrun with --nproc-per-node {gpus}, " if gpus else ""
            raise LaunchError(f"--device cuda with {local_world_size} processes on this machine needs "
                              f"{local_world_size} GPUs (one a process), but {found}. Instead {fewer}use --device "
                              "cpu (gloo), or run on a machine with a GPU for each process.")
        return torch.device("cuda", local_rank)
    raise LaunchError(f"--device {name} cannot be shared by several processes: under torchrun use --device cuda "
                      "(each process takes the GPU of its local rank), cpu, or auto.")


def start(device_name: str, grad_sync: str = "auto") -> Replicas:
    """Join the process group that torchrun set up, on this process's own device."""
    rank, local_rank, world_size = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = process_device(device_name, local_rank, local_world_size)
    if grad_sync == "auto":
        grad_sync = "ddp" if device.type == "cuda" else "allreduce"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return Replicas(rank, world_size, device, grad_sync)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Replicas(rank, world_size, device, grad_sync, control)


def lost_contact(error: RuntimeError) -> bool:
    """Whether `error` is a collective that failed because another process is gone."""
    backends = ("gloo", "NCCL", "nccl", "Connection reset", "Connection closed")
    several = launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1
    return isinstance(error, dist.DistError) or (several and any(word in str(error) for word in backends))


def convert_sync_batchnorm(nets, replicas: Replicas) -> str:
    """--sync-bn: BatchNorm layers of `nets` (models.Networks) that normalise by all processes'
    statistics; returns a note saying so."""
    if not replicas.active:
        return "note: --sync-bn has no effect in a single process"
    for name, module in nets.modules().items():
        setattr(nets, name, nn.SyncBatchNorm.convert_sync_batchnorm(module))
    return "SyncBatchNorm: BatchNorm statistics over all processes' images"


def backend_name() -> str:
    return dist.get_backend() if dist.is_initialized() else "no process group"


def stop(replicas: Replicas) -> None:
    if replicas.active and dist.is_initialized():
        dist.destroy_process_group()
