"""Settings: presets, validation, the resume rules, device resolution, and the README's option tables."""
import argparse

import pytest
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
    assert {key: getattr(cfg, key) for key in config.PRESETS["cpu"]} == config.PRESETS["cpu"]
    assert (cfg.image_size, cfg.width, cfg.epochs, cfg.margin, cfg.dis_gate, cfg.ema_decay) == \
        (32, 0.25, 5, 0.0, "both", 0.999)
    assert (cfg.gamma, cfg.llike_weight) == (1e-5, 1.0)
    cfg, _ = parse("--preset", "paper", "--epochs", "3", "--width", "0.5")
    assert (cfg.image_size, cfg.width, cfg.epochs, cfg.margin, cfg.dis_gate, cfg.ema_decay) == \
        (64, 0.5, 3, 0.35, "either", 0.0)
    assert parse("--ema-decay", "0")[0].ema_decay == 0.0
    assert parse("--margin", "0.35")[0].margin == 0.35
    assert parse("--dis-gate", "either")[0].dis_gate == "either"
    on_gpu, _ = parse(device="cuda")
    assert on_gpu.preset == "paper" and on_gpu.image_size == 64




@pytest.mark.parametrize("flags, expected", [({"avx2", "amx_bf16", "avx512_bf16"}, ("bf16", "AMX")),
                                             ({"avx512f", "avx512_bf16"}, ("bf16", "AVX-512 BF16")),
                                             ({"avx2", "fma"}, ("off", "no bfloat16 matrix units"))])
def test_amp_auto_is_bf16_where_the_cpu_has_bfloat16_matrix_units(monkeypatch, flags, expected):
    monkeypatch.setattr(config, "cpu_flags", lambda: flags)
    amp, why = config.resolve_amp("auto", torch.device("cpu"))
    assert amp == expected[0] and expected[1] in why
    cfg, lines = parse("--dataset", "mnist")
    assert cfg.amp == expected[0] and f"precision: {config.PRECISIONS[expected[0]]}" in lines
    assert config.resolve_amp("fp16", torch.device("cpu"))[0] == "fp16"  # an explicit --amp always wins
    forced, lines = parse("--amp", "off")
    assert forced.amp == "off" and "precision: float32 (--amp off)" in lines


def test_tensorboard_without_its_package_is_refused_before_any_work(monkeypatch):
    real_find_spec = config.importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else real_find_spec(name, *args))
    with pytest.raises(config.UsageError, match="pip install tensorboard"):
        parse("--tensorboard")
    assert parse()[0].tensorboard is False


def test_the_label_enters_every_layer_unless_asked_or_saved_otherwise():
    assert parse("--conditional")[0].network_config(10).deep_label_dim == 10
    first, _ = parse("--conditional", "--label-layers", "first")
    assert first.network_config(10).deep_label_dim == 0
    assert parse()[0].network_config().deep_label_dim == 0  # unconditional: no label anywhere
    saved = config.asdict(first)
    assert config.TrainConfig.from_saved({**saved, "label_layers": "every"}).label_layers == "every"
    del saved["label_layers"]  # a checkpoint from before --label-layers
    assert config.TrainConfig.from_saved(saved).label_layers == "first"
