"""Train a VAE/GAN (Larsen et al. 2016, arXiv 1512.09300), and the commands on a trained checkpoint.

    python3 main.py --dataset mnist                      # train (the default command)
    python3 main.py sample --checkpoint RUN_DIR ...      # sample, reconstruct, interpolate, attributes, evaluate

This file is the front door: one table of commands, one way of parsing them, one error policy
(bad input: one paragraph, exit code 2, nothing on disk changed), and the training run, whose
loop fetches a batch, takes Algorithm 1's step (step.py), logs, writes grids, saves and stops.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import distributed
import evaluate
import kernels
import latent
import models
import step
import utils
from config import TrainConfig, UsageError
from distributed import SINGLE, Replicas

SAMPLE_GRID = 64          # prior samples in each sample grid (8x8)
GRID_COLUMNS = 8          # samples in each row of a grid
RECONSTRUCTION_PAIRS = 32  # held-out images (and their reconstructions) in each reconstruction grid
TIMING_STEPS = 10          # report the measured step time after this many steps
EVAL_SAMPLES = 2000        # prior samples (and held-out images) behind each --eval-every measurement
T = TypeVar("T")


class TrainingDiverged(Exception):
    """A loss became NaN or infinite."""


class FollowerExit(Exception):
    """Under torchrun: rank 0 met an error (and reports it); the other processes leave quietly."""


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = StopRequest.EXIT_CODES[signum]


# ---------------------------------------------------------------------------
# The front door: the commands, their parsers, the error policy
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], list[Path]]  # returns the files it wrote


def train_command(args: argparse.Namespace) -> list[Path]:
    """Train from scratch or continue a checkpoint (--resume), in this process or under torchrun."""
    replicas = SINGLE
    try:
        if distributed.launched_by_torchrun():
            replicas = distributed.start(args.device, args.grad_sync)
            device = replicas.device
        else:
            device = config.resolve_device(args.device)
        kernels.keep_freed_memory(device)
        say = print if replicas.is_main else (lambda *a, **k: None)
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1  # processes on one memory
        if args.resume:
            state = utils.load_checkpoint(args.resume)
            run_dir = utils.checkpoint_path(args.resume).parent
            cfg = config.resume_config(TrainConfig.from_saved(state["config"]), args, args.typed, device, run_dir, say)
            config.check_memory(cfg, device, sharing)
            Run(cfg, replicas, resume=state).train()
        else:
            cfg, preset_line = config.resolve_config(args, device)
            config.check_run_folder(cfg, resuming=False)
            config.check_memory(cfg, device, sharing)
            train_new_run(cfg, replicas, preset_line)
    finally:
        distributed.stop(replicas)
    return []


def train_new_run(cfg: TrainConfig, replicas: Replicas, preset_line: str) -> None:
    """A new run; if memory runs out before its first checkpoint, the folder it made is removed again."""
    out = Path(cfg.out).expanduser()
    made = not out.exists()
    try:
        Run(cfg, replicas, preset_line=preset_line).train()
    except (RuntimeError, MemoryError) as error:
        if out_of_memory(error) and made and replicas.is_main and not (out / "checkpoint.pt").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the allocator running out of memory (CUDA's or the CPU's)."""
    return (isinstance(error, (torch.OutOfMemoryError, MemoryError))
            or "can't allocate memory" in str(error) or "not enough memory" in str(error))


