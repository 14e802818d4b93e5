"""Every setting of a training run, each declared once, and what is built from the declarations.

A setting is a field of `LossConfig` (what Algorithm 1 reads, step.py) or of `TrainConfig` (the
rest of a run), declared with `setting(...)`: its default, help text, check, and whether
`--resume` may change it. The command line (`add_training_arguments`), validation (`validate`),
the resume rules (`resume_config`) and config.json all come from those declarations. Presets
fill in what a command line leaves out; `resolve_device` turns --device into a device this
machine has. The options the checkpoint commands share are declared here too.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import math
import os
from dataclasses import Field, asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

import data
import distributed
import kernels
import losses
import models
from models import MODELS, NetworkConfig


class UsageError(Exception):
    """A command line that cannot run; the message says what to do instead."""


@dataclass(frozen=True)
class Check:
    """A rule a setting's value must meet; `rule` completes the sentence "--flag VALUE ..."."""
    ok: Callable[[Any], bool]
    rule: str


def at_least(low: float, why: str = "") -> Check:
    return Check(lambda v: v >= low, f"must be at least {low}{why}")


def within(low: float, high: float, why: str = "") -> Check:
    return Check(lambda v: low <= v <= high, f"must be in [{low}, {high}]{why}")


NOT_NEGATIVE = Check(lambda v: v >= 0, "must not be negative")

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --amp: the autocast dtype
PRECISIONS = {"off": "float32", "bf16": "bfloat16 autocast (losses, the gate's BCEs, optimizer state and "
              "checkpoints in float32)", "fp16": "float16 autocast with loss scaling"}
DECODER_WEIGHTS = ("average", "last")  # the checkpoint commands' --decoder
GROUPS = ("data", "model", "loss", "training", "speed", "output")


def setting(default: Any, help: str, group: str, *, check: Check | None = None, choices: tuple | None = None,
            resume: bool = False, preset: bool = False, shown: str | None = None, type: Callable | None = None,
            none_flag: tuple[str, str] | None = None) -> Any:
    """Declare one setting (a dataclass field).

    resume: --resume may change it (the flag wins, with a note); else the checkpoint's value is fixed.
    preset: --preset fills it in when the command line leaves it out.
    shown: the default as --help and the README show it, where it is decided at start (auto, preset).
    none_flag: (flag, help) of a second flag that sets the value to None, e.g. --no-equilibrium.
    """
    return field(default=default, metadata=dict(help=help, group=group, check=check, choices=choices, resume=resume,
                                                preset=preset, shown=shown, type=type, none_flag=none_flag))


@dataclass(frozen=True)
class LossConfig:
    """The settings Algorithm 1 reads (step.py): which objectives, how they are weighted, the gate."""
    model: str = setting("vaegan", "vaegan (the paper), or a baseline: vae (pixel error), vae-disl (Dis_l error, no "
                         "GAN gradient to the decoder), gan (no encoder)", "model", choices=tuple(MODELS))
    gamma: float = setting(1e-5, "decoder weight of L_llike against L_GAN", "loss", resume=True,
                           check=within(0, 1, " (the paper uses 1e-5)"))
    llike_weight: float = setting(1.0, "encoder weight of L_llike; below 1 is a stronger prior", "loss", resume=True,
                                  check=Check(lambda v: v >= 0, "must not be negative (1 is the paper's)"))
    real_weight: float = setting(0.5, "weight of real images in L_GAN", "loss", resume=True,
                                 check=Check(lambda v: 0 < v < 1, "must be strictly between 0 and 1 (default 0.5)"))
    gan_loss: str = setting("minimax", "decoder's GAN objective", "loss", choices=losses.GAN_LOSSES, resume=True)
    equilibrium: float | None = setting(0.68, "centre of the BCE band that gates updates", "loss", resume=True,
                                        none_flag=("--no-equilibrium", "update both networks every step"))
    margin: float = setting(0.35, "half-width of that band", "loss", resume=True, preset=True,
                            check=Check(lambda v: v >= 0, "must not be negative (the paper's is 0.35)"))
    dis_gate: str = setting("either", "the gate skips the discriminator when either of its BCEs is below the band "
                            "(the authors' rule) or only when both are", "loss", choices=("either", "both"),
                            resume=True, preset=True)


