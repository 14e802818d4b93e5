"""What runs only on a CUDA GPU (pytest -m cuda; tools/gpu_check.sh runs these). Skipped without one."""
import json

import pytest
import torch

import config
from conftest import TINY, run_cli

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]


def test_auto_precision_on_this_gpu_follows_its_compute_capability():
    major, _ = torch.cuda.get_device_capability()
    assert config.resolve_amp("auto", torch.device("cuda"))[0] == ("bf16" if major >= 8 else "off")


@pytest.mark.parametrize("amp", ["auto", "off", "fp16"])
def test_a_short_run_on_the_gpu_in_each_precision(tmp_path, amp):
    out = tmp_path / "run"
    result = run_cli("--device", "cuda", "--amp", amp, "--out", str(out), "--max-steps", "5", *TINY)
    assert result.returncode == 0, result.stderr
    assert "device: cuda" in result.stdout and "precision:" in result.stdout
    assert json.loads((out / "config.json").read_text())["amp"] in ("bf16", "off", "fp16")


def test_the_memory_estimate_covers_what_the_gpu_step_allocates():
    import models
    import step
    cfg = config.TrainConfig(image_size=64, width=0.5, batch_size=64)
    nets = models.build_networks(cfg.network_config(), "cuda")
    optimizers = step.build_optimizers(nets, 3e-4, 0.9)
    x = torch.rand(64, 1, 64, 64, device="cuda") * 2 - 1
    torch.cuda.reset_peak_memory_stats()
    step.train_step(nets, optimizers, x, cfg.loss_config())
    step.train_step(nets, optimizers, x, cfg.loss_config())
    total, _, _ = config.memory_needed(cfg)
    assert torch.cuda.max_memory_allocated() < total
