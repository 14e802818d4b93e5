"""Run outputs: image grids, loss plots, metrics.csv, config.json and checkpoints.

Every file is written to a temporary name in the same folder and renamed into place,
so a crash never leaves a half-written grid, plot or checkpoint behind.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

METRIC_FIELDS = [
    "step", "epoch", "loss_prior", "loss_llike", "loss_gan", "loss_dec_gan", "bce_real", "bce_fake",
    "d_real", "d_recon", "d_prior", "recon_mse", "update_dis", "update_dec", "sec_per_step", "data_wait",
]


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
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file through `write(temporary_path)`, atomically."""
    with atomic_path(path) as temporary:
        write(temporary)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Save images in [-1, 1] as one PNG grid."""
    grid = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    write_atomic(path, lambda tmp: save_image(grid, tmp, nrow=nrow, padding=2, pad_value=1.0, format="png"))


def interleave(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) twice -> (2N, C, H, W) as original, reconstruction, original, ..."""
    return torch.stack([originals.cpu(), reconstructions.cpu()], dim=1).flatten(0, 1)


def write_json(data: dict, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save, atomically: the previous checkpoint stays until the new one is complete."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


class MetricsLog:
    """metrics.csv, one row per step, kept in memory too for the plots."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, float]] = []
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_FIELDS)
        if new:
            self.writer.writeheader()

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def flush(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def column(self, name: str) -> np.ndarray:
        return np.array([row[name] for row in self.rows], dtype=float)


def smooth(values: np.ndarray) -> np.ndarray:
    """Trailing moving average over about 2% of the curve (at least 1 point)."""
    window = max(1, len(values) // 50)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(0, np.arange(1, len(values) + 1) - window)]) / counts


def draw_curves(axis: plt.Axes, steps: np.ndarray, curves: dict[str, np.ndarray], ylabel: str) -> None:
    """Each curve raw (faint) and smoothed (solid), same colour."""
    for index, (label, values) in enumerate(curves.items()):
        colour = f"C{index}"
        axis.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        axis.plot(steps, smooth(values), color=colour, linewidth=1.6, label=label)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)


def save_figure(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)


def plot_metrics(log: MetricsLog, plots_dir: Path) -> None:
    """Redraw kl_divergence.png, recon_loss.png and gan_loss.png from the whole history."""
    if not log.rows:
        return
    steps = log.column("step")

    figure, axis = plt.subplots(figsize=(7, 3.5))
    draw_curves(axis, steps, {"L_prior = KL(q(z|x) || p(z))": log.column("loss_prior")}, "nats per image")
    axis.set_xlabel("step")
    save_figure(figure, plots_dir / "kl_divergence.png")

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    draw_curves(top, steps, {"L_llike (Dis_l feature error)": log.column("loss_llike")}, "per image")
    draw_curves(bottom, steps, {"pixel MSE of reconstructions": log.column("recon_mse")}, "per pixel, [-1, 1] scale")
    bottom.set_xlabel("step")
    save_figure(figure, plots_dir / "recon_loss.png")

    figure, (losses, outputs, updates) = plt.subplots(3, 1, figsize=(7, 8.5), sharex=True)
    draw_curves(losses, steps, {"discriminator: L_GAN": log.column("loss_gan"),
                                "decoder: GAN term": log.column("loss_dec_gan")}, "loss")
    draw_curves(outputs, steps, {"D(x) real": log.column("d_real"), "D(x~) reconstructions": log.column("d_recon"),
                                 "D(x_p) prior samples": log.column("d_prior")}, "mean D output")
    outputs.set_ylim(-0.02, 1.02)
    draw_curves(updates, steps, {"discriminator updated": log.column("update_dis"),
                                 "decoder updated": log.column("update_dec")}, "fraction of steps")
    updates.set_ylim(-0.02, 1.02)
    updates.set_xlabel("step")
    save_figure(figure, plots_dir / "gan_loss.png")