@dataclass(frozen=True)
class TrainConfig(LossConfig):
    """Every setting of a run, resolved (config.json and checkpoints hold these fields)."""
    dataset: str = setting("mnist", "what to train on", "data", choices=tuple(data.DATASETS))
    data_root: str = setting("./data", "where datasets are read or downloaded (folder: the image folder)", "data",
                             resume=True)
    image_size: int = setting(NetworkConfig.image_size, "square image side, a multiple of 8 from 16", "data",
                              preset=True)
    channels: int = setting(NetworkConfig.channels, "1 or 3; only for --dataset folder", "data", choices=(1, 3),
                            shown="the dataset's; 3 for folder")
    num_workers: int = setting(2, "loader processes for file datasets", "data", resume=True, check=NOT_NEGATIVE)
    preset: str = setting("auto", "auto: paper on CUDA/MPS, cpu on a CPU; explicit flags always win", "model",
                          choices=("auto", "paper", "cpu"))
    latent_dim: int = setting(NetworkConfig.latent_dim, "size of z", "model")
    width: float = setting(NetworkConfig.width, "multiplies every channel and hidden-unit count", "model", preset=True)
    recon_layer: int = setting(NetworkConfig.recon_layer, "discriminator convolution (1-4) whose output is Dis_l",
                               "model")
    conditional: bool = setting(False, "condition the encoder, decoder and discriminator on the label: the class "
                                "(mnist, fashion-mnist, cifar10, a folder's class sub-folders) or CelebA's 40 "
                                "attributes", "model")
    label_layers: str = setting("every", "with --conditional, where the label enters: every convolution and linear "
                                "layer, as the authors' code does, or each network's first layer only (concatenated "
                                "to z, constant image channels)", "model", choices=models.LABEL_LAYERS)
    batch_size: int = setting(64, "images per step", "training",
                              check=at_least(2, " images: BatchNorm needs two (the paper uses 64)"))
    lr: float = setting(3e-4, "RMSprop learning rate of all three networks", "training", resume=True,
                        check=Check(lambda v: v > 0, "must be positive (the paper uses 3e-4)"))
    rmsprop_alpha: float = setting(0.9, "RMSprop smoothing constant", "training", resume=True,
                                   check=Check(lambda v: 0 <= v < 1, "must be in [0, 1) (the authors use 0.9)"))
    ema_decay: float = setting(0.0, "decay of a moving average of the decoder's weights, which the grids, "
                               "--eval-every and the checkpoint commands use (0: none, the last step's weights)",
                               "training", preset=True, check=Check(lambda v: 0 <= v < 1, "must be in [0, 1) "
                               "(0: no average; 0.999 averages over about the last thousand steps)"))
    epochs: int = setting(25, "passes over the training split", "training", preset=True, resume=True,
                          check=at_least(1))
    max_steps: int | None = setting(None, "stop after this many steps in all", "training", resume=True,
                                    check=at_least(1), shown="none", type=int)
    seed: int = setting(0, "makes a run repeatable", "training")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps (auto: CUDA, then MPS, then CPU)", "speed",
                          resume=True)
    amp: str = setting("auto", "precision: auto (bf16 where the device has bfloat16 matrix units: CUDA compute "
                       "capability 8.0 and later, CPUs with AMX or AVX-512 BF16; float32 elsewhere), off (float32), "
                       "bf16, or fp16 with loss scaling", "speed", resume=True, choices=("auto", *AMP_DTYPES))
    channels_last: bool | None = setting(None, "NHWC memory format for the networks and images", "speed", resume=True,
                                         shown="on for the CPU, off elsewhere", type=bool)
    compile: bool = setting(False, "torch.compile the three networks (falls back to eager)", "speed", resume=True)
    sync_bn: bool = setting(False, "under torchrun on GPUs: BatchNorm statistics over all processes' images "
                            "(SyncBatchNorm)", "speed", resume=True)
    grad_sync: str = setting("auto", "under torchrun, how gradients are averaged: DDP's hooks or bucketed "
                             "all-reduces (auto: allreduce on the CPU, ddp on CUDA)", "speed", resume=True,
                             choices=("auto", *distributed.GRAD_SYNCS))
    detect_anomaly: bool = setting(False, "torch.autograd anomaly detection (slow; for debugging)", "speed",
                                   resume=True)
    out: str = setting("", "run folder", "output", shown="runs/<dataset>-<date-time>")
    sample_every: int = setting(0, "also write grids every N steps (0: each epoch only)", "output", resume=True,
                                check=Check(lambda v: v >= 0, "must not be negative (0 turns it off)"))
    checkpoint_every: int = setting(0, "also save checkpoint.pt every N steps (0: at each epoch end only)", "output",
                                    resume=True,
                                    check=Check(lambda v: v >= 0, "must not be negative (0: epoch ends only)"))
    overwrite: bool = setting(False, "reuse an --out folder that already holds a run", "output", resume=True)
    eval_every: int = setting(0, "also measure sample quality every N steps: FID, KID and the confident share of "
                              "2,000 prior samples by the domain classifier (mnist, fashion-mnist), into metrics.csv and "
                              "plots/sample_quality.png (0: never)", "output", resume=True, check=NOT_NEGATIVE)
    tensorboard: bool = setting(False, "also write TensorBoard events in <run>/tb: every metrics.csv column and the "
                                "grids (needs the tensorboard package)", "output", resume=True)

    def network_config(self, label_dim: int = 0) -> NetworkConfig:
        """The networks' sizes; `label_dim`: the size of the label y of a conditional run."""
        return NetworkConfig(self.image_size, self.channels, self.latent_dim, self.width, self.recon_layer, label_dim,
                             self.label_layers)

    def loss_config(self) -> LossConfig:
        return LossConfig(**{f.name: getattr(self, f.name) for f in fields(LossConfig)})

    @classmethod
    def from_saved(cls, values: dict) -> TrainConfig:
        """The config a checkpoint or config.json holds; settings added since it was written take their
        defaults, except that the label entered the first layers only before --label-layers existed."""
        values = {"label_layers": "first", **values}
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