COMMANDS = {
    "train": Command("Train a VAE/GAN (Larsen et al. 2016) and write sample grids, reconstruction grids, loss "
                     "plots, metrics.csv and a checkpoint. Training is the default command.",
                     config.add_training_arguments, train_command),
    "sample": Command("Decode N prior samples: a grid, an .npz of the images in [0, 1] and, with --individual, "
                      "one PNG each.", latent.add_sample_arguments, latent.sample_command),
    "reconstruct": Command("Held-out images (or --images) beside their reconstructions: a grid and an .npz.",
                           latent.add_reconstruct_arguments, latent.reconstruct_command),
    "interpolate": Command("Rows that walk the latent line between pairs of encoded images (or prior samples).",
                           latent.add_interpolate_arguments, latent.interpolate_command),
    "attributes": Command("The paper's visual attribute vectors (mean z with minus mean z without), added to and "
                          "subtracted from query images' z. Columns: original, reconstruction, -vector, +vector.",
                          latent.add_attributes_arguments, latent.attributes_command),
    "evaluate": Command("Figures for a checkpoint on the held-out split: pixel MSE and KL of reconstructions, a "
                        "sample-quality and a reconstruction-fidelity score.", evaluate.add_arguments,
                        evaluate.evaluate_command),
}


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command; every command's is built the same way."""
    others = ", ".join(c for c in COMMANDS if c != "train")
    parser = argparse.ArgumentParser(
        prog="main.py" if name == "train" else f"main.py {name}", description=COMMANDS[name].help,
        epilog=f"Other commands: main.py {{{others}}} --checkpoint RUN_DIR ... (each has its own --help)."
        if name == "train" else None)
    COMMANDS[name].add_arguments(parser)
    if int(os.environ.get("RANK", 0)) > 0:  # under torchrun rank 0 reports what all processes meet
        parser.error = lambda message: sys.exit(2)
    return parser


