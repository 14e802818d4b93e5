"""Run outputs: image grids, loss plots, metrics.csv, config.json and checkpoints (writing and reading).

Every file is written to a temporary name in the same folder and renamed into place,
so a crash never leaves a half-written grid, plot or checkpoint behind.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import config
import data
import models

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

METRIC_FIELDS = [
    "step", "epoch", "loss_prior", "loss_llike", "loss_gan", "loss_dec_gan", "bce_real", "bce_fake",
    "d_real", "d_recon", "d_prior", "recon_mse", "update_dis", "update_dec", "sec_per_step", "data_wait",
]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~current_umask()  # what open() would give a new file (mkstemp gives 0600)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file through `write(temporary_path)`, atomically."""
    with atomic_path(path) as temporary:
        write(temporary)


def model_to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images as the networks see them, in [-1, 1], -> float32 on the CPU in [0, 1]."""
    return images.detach().float().cpu().clamp(-1, 1).add(1).div(2)


def grid_image(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Images in [-1, 1] as one (3, H, W) grid in [0, 1]: rows of `nrow`, white lines between."""
    return make_grid(model_to_unit(images), nrow=nrow, padding=2, pad_value=1.0)


def write_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Write images in [-1, 1] as one PNG grid."""
    grid = grid_image(images, nrow)
    write_atomic(path, lambda tmp: save_image(grid, tmp, format="png"))


def grid_order(path: Path, steps_per_epoch: int) -> tuple[int, str]:
    """Where a grid named epoch_NNN or step_NNNNNNN falls in training: its step, then its name."""
    kind, _, number = path.stem.partition("_")
    step = int(number) * (steps_per_epoch if kind == "epoch" else 1) if number.isdigit() else 0
    return step, path.stem


class EvolutionGif:
    """samples/evolution.gif: every sample grid in `samples_dir`, in training order, one frame each.

    Each grid is read and reduced to a palette once and kept, so rewriting the GIF after every grid
    costs the new frame, not all of them again; a grid rewritten since (an epoch's grid at the end of
    a resumed run) is read again.
    """

    def __init__(self, samples_dir: Path, steps_per_epoch: int):
        self.samples_dir, self.steps_per_epoch = samples_dir, steps_per_epoch
        self.frames: dict[Path, tuple[int, Image.Image]] = {}  # grid -> (its mtime in ns, its frame)

    def frame(self, grid: Path) -> Image.Image:
        written = grid.stat().st_mtime_ns
        if self.frames.get(grid, (None,))[0] != written:
            with Image.open(grid) as png:
                self.frames[grid] = written, png.convert("RGB").quantize(colors=256)
        return self.frames[grid][1]

    def write(self) -> Path:
        grids = sorted(self.samples_dir.glob("*.png"), key=lambda p: grid_order(p, self.steps_per_epoch))
        frames = [self.frame(grid) for grid in grids]
        durations = [400] * (len(frames) - 1) + [2000]  # milliseconds; the latest grid stays longest
        path = self.samples_dir / "evolution.gif"
        write_atomic(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                      duration=durations, loop=0))
        return path


def interleave(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) twice -> (2N, C, H, W) as original, reconstruction, original, ..."""
    return torch.stack([originals.cpu(), reconstructions.cpu()], dim=1).flatten(0, 1)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Compressed .npz of named arrays, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would add .npz to the temporary name
            np.savez_compressed(f, **arrays)

    write_atomic(path, write)