# Values a preset fills in when the command line leaves them out: `paper` is the paper's 64x64
# network; `cpu` a reduced one that shows digits within minutes on a CPU, its values chosen from
# real MNIST runs (docs/reproduction.md).
PRESETS = {
    "paper": dict(image_size=64, width=1.0, epochs=25, margin=0.35, dis_gate="either", ema_decay=0.0),
    "cpu": dict(image_size=32, width=0.25, epochs=5, margin=0.0, dis_gate="both", ema_decay=0.999),
}


def flag(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def with_default(help: str, default: Any) -> str:
    """Help text ending in the default as --help and the README's option tables show it."""
    return f"{help} (default: {default})"


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The training command line: one option per setting, in groups, plus --resume."""
    for group_name in GROUPS:
        group = parser.add_argument_group(group_name)
        for f in (f for f in fields(TrainConfig) if f.metadata["group"] == group_name):
            add_setting(group, f)
        if group_name == "output":
            group.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT", help=with_default(
                "continue a run exactly where its checkpoint left it, in the same folder", "none"))


def add_setting(group: argparse._ArgumentGroup, f: Field) -> None:
    """The option (or, for a boolean, the switch) of one setting."""
    meta = f.metadata
    kind = meta["type"] or type(f.default)
    shown = meta["shown"] or ("from --preset" if meta["preset"] else "off" if f.default is False else f.default)
    options: dict[str, Any] = dict(dest=f.name, help=with_default(meta["help"], shown),
                                   default=None if meta["preset"] or meta["shown"] else f.default)
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction if f.default is None else "store_true"
    else:
        options.update(type=kind, choices=meta["choices"])
    group.add_argument(flag(f), **options)
    if meta["none_flag"]:
        name, help = meta["none_flag"]
        group.add_argument(name, dest=f.name, action="store_const", const=None, default=argparse.SUPPRESS,
                           help=with_default(help, "off"))


def validate(cfg: TrainConfig) -> None:
    """UsageError (or the networks' ConfigError) for a value the networks or losses cannot use."""
    cfg.network_config()  # raises ConfigError for sizes, widths and layers
    for f in fields(TrainConfig):
        value, check = getattr(cfg, f.name), f.metadata["check"]
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag(f)} {value} must be a finite number.")
        if value is not None and check is not None and not check.ok(value):
            raise UsageError(f"{flag(f)} {value} {check.rule}.")
    if cfg.eval_every and not data.DATASETS[cfg.dataset].domain_classifier:
        scored = ", ".join(name for name, spec in data.DATASETS.items() if spec.domain_classifier)
        raise UsageError(f"--eval-every measures samples with a domain classifier, which {cfg.dataset} does not "
                         f"have (only {scored}); leave it out and score a checkpoint with `main.py evaluate`.")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard writes its events with the tensorboard package, which is not installed "
                         "here: pip install tensorboard, or leave --tensorboard out.")


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
            raise UsageError(f"--device {name} asks for a GPU, but PyTorch finds no CUDA GPU here; use --device cpu "
                             "or auto.")
        if (device.index or 0) >= count:
            raise UsageError(f"--device {name} does not exist: this machine has {count} CUDA GPU(s), cuda:0 to "
                             f"cuda:{count - 1}.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps asks for Apple's GPU, which PyTorch cannot use here; use --device cpu or auto.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps.")
    return device


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def resolve_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """--amp auto: bf16 where `device` has bfloat16 matrix units, else off; returns (amp, why)."""
    if amp != "auto":
        return amp, f"--amp {amp}"
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16", f"auto: CUDA compute capability {major}.{minor}; --amp off for float32"
        return "off", f"auto: CUDA compute capability {major}.{minor} has no bfloat16 matrix units"
    if device.type == "cpu":
        flags = cpu_flags()
        for name, units in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")):
            if name in flags:
                return "bf16", f"auto: this CPU has {units}; --amp off for float32"
    return "off", f"auto: this {device.type} has no bfloat16 matrix units"


