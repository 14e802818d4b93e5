"""Settings: presets, validation, the resume rules, device resolution, and the README's option tables."""
import argparse

import torch

import config


def training_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    config.add_training_arguments(parser)
    return parser


def parse(*args, device="cpu"):
    return config.resolve_config(training_parser().parse_args(list(args)), torch.device(device))


def test_auto_preset_on_cpu_is_the_cpu_preset_and_explicit_flags_win():
    cfg, line = parse("--dataset", "mnist")
    assert cfg.preset == "cpu" and "preset cpu (auto on cpu)" in line and "--preset paper" in line
    assert (cfg.image_size, cfg.width, cfg.epochs) == tuple(config.PRESETS["cpu"].values()) == (32, 0.25, 5)
    assert (cfg.gamma, cfg.llike_weight) == (1e-5, 1.0)
    cfg, _ = parse("--preset", "paper", "--epochs", "3", "--width", "0.5")
    assert (cfg.image_size, cfg.width, cfg.epochs) == (64, 0.5, 3)
    on_gpu, _ = parse(device="cuda")
    assert on_gpu.preset == "paper" and on_gpu.image_size == 64