def write_json(data: dict, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


CHECKPOINT_FORMAT = "vaegan-checkpoint/1"
CHECKPOINT_KEYS = {"format", "config", "step", "epoch", "epoch_batches", "decoder", "optimizers", "rng", "history"}


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or not one of ours; the message says what to do."""


def write_checkpoint(state: dict, path: Path) -> None:
    """torch.save, atomically: the previous checkpoint stays until the new one is complete."""
    write_atomic(path, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp))


def checkpoint_path(run_dir_or_file: str | Path) -> Path:
    path = Path(run_dir_or_file).expanduser()
    return path / "checkpoint.pt" if path.is_dir() else path


def load_checkpoint(run_dir_or_file: str | Path) -> dict:
    """Read a checkpoint (a run folder or its checkpoint.pt) on the CPU, safely (weights only)."""
    path = checkpoint_path(run_dir_or_file)
    if not path.is_file():
        raise CheckpointError(f"there is no checkpoint at {path}; give a run folder that holds checkpoint.pt "
                              "(runs write one at every epoch end) or the path of such a file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, not a zip, pickle of another kind: all unreadable to us
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'}); it is truncated or "
                              "not a checkpoint. Use an intact checkpoint.pt of a run of this tool.") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not CHECKPOINT_KEYS <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this tool (it lacks the {CHECKPOINT_FORMAT} "
                              "fields); use the checkpoint.pt that a run of main.py wrote.")
    return state


def checkpoint_state(nets: models.Networks, optimizers: dict[str, torch.optim.Optimizer], cfg: config.TrainConfig,
                     position: dict[str, int], history: dict[str, list], labels: data.Labels | None = None) -> dict:
    """Everything a run needs to continue exactly: weights, optimizers, position, RNG, history, and
    what a conditional run's labels name (read back by `checkpoint_labels`).

    `position`: step, epoch and epoch_batches (batches of the epoch done).
    """
    state = {"config": dataclasses.asdict(cfg), **position, **{name: m.state_dict() for name, m in nets.modules().items()},
             "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
             "rng": rng_state(), "history": history}
    if labels is not None:
        state["labels"] = {"names": list(labels.names), "attributes": labels.attributes}
    return state


def load_networks(state: dict, nets: models.Networks) -> None:
    """Load a checkpoint's weights; CheckpointError if they were made for another model."""
    for name, module in nets.modules().items():
        load_weights(module, state, name)


def load_weights(module: torch.nn.Module, state: dict, name: str, prefix: str = "") -> None:
    """module.load_state_dict(state[name]) (only its keys that start with `prefix`, which is dropped);
    CheckpointError if they are missing or do not fit."""
    if name not in state:
        raise CheckpointError(f"the checkpoint holds no {name}, which its model needs; it is damaged or "
                              "edited. Use a checkpoint written by this tool.")
    try:
        module.load_state_dict({key.removeprefix(prefix): value for key, value in state[name].items()
                                if key.startswith(prefix)})
    except (RuntimeError, AttributeError) as error:
        raise CheckpointError(
            f"the checkpoint's {name} does not fit the model its config describes ({str(error).splitlines()[0]}); "
            "it was made for another model or edited. Use a checkpoint written by this tool.") from None


def decoder_weights(cfg: config.TrainConfig, choice: str) -> str:
    """Which of a run's decoder weights --decoder `choice` (average or last) gives, in words."""
    if cfg.ema_decay and choice == "average":
        return f"the moving average of its weights (decay {cfg.ema_decay})"
    return "the last step's weights" + ("" if cfg.ema_decay else " (the run kept no average)")


def checkpoint_labels(state: dict) -> data.Labels | None:
    """What a conditional run's checkpoint conditions on; None for an unconditional one (and for
    checkpoints written before runs could be conditional)."""
    saved = state.get("labels")
    return data.Labels(tuple(saved["names"]), saved["attributes"]) if saved else None


def load_run(checkpoint: str | Path, device: torch.device,
             decoder: str = "average") -> tuple[config.TrainConfig, models.Networks, int, data.Labels | None]:
    """The config, the networks (in evaluation mode, on `device`; the decoder's weight average where the
    run kept one and `decoder` is "average"), the step and the labels (None: unconditional) of a checkpoint."""
    state = load_checkpoint(checkpoint)
    cfg = config.TrainConfig.from_saved(state["config"])
    labels = checkpoint_labels(state)
    if cfg.conditional != (labels is not None):
        holds = "no labels" if labels is None else "labels"
        raise CheckpointError(f"{checkpoint_path(checkpoint)} says --conditional {cfg.conditional} but holds {holds}; "
                              "it is damaged or edited. Use a checkpoint written by this tool.")
    nets = models.build_networks(cfg.network_config(labels.dim if labels else 0), "cpu", cfg.model)
    load_networks(state, nets)
    if cfg.ema_decay and decoder == "average":  # the average's state: "module."-prefixed weights and a count
        load_weights(nets.decoder, state, "decoder_average", prefix="module.")
    for module in nets.modules().values():
        module.to(device).eval()
    return cfg, nets, state["step"], labels


def rng_state() -> dict:
    """Every random-number state a run uses: torch (CPU and CUDA), numpy and python."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class MetricsLog:
    """metrics.csv, one row per step, kept in memory too for the plots and checkpoints.

    Given the `history` of a checkpoint, the file is rewritten to exactly those rows first,
    so a resumed run continues it without a gap or a repeated step. A column that the history
    lacks (a checkpoint written before the column existed) is NaN in its rows.
    """

    def __init__(self, path: Path, history: dict[str, list] | None = None, extra: list[str] = ()):
        """`extra`: columns measured at some steps only (--eval-every's); NaN in the other rows."""
        self.path = Path(path)
        columns = history or {}
        self.fields = METRIC_FIELDS + sorted(set(extra) | (columns.keys() - set(METRIC_FIELDS)))
        steps = len(columns.get("step", []))
        self.rows: list[dict[str, float]] = [
            {name: columns[name][i] if name in columns else math.nan for name in self.fields} for i in range(steps)]

        write_atomic(self.path, lambda tmp: tmp.write_text(self.csv_text(self.rows, header=True)))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.complete = os.fstat(self.fd).st_size  # bytes of whole rows on disk

    def csv_text(self, rows: list[dict[str, float]], header: bool = False) -> str:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.fields, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(format_row(row) for row in rows)
        return text.getvalue()

    def history(self) -> dict[str, list]:
        return {name: [row.get(name, math.nan) for row in self.rows] for name in self.fields}

    def append(self, row: dict[str, float]) -> None:
        """Add a row and write it at once. If the disk refuses part of it (full), the file is cut back
        to its whole rows before the error goes on: it never ends in half a row."""
        row = {**dict.fromkeys(self.fields, math.nan), **row}
        self.rows.append(row)
        data = self.csv_text([row]).encode()
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as error:
            os.ftruncate(self.fd, self.complete)
            error.filename = error.filename or str(self.path)
            raise
        self.complete = os.fstat(self.fd).st_size

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def column(self, name: str) -> np.ndarray:
        return np.array([row.get(name, math.nan) for row in self.rows], dtype=float)


class TensorBoardLog:
    """<run>/tb for `tensorboard --logdir`: metrics.csv's columns as scalars, the grids as images.

    A run resumed from step N starts its writer with purge_step N + 1, so TensorBoard drops what the
    interrupted run logged after its checkpoint and the steps done again appear once.
    """

    def __init__(self, folder: Path, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter  # optional: only --tensorboard needs the package
        self.writer = SummaryWriter(str(folder), purge_step=None if resumed_at is None else resumed_at + 1)
        self.last_grid_step: dict[str, int] = {}

    def add_row(self, row: dict[str, float]) -> None:
        for name, value in row.items():
            if name != "step" and math.isfinite(value):
                self.writer.add_scalar(name, value, int(row["step"]))

    def add_grid(self, name: str, images: torch.Tensor, step: int) -> None:
        """One image per step: an epoch's grid written at the step of a --sample-every grid is not added again."""
        if self.last_grid_step.get(name) != step:
            self.writer.add_image(name, grid_image(images), step)
            self.last_grid_step[name] = step

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def format_row(row: dict[str, float]) -> dict[str, str]:
    return {k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in row.items()}


def smooth(values: np.ndarray) -> np.ndarray:
    """Trailing moving average over about 2% of the curve (at least 1 point)."""
    window = max(1, len(values) // 50)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(0, np.arange(1, len(values) + 1) - window)]) / counts


def draw_curves(axis: plt.Axes, steps: np.ndarray, curves: dict[str, np.ndarray], ylabel: str,
                raw: bool = True) -> None:
    """Each curve smoothed (solid) and, if `raw`, as measured (faint), in the same colour."""
    for index, (label, values) in enumerate(curves.items()):
        colour = f"C{index}"
        if raw:
            axis.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        axis.plot(steps, smooth(values), color=colour, linewidth=1.6, label=label)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)


def write_figure(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)


def write_plots(log: MetricsLog, plots_dir: Path) -> None:
    """Redraw kl_divergence.png and recon_loss.png (models with an encoder) and gan_loss.png
    (models with a discriminator) from the whole history."""
    if not log.rows:
        return
    steps = log.column("step")
    has = {name: bool(np.isfinite(log.column(name)).any()) for name in ("loss_prior", "loss_gan")}
    if has["loss_prior"]:
        write_vae_plots(log, steps, plots_dir)
    if has["loss_gan"]:
        write_gan_plots(log, steps, plots_dir)
    quality = [name for name in log.fields if name.startswith("fid[") and np.isfinite(log.column(name)).any()]
    if quality:
        write_sample_quality_plot(log, quality[0], plots_dir / "sample_quality.png")


def write_sample_quality_plot(log: MetricsLog, column: str, path: Path) -> None:
    """`column` (a sample FID) against the step and against the seconds spent training."""
    seconds = np.cumsum(np.nan_to_num(log.column("sec_per_step")) + np.nan_to_num(log.column("data_wait")))
    values = log.column(column)
    measured = np.isfinite(values)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for axis, x, label in ((axes[0], log.column("step"), "step"), (axes[1], seconds, "seconds of training steps")):
        axis.plot(x[measured], values[measured], marker="o", markersize=3)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"{column} of prior samples (lower is better)")
    write_figure(figure, path)


def write_vae_plots(log: MetricsLog, steps: np.ndarray, plots_dir: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 3.5))
    draw_curves(axis, steps, {"L_prior = KL(q(z|x) || p(z))": log.column("loss_prior")}, "nats per image")
    axis.set_xlabel("step")
    write_figure(figure, plots_dir / "kl_divergence.png")

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    draw_curves(top, steps, {"L_llike (the model's reconstruction error)": log.column("loss_llike")}, "per image")
    draw_curves(bottom, steps, {"pixel MSE of reconstructions": log.column("recon_mse")}, "per pixel, [-1, 1] scale")
    bottom.set_xlabel("step")
    write_figure(figure, plots_dir / "recon_loss.png")


def write_gan_plots(log: MetricsLog, steps: np.ndarray, plots_dir: Path) -> None:
    figure, (losses, outputs, updates) = plt.subplots(3, 1, figsize=(7, 8.5), sharex=True)
    draw_curves(losses, steps, {"discriminator: L_GAN": log.column("loss_gan"),
                                "decoder: GAN term": log.column("loss_dec_gan")}, "loss")
    draw_curves(outputs, steps, {"D(x) real": log.column("d_real"), "D(x~) reconstructions": log.column("d_recon"),
                                 "D(x_p) prior samples": log.column("d_prior")}, "mean D output")
    outputs.set_ylim(-0.02, 1.02)
    draw_curves(updates, steps, {"discriminator updated": log.column("update_dis"),
                                 "decoder updated": log.column("update_dec")}, "fraction of steps", raw=False)
    updates.set_ylim(-0.02, 1.02)
    updates.set_xlabel("step")
    write_figure(figure, plots_dir / "gan_loss.png")