def resolve_config(args: argparse.Namespace, device: torch.device) -> tuple[TrainConfig, str]:
    """Fill in what the command line left out (preset, channels, memory format, --out); returns the
    validated config and a line saying which preset was chosen."""
    preset = args.preset if args.preset != "auto" else ("cpu" if device.type == "cpu" else "paper")
    chosen = {key: getattr(args, key) if getattr(args, key) is not None else value
              for key, value in PRESETS[preset].items()}
    spec = data.DATASETS[args.dataset]
    if args.channels is not None and spec.channels is not None and args.channels != spec.channels:
        raise UsageError(f"--channels {args.channels} does not fit {args.dataset}, whose images have "
                         f"{spec.channels} channel(s); leave --channels out (it is for --dataset folder).")
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    cfg = TrainConfig(**{**given, **chosen, "preset": preset, "device": str(device),
                         "channels": spec.channels or args.channels or 3,
                         "channels_last": kernels.default_channels_last(device) if args.channels_last is None
                         else args.channels_last,
                         "out": args.out or f"runs/{args.dataset}-{datetime.now():%Y%m%d-%H%M%S}"})
    validate(cfg)
    why = f"auto on {device.type}" if args.preset == "auto" else "asked for"
    values = ", ".join(f"{key.replace('_', ' ')} {getattr(cfg, key)}" for key in PRESETS[preset])
    other = {"paper": "--preset cpu gives the reduced CPU configuration",
             "cpu": "--preset paper gives the paper's 64x64 network"}[preset]
    amp, amp_why = resolve_amp(cfg.amp, device)
    cfg = replace(cfg, amp=amp)
    return cfg, (f"preset {preset} ({why}): {values}; {other}; explicit flags win.\n"
                 f"precision: {PRECISIONS[amp]} ({amp_why})")