def typed_options(name: str, argv: list[str]) -> set[str]:
    """Destinations of the options typed on the command line (not filled in by defaults)."""
    shadow = build_parser(name)
    for action in shadow._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return set(vars(shadow.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    args = build_parser(name).parse_args(argv)
    args.typed = typed_options(name, argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        written = COMMANDS[name].run(args)
    except (UsageError, models.ConfigError) as error:  # the command line: the same in every process
        return report(error, rank, every_machine=False, code=2)
    except (distributed.LaunchError, data.DataError, utils.CheckpointError) as error:  # may differ between machines
        return report(error, rank, every_machine=True, code=2)
    except FollowerExit:
        return 2
    except OSError as error:  # a full or failing disk while writing outputs
        where = f" writing {error.filename}" if error.filename else ""
        then = ("the last good checkpoint is intact; free space (or fix the disk) and continue with --resume RUN_DIR"
                if name == "train" else "what was there before is intact; free space (or fix the disk) and run "
                "the command again")
        return report(f"{error.strerror or error}{where}. Files are written atomically, so {then}.", rank,
                      every_machine=True, code=2)
    except TrainingDiverged as error:
        return report(error, rank, every_machine=False, code=1)
    except (RuntimeError, MemoryError) as error:
        if out_of_memory(error):
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            advice = ("The run's networks and batch do not fit here; lower --batch-size, --image-size or --width. "
                      "The last checkpoint on disk, if any, is intact." if name == "train" else
                      "Ask for fewer images (--num and the other counts) or use a device with more memory.")
            return report(f"out of memory ({first[:200]}). {advice}", rank, every_machine=True, code=2)
        if not distributed.lost_contact(error):
            raise
        return report(f"lost contact with the other training processes ({str(error).strip().splitlines()[0]}): one "
                      "of them failed or was stopped, so torchrun stops them all. The last checkpoint on disk is "
                      "intact; continue with torchrun ... main.py --resume RUN_DIR.", rank, every_machine=True, code=1)
    except Stopped as stopped:
        if rank == 0:
            print(str(stopped), file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted at once; the last checkpoint on disk is kept.", file=sys.stderr)
        return 130
    for path in written:
        print(f"wrote {path}")
    return 0


def report(error: Exception | str, rank: int, every_machine: bool, code: int) -> int:
    """The one-paragraph error; returns the exit code. Under torchrun rank 0 reports it, and for what
    can differ between machines (devices, files) also the first process of every other machine."""
    other_machine = int(os.environ.get("GROUP_RANK", 0)) > 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0
    if rank == 0 or (every_machine and other_machine):
        print(f"error: {f'process {rank}: ' if rank else ''}{error}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------
# The training run
# ---------------------------------------------------------------------------

class Run:
    """One training run: data, networks and optimizers, where it stands, and what it writes.

    Under torchrun every process runs it on its own shard; rank 0 alone prints and writes.
    """

    def __init__(self, cfg: TrainConfig, replicas: Replicas = SINGLE, resume: dict | None = None,
                 preset_line: str = ""):
        self.cfg, self.replicas, self.device = cfg, replicas, torch.device(cfg.device)
        self.say = print if replicas.is_main else (lambda *args, **kwargs: None)
        self.step = self.epoch_batches = 0
        self.epoch, self.log, self.tensorboard = 1, None, None
        self.load_data()
        rank_0_first(replicas, lambda: prepare_out_dir(cfg, resuming=resume is not None), then_the_others=False)
        self.out = Path(cfg.out).expanduser()
        self.build()
        if resume is None:
            self.write_config()
        else:
            self.restore(resume)
        if replicas.rank > 0:  # its own noise (eps, z_p) in every other process
            seed_everything(cfg.seed + 1_000_003 * replicas.rank + self.step)
        self.quality = (evaluate.SampleQuality(cfg.dataset, Path(cfg.data_root).expanduser(), self.splits.heldout,
                                               EVAL_SAMPLES, cfg.image_size, self.labels)
                        if cfg.eval_every and replicas.is_main else None)
        if replicas.is_main:
            self.log = utils.MetricsLog(self.out / "metrics.csv", resume["history"] if resume else None,
                                        self.quality.columns() if self.quality else [])
        self.tensorboard = (utils.TensorBoardLog(self.out / "tb", resumed_at=self.step if resume else None)
                            if cfg.tensorboard and replicas.is_main else None)
        self.evolution = utils.EvolutionGif(self.out / "samples", len(self.batches))
        if self.epoch_batches >= len(self.batches):  # the checkpoint was written at an epoch's end
            self.epoch, self.epoch_batches = self.epoch + 1, 0
        self.total_steps = min(cfg.epochs * len(self.batches), cfg.max_steps or math.inf)
        self.print_banner(preset_line, resumed=resume is not None)

    def load_data(self) -> None:
        """The splits (rank 0 first: it downloads what is missing, then the others read what it wrote)."""
        cfg, replicas = self.cfg, self.replicas
        if cfg.sync_bn and replicas.active and self.device.type != "cuda":
            raise UsageError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU. Leave it out "
                             "(each process then normalises by the statistics of its own batch).")
        self.splits = rank_0_first(replicas, lambda: data.load_dataset(cfg.dataset, cfg.data_root, cfg.image_size,
                                                                       cfg.channels, self.say, cfg.conditional),
                                   then_the_others=True)
        config.check_labels(cfg, self.splits)
        self.labels = self.splits.labels if cfg.conditional else None  # what y names; None: unconditional
        self.batches = data.Batches(self.splits.train, cfg.batch_size, cfg.image_size, self.device, cfg.seed,
                                    cfg.num_workers, replicas.rank, replicas.world_size, self.labels)
        if len(self.batches) == 0:
            each = f" for each of {replicas.world_size} processes" if replicas.active else ""
            raise UsageError(f"the training split has {len(self.splits.train)} images, fewer than --batch-size "
                             f"{cfg.batch_size}{each}; lower --batch-size or add images.")
        heldout, heldout_labels = data.labelled_images(self.splits.heldout, RECONSTRUCTION_PAIRS, cfg.image_size)
        self.heldout = heldout.to(self.device)
        self.heldout_y = self.labels.vectors(heldout_labels).to(self.device) if self.labels else None

    def build(self) -> None:
        """The networks (the same initial weights in every process), optimizers and the step's fast paths."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.nets = models.build_networks(cfg.network_config(self.labels.dim if self.labels else 0), self.device,
                                          cfg.model)
        self.notes = [distributed.convert_sync_batchnorm(self.nets, self.replicas)] if cfg.sync_bn else []
        self.optimizers = step.build_optimizers(self.nets, cfg.lr, cfg.rmsprop_alpha)
        self.step_nets, self.precision, fast_path_notes = step.fast_paths(
            self.nets, cfg.amp, cfg.channels_last, cfg.compile, self.device, self.replicas)
        self.notes = fast_path_notes + self.notes
        self.layout = kernels.memory_format(cfg.channels_last)
        self.loss_cfg = cfg.loss_config()
        self.average = step.weight_average(self.nets.decoder, cfg.ema_decay)
        self.fixed_z, self.fixed_y = (t.to(self.device) if t is not None else None
                                      for t in fixed_codes(cfg, self.labels, self.heldout_y))

    def write_config(self) -> None:
        if self.replicas.is_main:
            counts = {name: models.count_parameters(m) for name, m in self.nets.modules().items()}
            utils.write_json({**asdict(self.cfg), "torch_version": torch.__version__, "parameters": counts,
                              "labels": list(self.labels.names) if self.labels else None,
                              "processes": self.replicas.world_size, "grad_sync": self.replicas.grad_sync,
                              "device_name": device_name(self.device)}, self.out / "config.json")

    def restore(self, state: dict) -> None:
        """Weights, optimizers (with this run's --lr and --rmsprop-alpha), RNG, loss scale and position."""
        saved = utils.checkpoint_labels(state)
        if saved != self.labels:  # a folder dataset whose class sub-folders changed since the run began
            names = [", ".join(labels.names) if labels else "none" for labels in (saved, self.labels)]
            raise UsageError(f"--resume: the run is conditioned on the labels {names[0]}, but its data now has "
                             f"{names[1]}; restore the data the run was started with.")
        utils.load_networks(state, self.nets)
        if self.average is not None:
            utils.load_weights(self.average, state, "decoder_average")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
            for group in optimizer.param_groups:  # a changed --lr or --rmsprop-alpha wins over the saved one
                group.update(lr=self.cfg.lr, alpha=self.cfg.rmsprop_alpha)
        utils.set_rng_state(state["rng"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.epoch_batches = state["step"], state["epoch"], state["epoch_batches"]
        saved_processes = state.get("processes", 1)
        if saved_processes != self.replicas.world_size:  # the same images done, in this run's (global) batches
            self.epoch_batches = self.epoch_batches * saved_processes // self.replicas.world_size
            self.say(f"note: the checkpoint was written by {saved_processes} process(es) and this run has "
                     f"{self.replicas.world_size}: the rest of epoch {self.epoch} is shared out anew from batch "
                     f"{self.epoch_batches}")

    def print_banner(self, preset_line: str, resumed: bool) -> None:
        cfg, replicas, say = self.cfg, self.replicas, self.say
        say(f"device: {self.device}" + (f" ({device_name(self.device)})" if self.device.type == "cuda" else ""))
        if replicas.active:
            say(f"processes: {replicas.world_size} ({distributed.backend_name()}, gradients averaged by "
                f"{replicas.grad_sync}), each on its own shard with --batch-size {cfg.batch_size}: "
                f"{replicas.world_size * cfg.batch_size} images per step in all")
        if preset_line:
            say(preset_line)
        say("parameters: " + ", ".join(f"{name} {models.count_parameters(m):,}" for name, m in self.nets.modules().items()))
        for note in self.notes:
            say(note)
        say(f"data: {cfg.dataset}, {len(self.splits.train):,} training images, {len(self.batches)} steps per epoch; "
            f"writing to {self.out}")
        if resumed:
            say(f"resuming at step {self.step}: epoch {self.epoch}, batch {self.epoch_batches} of {len(self.batches)}")

    def train(self) -> None:
        """The loop: fetch, step, log, write, save, stop; at each epoch's end, grids, plots and a checkpoint."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.autograd.set_detect_anomaly(self.cfg.detect_anomaly)
        self.first_step, self.skipped, self.bar = self.step, 0, None
        self.stop = StopRequest(quiet=not self.replicas.is_main)
        try:
            for self.epoch in range(self.epoch, self.cfg.epochs + 1):
                self.start_epoch()
                for x, y, wait in self.epoch_batches_left():       # fetch
                    row = self.train_one_step(x, y, wait)           # step
                    if self.quality and self.step % self.cfg.eval_every == 0:
                        row |= self.quality.measure(self.shown.decoder, self.cfg.latent_dim, self.device)
                    self.record(row)                                # log
                    if self.cfg.sample_every and self.step % self.cfg.sample_every == 0:
                        self.write_grids(f"step_{self.step:07d}")   # write
                    self.stop_if_signalled()                        # stop (after saving)
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                        self.save()                                 # save
                if not self.epoch_rows:
                    break
                self.end_epoch()
                if self.step >= self.total_steps:
                    break
        finally:
            self.close()
        self.replicas.barrier()
        self.say(f"done: {self.step} steps; grids in {self.out / 'samples'} and {self.out / 'reconstructions'}, "
                 f"plots in {self.out / 'plots'}, checkpoint {self.out / 'checkpoint.pt'}")

    def start_epoch(self) -> None:
        # A resumed run continues inside its first epoch; every later epoch starts at its first batch.
        self.position = self.epoch_batches if self.step == self.first_step else 0
        self.epoch_rows, self.epoch_start = [], time.perf_counter()
        left = max(0, min(len(self.batches) - self.position, self.total_steps - self.step))
        self.bar = tqdm(total=left, desc=f"epoch {self.epoch}/{self.cfg.epochs}", unit="step", dynamic_ncols=True,
                        leave=False, disable=not self.replicas.is_main)

    def epoch_batches_left(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, float]]:
        """This epoch's batches (images, labels or None) until it ends or the run has taken all its steps,
        with the seconds spent waiting for each; a batch too small for BatchNorm is skipped (by every process)."""
        batches = self.batches.epoch(self.epoch, self.position)
        while self.step < self.total_steps:
            wait_start = time.perf_counter()
            x, y, dropped = next(batches, (None, None, 0))
            if x is None:
                return
            self.skipped += dropped
            self.position += 1
            if not self.replicas.any(len(x) < 2):
                yield x.contiguous(memory_format=self.layout), y, time.perf_counter() - wait_start

    def train_one_step(self, x: torch.Tensor, y: torch.Tensor | None, wait: float) -> dict[str, float]:
        start = time.perf_counter()
        row = step.train_step(self.step_nets, self.optimizers, x, self.loss_cfg, precision=self.precision,
                              replicas=self.replicas, labels=y)
        self.step += 1
        if self.average is not None:
            self.average.update_parameters(self.nets.decoder)
        check_finite(row, self.cfg.model, self.step, self.out / "checkpoint.pt")
        return {"step": self.step, "epoch": self.epoch, **row, "sec_per_step": time.perf_counter() - start,
                "data_wait": wait}

    def record(self, row: dict[str, float]) -> None:
        """metrics.csv, the progress bar and, once, the measured time per step."""
        if self.log is not None:
            self.log.append(row)
        if self.tensorboard is not None:
            self.tensorboard.add_row(row)
        self.epoch_rows.append(row)
        self.bar.update(1)
        self.bar.set_postfix_str(" ".join(f"{label} {row[key]:{spec}}" for key, label, spec in BAR_FIELDS
                                          if math.isfinite(row[key])))
        if self.step == self.first_step + TIMING_STEPS + 2 and self.replicas.is_main:
            per_step = float(np.median([r["sec_per_step"] + r["data_wait"] for r in self.epoch_rows[2:]]))
            steps_left = self.total_steps - self.first_step
            tqdm.write(f"measured {per_step:.3f} s/step: an epoch of {len(self.batches)} steps takes about "
                       f"{format_duration(per_step * len(self.batches))}, the remaining {steps_left} steps about "
                       f"{format_duration(per_step * steps_left)}")

    def stop_if_signalled(self) -> None:
        """A signal to any process stops them all here, after the outputs and a checkpoint are written."""
        if self.replicas.any(self.stop.signum is not None):
            self.write_outputs(f"step_{self.step:07d}")  # show where it stopped
            self.replicas.barrier()  # no process leaves before the checkpoint is on disk
            signum = self.stop.signum or signal.SIGTERM
            raise Stopped(signum, f"stopped at step {self.step} ({signal.Signals(signum).name}); checkpoint saved. "
                          f"Continue with: {resume_command(self.out, self.replicas)}")

    def end_epoch(self) -> None:
        self.bar.close()
        self.write_outputs(f"epoch_{self.epoch:03d}")
        self.say(epoch_summary(self.epoch, self.cfg, self.epoch_rows, time.perf_counter() - self.epoch_start),
                 flush=True)
        if self.skipped:
            print(f"warning: skipped {self.skipped} unreadable image(s) so far" +
                  (f" (process {self.replicas.rank})" if self.replicas.active else ""), file=sys.stderr)

    @property
    def shown(self) -> models.Networks:
        """The networks the grids and --eval-every use: the decoder's weight average where there is one."""
        return self.nets if self.average is None else replace(self.nets, decoder=self.average.module)

    def write_grids(self, tag: str) -> None:
        """The sample grid of the fixed codes and the held-out reconstruction grid. Rank 0 writes them;
        with SyncBatchNorm every process computes them (its statistics gather over all processes)."""
        if not (self.replicas.is_main or self.cfg.sync_bn):
            return
        samples = models.decode_with_batch_statistics(self.shown.decoder, self.fixed_z, self.fixed_y)
        has_pairs = len(self.heldout) and self.nets.encoder is not None
        pairs = (utils.interleave(self.heldout, models.reconstruct(self.shown, self.heldout, self.heldout_y))
                 if has_pairs else None)
        if self.replicas.is_main:
            utils.write_grid(samples, self.out / "samples" / f"{tag}.png")
            self.evolution.write()
            if pairs is not None:
                utils.write_grid(pairs, self.out / "reconstructions" / f"{tag}.png")
            if self.tensorboard is not None:
                self.tensorboard.add_grid("samples", samples, self.step)
                if pairs is not None:
                    self.tensorboard.add_grid("reconstructions", pairs, self.step)

    def write_outputs(self, tag: str) -> None:
        """Grids, plots and checkpoint."""
        self.write_grids(tag)
        if self.replicas.is_main:
            utils.write_plots(self.log, self.out / "plots")
        self.save()

    def save(self) -> None:
        if self.replicas.is_main:  # the replicas are identical, so one checkpoint serves them all
            position = {"step": self.step, "epoch": self.epoch, "epoch_batches": self.position}
            state = utils.checkpoint_state(self.nets, self.optimizers, self.cfg, position, self.log.history(),
                                           self.labels)
            state["scaler"] = self.precision.scaler.state_dict() if self.precision.scaler is not None else {}
            state["processes"] = self.replicas.world_size
            if self.average is not None:
                state["decoder_average"] = self.average.state_dict()
            self.log.flush()
            if self.tensorboard is not None:
                self.tensorboard.flush()
            utils.write_checkpoint(state, self.out / "checkpoint.pt")

    def close(self) -> None:
        self.stop.restore()
        if self.bar is not None:
            self.bar.close()  # clears the progress line before any error message
        if self.log is not None:
            self.log.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


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


def prepare_out_dir(cfg: TrainConfig, resuming: bool) -> Path:
    """Create the run folder (config.check_run_folder has refused what it may not reuse)."""
    config.check_run_folder(cfg, resuming)  # again: the folder may have changed since the start
    out = Path(cfg.out).expanduser()
    try:
        for sub in ("", "samples", "reconstructions", "plots"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write into --out {out} ({error.strerror}); choose a writable folder.") from None
    return out


def fixed_codes(cfg: TrainConfig, labels: data.Labels | None,
                heldout_y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (z, y) of every sample grid: SAMPLE_GRID codes; for a conditional run one row per class (or
    per attribute vector of the first held-out images), each row with the same 8 codes."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if labels is None:
        return torch.randn(SAMPLE_GRID, cfg.latent_dim, generator=generator), None
    rows = heldout_y[:GRID_COLUMNS].cpu() if labels.attributes else labels.vectors(torch.arange(labels.dim))
    z = torch.randn(GRID_COLUMNS, cfg.latent_dim, generator=generator)
    return z.repeat(len(rows), 1), rows.repeat_interleave(GRID_COLUMNS, 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def resume_command(out: Path, replicas: Replicas) -> str:
    launcher = f"torchrun --nproc-per-node {replicas.world_size} main.py" if replicas.active else "python3 main.py"
    return f"{launcher} --resume {out}"


def check_finite(row: dict[str, float], model: str, step_number: int, checkpoint: Path) -> None:
    """TrainingDiverged naming the first loss term that is NaN or infinite."""
    bad = [k for k in step.LOSS_TERMS[model] if not math.isfinite(row[k])]
    if not bad:
        return
    kept = (f"The last good checkpoint {checkpoint} (step {torch.load(checkpoint, weights_only=True)['step']}) is "
            "untouched; resume from it with" if checkpoint.exists() else "No checkpoint was written yet; try")
    raise TrainingDiverged(f"training diverged: {bad[0]} became {row[bad[0]]} at step {step_number}. {kept} a lower "
                           "--lr or --gamma, and --detect-anomaly to find the operation that produced it.")


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


if __name__ == "__main__":
    sys.exit(main())
