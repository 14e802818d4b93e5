"""Training under torchrun: two CPU processes (gloo) on real MNIST, and the helpers they use.

The torchrun tests start tests/ddp_worker.py, which runs main.py's own main() and records
what each process did (gate decisions, sample indices, files written, final parameters).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed
import main
import models
from conftest import ROOT
from models import NetworkConfig

WORKER = ROOT / "tests" / "ddp_worker.py"
TINY = ["--image-size", "16", "--width", "0.125", "--batch-size", "16", "--num-workers", "0"]


def torchrun(cwd: Path, script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 script args...`, recording into cwd/record."""
    (cwd / "record").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAEGAN_RECORD": str(cwd / "record"), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def records(cwd: Path) -> list[dict]:
    return [torch.load(cwd / "record" / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def test_two_processes_train_one_model_and_rank_0_writes(tmp_path, real_data):
    run = torchrun(tmp_path, WORKER, "train", "--data-root", str(real_data), *TINY, "--max-steps", "6",
                   "--sample-every", "3", "--out", "run")
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = records(tmp_path)
    # The replicas never diverge: every parameter of every network is identical afterwards.
    assert rank0["parameters"].keys() == {"encoder", "decoder", "discriminator"}
    for name, params in rank0["parameters"].items():
        for key, value in params.items():
            assert torch.equal(value, rank1["parameters"][name][key]), f"{name}.{key} differs between ranks"
    # Each trained on its own images: 6 steps x 16, none shared.
    assert len(set(rank0["indices"])) == len(set(rank1["indices"])) == 6 * 16
    assert not set(rank0["indices"]) & set(rank1["indices"])
    # The gate decided the same in both, and it did skip some discriminator updates here.
    assert rank0["gate"] == rank1["gate"] and len(rank0["gate"]) == 6
    assert (False, True) in rank0["gate"] or (True, False) in rank0["gate"]
    # Rank 0 alone wrote files.
    assert rank1["writes"] == []
    written = {Path(p).relative_to("run").as_posix() for p in rank0["writes"]}
    assert {"config.json", "metrics.csv", "checkpoint.pt", "samples/step_0000003.png", "samples/epoch_001.png",
            "plots/gan_loss.png"} <= written
    assert sorted(p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*.png")) == sorted(
        p for p in written if p.endswith(".png"))
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 6
    assert "processes: 2 (gloo, gradients averaged by allreduce)" in run.stdout  # auto on the CPU
    assert "32 images per step in all" in run.stdout
    assert run.stdout.count("parameters: encoder") == 1  # printed by rank 0 only

    # The two-process checkpoint continues in a single process.
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["processes"] == 2 and checkpoint["step"] == 6
    resumed = subprocess.run([sys.executable, str(ROOT / "main.py"), "--resume", "run", "--max-steps", "8"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "MPLBACKEND": "Agg"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "written by 2 process(es)" in resumed.stdout
    steps = [line.split(",")[0] for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(s) for s in range(1, 9)]


def test_single_process_checkpoint_continues_under_torchrun_with_ddp(tmp_path, real_data):
    first = subprocess.run([sys.executable, str(ROOT / "main.py"), "--data-root", str(real_data), *TINY,
                            "--max-steps", "3", "--out", "run"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert first.returncode == 0, first.stderr[-3000:]
    run = torchrun(tmp_path, WORKER, "train", "--resume", "run", "--max-steps", "7", "--grad-sync", "ddp")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "written by 1 process(es) and this run has 2" in run.stdout
    assert "gradients averaged by ddp" in run.stdout
    rank0, rank1 = records(tmp_path)
    for name, params in rank0["parameters"].items():
        assert all(torch.equal(v, rank1["parameters"][name][k]) for k, v in params.items())
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 7
    assert rank0["gate"] == rank1["gate"] and (False, True) in rank0["gate"]  # DDP copes with skipped updates


def test_averaged_gradient_is_the_mean_of_the_processes_gradients(tmp_path):
    run = torchrun(tmp_path, WORKER, "gradients")
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = records(tmp_path)
    for grad_sync in distributed.GRAD_SYNCS:
        mine, theirs = rank0[grad_sync], rank1[grad_sync]
        assert mine["averaged"].keys() == {"encoder", "decoder", "discriminator"}
        for name in mine["averaged"]:
            own = zip(mine["local"][name], theirs["local"][name], mine["averaged"][name], theirs["averaged"][name])
            for local0, local1, averaged0, averaged1 in own:
                torch.testing.assert_close(averaged0, (local0 + local1) / 2, rtol=1e-5, atol=1e-7)
                assert torch.equal(averaged0, averaged1)
            # the processes' own gradients differ (different images), so the average is not trivially one of them
            assert not torch.allclose(mine["local"][name][0], theirs["local"][name][0])
        for key in ("loss_prior", "loss_llike", "loss_gan", "bce_real", "d_real"):  # what metrics.csv gets
            expected = (mine["local_stats"][key] + theirs["local_stats"][key]) / 2
            assert mine["stats"][key] == theirs["stats"][key] == pytest.approx(expected, rel=1e-5)


def test_a_process_that_dies_takes_the_others_down(tmp_path, real_data):
    run = torchrun(tmp_path, WORKER, "die", "--data-root", str(real_data), *TINY, "--max-steps", "200",
                   "--out", "run", timeout=120)
    assert run.returncode != 0
    assert "lost contact with the other training processes" in run.stderr or "SIGTERM" in run.stderr
    assert "Signal 9 (SIGKILL)" in run.stderr  # torchrun names the process that died
    steps = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert len(steps) < 200


def test_cuda_with_fewer_gpus_than_processes_is_refused(tmp_path):
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU for each of the two processes")
    run = torchrun(tmp_path, ROOT / "main.py", "--device", "cuda", "--out", "run", timeout=120)
    assert run.returncode != 0
    assert run.stderr.count("error: --device cuda with 2 processes on this machine needs 2 GPUs") == 1
    assert "exitcode  : 2" in run.stderr
    assert f'File "{ROOT / "main.py"}"' not in run.stderr  # no traceback from the processes themselves
    assert not (tmp_path / "run").exists()


def test_sync_bn_on_the_cpu_is_refused(tmp_path, real_data):
    run = torchrun(tmp_path, ROOT / "main.py", "--data-root", str(real_data), *TINY, "--max-steps", "2",
                   "--sync-bn", "--out", "run", timeout=120)
    assert run.returncode != 0
    assert run.stderr.count("error: --sync-bn needs GPUs") == 1
    assert "exitcode  : 2" in run.stderr
    assert f'File "{ROOT / "main.py"}"' not in run.stderr


def test_sync_bn_in_one_process_says_it_does_nothing(tmp_path, real_data, capsys):
    assert main.main(["--data-root", str(real_data), *TINY, "--max-steps", "1", "--sync-bn",
                      "--out", str(tmp_path / "run")]) == 0
    assert "--sync-bn has no effect in a single process" in capsys.readouterr().out


def test_buckets_keep_order_and_respect_the_cap():
    tensors = [torch.zeros(n) for n in (10, 10, 30, 5)] + [torch.zeros(4, dtype=torch.float64)]
    runs = distributed.buckets(tensors, cap_bytes=80)
    assert [[t.numel() for t in run] for run in runs] == [[10, 10], [30], [5], [4]]
    assert [t for run in runs for t in run] == tensors


def test_device_of_each_process():
    assert distributed.process_device("cpu", 1, 2) == torch.device("cpu")
    with pytest.raises(distributed.LaunchError, match="cuda:1"):
        distributed.process_device("cuda:1", 0, 2)
    if not torch.cuda.is_available():
        assert distributed.process_device("auto", 1, 2) == torch.device("cpu")
        with pytest.raises(distributed.LaunchError, match="no CUDA GPU"):
            distributed.process_device("cuda", 0, 2)


def test_bench_compares_ddp_and_bucketed_all_reduce(tmp_path):
    run = torchrun(tmp_path, ROOT / "bench.py", "--image-size", "16", "--width", "0.125", "--batch-size", "8",
                   "--steps", "2", "--json", "bench.json", timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("project_allreduce") == 1  # rank 0 alone prints the table
    assert "Warning" not in run.stderr  # e.g. DDP's grad-stride warning for grey images' first convolution
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["processes"] == 2 and "naive" not in report["results"]
    ddp, allreduce = report["results"]["project"], report["results"]["project_allreduce"]
    assert ddp["images_per_second"] == pytest.approx(16 / ddp["seconds"])  # both processes' images
    assert allreduce["flops"] == ddp["flops"] > 0
    assert report["allreduce_over_ddp"] == pytest.approx(allreduce["seconds"] / ddp["seconds"])


def test_rank_0_alone_downloads_and_reports_a_failed_download(tmp_path):
    run = torchrun(tmp_path, ROOT / "main.py", "--dataset", "fashion-mnist", "--data-root", "data", *TINY,
                   "--out", "run", timeout=240)
    if run.returncode == 0:
        pytest.skip("the download succeeded: this machine has internet access")
    assert run.stdout.count("downloading it (once)") == 1
    assert run.stderr.count("error: ") == 1 and "could not download Fashion-MNIST" in run.stderr
    assert "exitcode  : 2" in run.stderr and not (tmp_path / "run").exists()


def test_sync_bn_converts_every_batchnorm_and_keeps_checkpoints_compatible():
    nets = models.build_networks(NetworkConfig(image_size=16, width=0.125))
    keys = {name: set(m.state_dict()) for name, m in nets.modules().items()}
    weights = {name: [p.clone() for p in m.parameters()] for name, m in nets.modules().items()}
    note = distributed.convert_sync_batchnorm(nets, distributed.Replicas(rank=0, world_size=2))
    assert "SyncBatchNorm" in note
    for name, module in nets.modules().items():
        norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
        assert set(module.state_dict()) == keys[name]  # the same checkpoint keys as without --sync-bn
        assert all(torch.equal(a, b) for a, b in zip(module.parameters(), weights[name]))
    assert "no effect" in distributed.convert_sync_batchnorm(models.build_networks(NetworkConfig(image_size=16, width=0.125)),
                                                      distributed.SINGLE)