def resume_config(saved: TrainConfig, args: argparse.Namespace, explicit: set[str], device: torch.device,
                  run_dir: Path, say: Callable[[str], None] = print) -> TrainConfig:
    """The checkpoint's config with the flags that --resume may change applied; UsageError for a contradiction."""
    declared = {f.name: f for f in fields(TrainConfig)}
    changes, conflicts = {"device": str(device), "out": str(run_dir)}, []
    for name in sorted(explicit & declared.keys()):
        old, new = getattr(saved, name), getattr(args, name)
        if name == "out":
            old, new = str(run_dir), str(Path(new).expanduser())
        if new == old or name in ("device", "overwrite"):
            continue
        if declared[name].metadata["resume"]:
            changes[name] = new
            say(f"note: {flag(declared[name])} {new} replaces the checkpoint's {old}")
        else:
            conflicts.append(f"{flag(declared[name])} {new} (the checkpoint has {old})")
    if conflicts:
        raise UsageError(f"--resume {run_dir}: {', '.join(conflicts)} contradict(s) the checkpoint, whose values "
                         "are fixed for the run it continues and win. Leave these flags out to resume, or start a "
                         "new run with another --out.")
    cfg = TrainConfig(**{**asdict(saved), **changes})
    if cfg.amp == "auto":
        amp, why = resolve_amp("auto", device)
        say(f"precision: {PRECISIONS[amp]} ({why})")
        cfg = replace(cfg, amp=amp)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------
# The checkpoint commands (sample, reconstruct, interpolate, attributes, evaluate)
# ---------------------------------------------------------------------------

def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every command on a trained checkpoint shares."""
    parser.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_FILE",
                        help=with_default("a run folder or its checkpoint.pt", "required"))
    parser.add_argument("--out", help=with_default("the folder to write into", "<run folder>/<command>"))
    parser.add_argument("--device", default="auto", help=with_default("auto, cpu, cuda, cuda:N or mps", "auto"))
    parser.add_argument("--data-root", help=with_default("where the run's dataset is", "the run's own --data-root"))
    parser.add_argument("--seed", type=int, default=0,
                        help=with_default("for prior samples and the choice of images", 0))
    parser.add_argument("--decoder", choices=DECODER_WEIGHTS, default="average", help=with_default(
        "the decoder's weights: the moving average of a run trained with --ema-decay, or the last step's "
        "(a run without an average has only those)", "average"))


def count(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low` (argparse reports anything else, exit 2)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value
    parse.__name__ = "count"  # what argparse names in "invalid count value"
    return parse


def check_data_root(path: str | None) -> None:
    """UsageError for a --data-root that names a file (a missing one is the dataset's to report)."""
    if path is not None and Path(path).expanduser().is_file():
        raise UsageError(f"--data-root {path} is a file; give the folder that holds the dataset.")


def output_folder(out: str | None, checkpoint: Path, command: str, writes: tuple[str, ...]) -> Path:
    """Where a checkpoint command writes: --out, else <run folder>/<command>. UsageError for a path that
    is a file, or a folder holding anything but this command's own earlier output (`writes`: name
    patterns). Nothing is created here: the command makes the folder when it writes."""
    folder = Path(out).expanduser() if out else checkpoint.parent / command
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file; give a folder for the output of `{command}` (it is created "
                         "if missing).")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir()
                         if not p.name.startswith(".") and not any(fnmatch.fnmatch(p.name, w) for w in writes))
        if foreign:
            raise UsageError(f"--out {folder} holds files that `{command}` did not write ({', '.join(foreign[:5])}"
                             f"{', ...' if len(foreign) > 5 else ''}); give a new or empty folder, or leave --out out "
                             "to write into the run folder's own.")
    parent = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write into --out {folder}: {parent} is not writable; choose a writable folder.")
    return folder


