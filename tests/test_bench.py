import copy
import json

import pytest
import torch

import bench
import config
import kernels
import models
import step
from models import NetworkConfig


@pytest.mark.parametrize("gan_loss", ["minimax", "nonsaturating"])
def test_project_and_naive_steps_make_the_same_updates(gan_loss):
    torch.manual_seed(0)
    nets = models.build_networks(NetworkConfig(image_size=16, latent_dim=8, width=0.125))
    for module in nets.modules().values():
        module.double()
    twin = copy.deepcopy(nets)
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64) * 2 - 1
    noise = (torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64))
    cfg = config.LossConfig(gamma=0.3, llike_weight=0.5, gan_loss=gan_loss, equilibrium=None)
    step.train_step(nets, step.build_optimizers(nets, 1e-3, 0.9), x, cfg, noise)
    bench.naive_step(twin, step.build_optimizers(twin, 1e-3, 0.9), x, cfg, noise)
    for name, module in nets.modules().items():
        for (key, p), q in zip(module.state_dict().items(), twin.modules()[name].state_dict().values()):
            # atol: biases before a BatchNorm have zero gradient up to rounding, which RMSprop scales to ~1e-12
            assert torch.allclose(p, q, rtol=1e-9, atol=1e-10), f"{name}.{key}"


def test_bench_reports_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.run(["--image-size", "16", "--width", "0.125", "--batch-size", "8", "--steps", "2",
                      "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "naive / project" in table and "matmul_fp32" in table
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["threads"] >= 1
    results = report["results"]
    for name in ("project", "naive", "matmul_fp32"):
        r = results[name]
        assert r["seconds"] > 0 and r["flops"] > 0 and r["flop_per_second"] > 0 and r["peak_memory_bytes"] >= 0
    for name in ("project", "naive"):
        assert results[name]["images_per_second"] > 0 and 0 < results[name]["share_of_matmul"] < 10
        assert results[name]["peak_allocated_bytes"] > 8 * 16 * 16 * 4  # at least one activation of the batch
    # The naive step repeats backward work: more FLOPs than the project's for the same updates.
    assert 1.3 < results["naive"]["flops"] / results["project"]["flops"] < 3
    assert report["naive_over_project"] == pytest.approx(results["naive"]["seconds"] / results["project"]["seconds"])


def test_bench_rejects_bad_settings(capsys):
    assert bench.run(["--batch-size", "1"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_bench_times_the_fast_paths_against_fp32_eager(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.run(["--image-size", "16", "--width", "0.125", "--batch-size", "8", "--steps", "1",
                      "--amp", "bf16", "--channels-last", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert report["config"]["channels_last"] is True
    assert results["project_amp_bf16"]["speedup_over_fp32_eager"] > 0
    assert results["project_amp_bf16"]["flops"] == results["project_contiguous"]["flops"] == results["project"]["flops"]
    assert report["channels_last_speedup"] == pytest.approx(
        results["project_contiguous"]["seconds"] / results["project"]["seconds"])


def test_bench_compares_in_the_format_training_uses(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.run(["--image-size", "16", "--width", "0.125", "--batch-size", "8", "--steps", "1",
                      "--no-channels-last", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["channels_last"] is False and "project_contiguous" not in report["results"]
    assert kernels.default_channels_last(torch.device("cpu")) and not kernels.default_channels_last(torch.device("cuda"))
