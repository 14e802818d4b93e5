import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

import utils


def test_save_grid_writes_a_readable_png(tmp_path):
    images = torch.linspace(-1, 1, 64 * 16 * 16).view(64, 1, 16, 16)
    utils.write_grid(images, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as png:
        assert png.size == (8 * 18 + 2, 8 * 18 + 2)  # 8x8 tiles of 16 px with 2 px padding
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left
    assert (tmp_path / "grid.png").stat().st_mode & 0o777 == utils.FILE_MODE  # readable like any new file


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "checkpoint.pt"
    utils.write_checkpoint({"step": 1}, target)

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        utils.write_atomic(target, broken)
    assert torch.load(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_interleave_pairs_originals_with_reconstructions():
    a, b = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    pairs = utils.interleave(a, b)
    assert pairs[:, 0, 0, 0].tolist() == [0, 1, 0, 1, 0, 1]


def test_metrics_log_and_plots(tmp_path):
    log = utils.MetricsLog(tmp_path / "metrics.csv")
    for step in range(1, 101):
        log.append({name: float(step) for name in utils.METRIC_FIELDS} | {"step": step, "epoch": 1})
    log.flush()
    log.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 and list(rows[0]) == utils.METRIC_FIELDS and rows[-1]["loss_prior"] == "100"
    utils.write_plots(log, tmp_path / "plots")
    for name in ("kl_divergence.png", "recon_loss.png", "gan_loss.png"):
        with Image.open(tmp_path / "plots" / name) as png:
            assert png.size[0] > 300


def test_smooth_is_a_trailing_mean():
    values = np.arange(100, dtype=float)
    smoothed = utils.smooth(values)  # window 2
    assert smoothed[0] == 0 and smoothed[1] == 0.5 and smoothed[99] == 98.5


def test_a_history_without_a_later_column_continues(tmp_path):
    old = {name: [1.5, 2.5] for name in utils.METRIC_FIELDS if name != "data_wait"}  # a column added later is missing
    old["step"] = [1, 2]
    log = utils.MetricsLog(tmp_path / "metrics.csv", old)
    log.append({**{name: 3.5 for name in utils.METRIC_FIELDS}, "step": 3})
    log.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and [r["loss_prior"] for r in rows] == ["1.5", "2.5", "3.5"]
    assert [r["data_wait"] for r in rows] == ["nan", "nan", "3.5"]
    assert np.isnan(log.column("data_wait")[:2]).all() and log.history()["data_wait"][2] == 3.5


def test_evolution_gif_shows_every_grid_in_training_order(tmp_path):
    """Named epoch_NNN and step_NNNNNNN, the grids sort by step, not by name: epoch 1 of 10 steps is step 10."""
    colours = {"step_0000002": (255, 0, 0), "epoch_001": (0, 255, 0), "step_0000012": (0, 0, 255)}
    for name, colour in colours.items():
        Image.new("RGB", (20, 20), colour).save(tmp_path / f"{name}.png")
    evolution = utils.EvolutionGif(tmp_path, steps_per_epoch=10)
    assert gif_colours(evolution.write()) == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    Image.new("RGB", (20, 20), (255, 255, 0)).save(tmp_path / "epoch_001.png")  # rewritten, as a resumed run's end
    os.utime(tmp_path / "epoch_001.png", ns=(1, 1))  # a time of its own, however fast the file system's clock ticks
    assert gif_colours(evolution.write()) == [(255, 0, 0), (255, 255, 0), (0, 0, 255)]


def gif_colours(path):
    with Image.open(path) as gif:
        seen = []
        for frame in range(gif.n_frames):
            gif.seek(frame)
            seen.append(gif.convert("RGB").getpixel((10, 10)))
    return seen


def test_tensorboard_log_keeps_one_event_per_step_across_a_resume(tmp_path):
    """A run resumed from step 2 logs steps 3-4 again: TensorBoard shows each step once, with the new values."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    first = utils.TensorBoardLog(tmp_path, resumed_at=None)
    for step in range(1, 5):
        first.add_row({"step": step, "loss": 1.0, "missing": float("nan")})
    first.add_grid("samples", torch.zeros(4, 1, 8, 8), 2)
    first.add_grid("samples", torch.zeros(4, 1, 8, 8), 2)  # an epoch's grid at the same step: not added twice
    first.close()
    again = utils.TensorBoardLog(tmp_path, resumed_at=2)
    for step in range(3, 5):
        again.add_row({"step": step, "loss": 2.0})
    again.close()
    events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]
    assert "missing" not in events.Tags()["scalars"] and [e.step for e in events.Images("samples")] == [2]