def check_labels(cfg: TrainConfig, splits: data.Splits) -> None:
    """UsageError, before any work, for a --conditional run whose data has no labels to condition on
    (a folder dataset needs class sub-folders, at least two, with every image in one)."""
    if not cfg.conditional:
        return
    unlabelled = sum(int((split.labels < 0).sum()) for split in (splits.train, splits.heldout)
                     if isinstance(split, data.ImageFiles) and split.labels.dim() == 1)
    if splits.labels.dim < 2 or unlabelled:
        found = (f"{splits.labels.dim} class sub-folder(s) ({', '.join(splits.labels.names[:5]) or 'none'})"
                 + (f" and {unlabelled} image(s) outside them" if unlabelled else ""))
        raise UsageError(f"--conditional needs labels, and {cfg.data_root} has {found}: a folder dataset's classes "
                         "are the sub-folders of --data-root, each holding the images of one class, at least two. "
                         "Sort the images into class folders, or leave --conditional out.")


RUN_ENTRIES = ("config.json", "metrics.csv", "checkpoint.pt", "samples", "reconstructions", "plots")


def check_run_folder(cfg: TrainConfig, resuming: bool) -> None:
    """UsageError, before any work, for an --out that a new run cannot use: a file, another run's
    folder (unless --overwrite) or a folder of other files (unless --overwrite)."""
    out = Path(cfg.out).expanduser()
    if resuming or not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the run (it is created if missing).")
    if cfg.overwrite:
        return
    if (out / "config.json").exists():
        raise UsageError(f"{out} already holds a run (its config.json is there); continue it with "
                         f"--resume {out}, choose another --out, or add --overwrite to replace it.")
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in RUN_ENTRIES)
    if foreign:
        raise UsageError(f"--out {out} holds other files ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                         "a run writes into a folder of its own: give a new or empty folder, or add --overwrite to "
                         "write beside them.")


# What a training process holds, in float32 numbers: each parameter 4 times (weights, gradients,
# RMSprop's average, and room for the optimizer's temporaries); the layers' outputs of a step
# about 1.3 times (those kept for the backward passes and their gradients: bench.py measured the
# allocator's peak at 1.22-1.27 times the outputs in six configurations); and the runtime itself.
PARAMETER_COPIES, ACTIVATION_FACTOR, RUNTIME_BYTES = 4, 1.3, 512 * 2**20


def memory_needed(cfg: TrainConfig) -> tuple[int, int, int]:
    """Estimated bytes of one training process: (total, networks and optimizer state, a step's activations)."""
    network_cfg = cfg.network_config()
    nets = models.shapes_only(network_cfg, cfg.model)
    parameters = sum(p.numel() for m in nets.modules().values() for p in m.parameters()) * 4 * PARAMETER_COPIES
    activations = int(models.activation_elements(network_cfg, cfg.model) * cfg.batch_size * 4 * ACTIVATION_FACTOR)
    return parameters + activations + RUNTIME_BYTES, parameters, activations


def memory_available(device: torch.device) -> int | None:
    """Bytes free for a new process on `device` (CUDA: free GPU memory; CPU: Linux's MemAvailable), or None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(cfg: TrainConfig, device: torch.device, processes: int = 1) -> None:
    """UsageError, before any work, for a configuration that cannot fit in the device's memory
    (`processes`: how many training processes share it)."""
    available = memory_available(device)
    if available is None:
        return
    total, parameters, activations = (processes * part for part in memory_needed(cfg))
    if total <= available:
        return
    gib = 2**30
    shared = f" for {processes} processes" if processes > 1 else ""
    raise UsageError(
        f"this configuration needs about {total / gib:.1f} GiB{shared} ({parameters / gib:.1f} GiB for the networks and "
        f"their optimizer state, {activations / gib:.1f} GiB for the activations of a batch of {cfg.batch_size} "
        f"images at {cfg.image_size}x{cfg.image_size}, width {cfg.width:g}), but {device} has {available / gib:.1f} "
        "GiB free. Lower --batch-size (the activations grow with it), --image-size or --width (both grow them "
        "with their square).")
