"""What tests/test_distributed.py starts under torchrun: main.py's training, or a gradient check,
recording what each process did into $VAEGAN_RECORD/rank<R>.pt.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py train MAIN_ARGS...
    ... tests/ddp_worker.py gradients
    ... tests/ddp_worker.py die MAIN_ARGS...     (rank 1 is killed at its third step)
"""
import dataclasses
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import distributed  # noqa: E402
import config  # noqa: E402
import main  # noqa: E402
import models  # noqa: E402
import step  # noqa: E402
import utils  # noqa: E402
from models import NetworkConfig  # noqa: E402

RANK = int(os.environ["RANK"])
RECORD = Path(os.environ["VAEGAN_RECORD"])


def run_main_recording(argv: list[str], die_at_step: int | None = None) -> int:
    """main.main(argv), recording the gate's decisions, the sample indices trained on, every file
    written and, at the end, the networks' parameters."""
    record = {"gate": [], "indices": [], "writes": [], "parameters": {}}
    captured = {}

    gate = step.equilibrium_gate
    step.equilibrium_gate = lambda *args: record["gate"].append(gate(*args)) or record["gate"][-1]

    build = models.build_networks

    def build_and_capture(*args, **kwargs):
        nets = build(*args, **kwargs)
        if next(nets.decoder.parameters()).device.type != "meta":  # not the memory estimate's shapes
            captured.setdefault("nets", nets)
        return nets
    models.build_networks = build_and_capture

    epoch = data.Batches.epoch

    def recorded_epoch(self, number, start=0):
        order = self.order(number)[start * self.batch_size: len(self) * self.batch_size].split(self.batch_size)
        for indices, item in zip(order, epoch(self, number, start)):
            record["indices"].extend(indices.tolist())
            yield item
    data.Batches.epoch = recorded_epoch

    atomic_path = utils.atomic_path
    utils.atomic_path = lambda path: record["writes"].append(str(path)) or atomic_path(path)
    metrics_log = utils.MetricsLog.__init__
    utils.MetricsLog.__init__ = lambda self, path, *a: record["writes"].append(str(path)) or metrics_log(self, path, *a)

    if die_at_step is not None:
        train_step, steps_taken = step.train_step, []

        def dying_step(*args, **kwargs):
            steps_taken.append(1)
            if RANK == 1 and len(steps_taken) == die_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return train_step(*args, **kwargs)
        step.train_step = dying_step

    code = main.main(argv)
    record["parameters"] = {name: {k: v.clone() for k, v in module.named_parameters()}
                            for name, module in captured["nets"].modules().items()}
    torch.save(record, RECORD / f"rank{RANK}.pt")
    return code


def gradients() -> int:
    """Each process's own gradients and statistics, then the averaged ones, for both ways of averaging."""
    result, group = {}, distributed.start("cpu")
    for grad_sync in distributed.GRAD_SYNCS:
        replicas = dataclasses.replace(group, grad_sync=grad_sync)
        cfg = config.LossConfig(equilibrium=None)  # every network updated: every gradient is compared
        torch.manual_seed(0)
        nets = models.build_networks(NetworkConfig(image_size=16, width=0.125))
        generator = torch.Generator().manual_seed(100 + RANK)  # each process its own images and noise
        x = torch.rand(8, 1, 16, 16, generator=generator) * 2 - 1
        noise = torch.randn(2, 8, 128, generator=generator)
        local_stats = step.compute_gradients(nets, x, cfg, noise)
        local = {name: [p.grad.clone() for p in m.parameters()] for name, m in nets.modules().items()}
        step_nets, precision, _ = step.fast_paths(nets, "off", False, False, torch.device("cpu"), replicas)
        optimizers = step.build_optimizers(nets, 3e-4, 0.9)
        stats = step.train_step(step_nets, optimizers, x, cfg, noise, replicas=replicas)
        result[grad_sync] = {
            "local": local,
            "averaged": {name: [p.grad.clone() for p in m.parameters()] for name, m in nets.modules().items()},
            "local_stats": {k: float(v) for k, v in local_stats.items()},
            "stats": stats,
        }
        dist.barrier()
    torch.save(result, RECORD / f"rank{RANK}.pt")
    distributed.stop(group)
    return 0


if __name__ == "__main__":
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "gradients":
        sys.exit(gradients())
    sys.exit(run_main_recording(argv, die_at_step=3 if mode == "die" else None))
