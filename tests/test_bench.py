import copy
import json
import subprocess
import sys

import pytest
import torch

import bench
import config
import kernels
import models
import step
from conftest import ROOT
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
    assert bench.run(["--image-size", "16", "--width", "0.125", "--batch-size", "8", "--steps", "2", "--amp", "off",
                      "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "naive float32 step / project" in table and "matmul_fp32" in table
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["threads"] >= 1 and report["precision"] == "off"
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
    assert "project_fp32" not in results  # the project's step is float32 already


def test_bench_rejects_bad_settings(capsys):
    assert bench.run(["--batch-size", "1"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_bench_times_each_precision_against_its_own_matmul_and_each_speed_trick_off(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.run(["--image-size", "16", "--width", "0.125", "--batch-size", "8", "--steps", "1",
                      "--amp", "bf16", "--channels-last", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert report["config"]["channels_last"] is True and report["precision"] == "bf16"
    assert results["project"]["precision"] == "bf16" and results["project_fp32"]["precision"] == "off"
    assert results["project"]["share_of_matmul"] == pytest.approx(
        results["project"]["flop_per_second"] / results["matmul_bf16"]["flop_per_second"])
    assert results["project_fp32"]["share_of_matmul"] == pytest.approx(
        results["project_fp32"]["flop_per_second"] / results["matmul_fp32"]["flop_per_second"])
    assert results["project_fp32"]["flops"] == results["project_contiguous"]["flops"] == results["project"]["flops"]
    assert report["fp32_over_project"] == pytest.approx(
        results["project_fp32"]["seconds"] / results["project"]["seconds"])
    assert report["channels_last_speedup"] == pytest.approx(
        results["project_contiguous"]["seconds"] / results["project"]["seconds"])
    if kernels.glibc() is not None:
        assert report["kept_memory_speedup"] == pytest.approx(
            results["project_memory_returned"]["seconds"] / results["project"]["seconds"])
    assert kernels.keep_freed_memory(torch.device("cpu"))  # training's malloc setting is back afterwards


def test_bench_compares_in_the_format_training_uses(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.run(["--image-size", "16", "--width", "0.125", "--batch-size", "8", "--steps", "1",
                      "--no-channels-last", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["channels_last"] is False and "project_contiguous" not in report["results"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: tools/gpu_check.sh would run")
def test_the_gpu_check_says_in_one_line_that_there_is_no_gpu(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path / "gpu.json")],
                            capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.count("\n") == 1 and "no CUDA GPU" in result.stdout
    assert not (tmp_path / "gpu.json").exists()
