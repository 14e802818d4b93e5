"""The command line as a user types it: help, bad input, presets, and a short real MNIST run."""
import csv
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import main
from conftest import ROOT, write_images

TINY = ["--image-size", "16", "--width", "0.125", "--latent-dim", "8", "--batch-size", "16"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_help_lists_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--dataset", "--data-root", "--preset", "--image-size", "--width", "--latent-dim", "--recon-layer",
                   "--batch-size", "--lr", "--rmsprop-alpha", "--gamma", "--llike-weight", "--real-weight",
                   "--gan-loss", "--equilibrium", "--margin", "--no-equilibrium", "--epochs", "--max-steps",
                   "--sample-every", "--seed", "--device", "--out", "--overwrite", "--channels"):
        assert option in result.stdout, option


@pytest.mark.parametrize("args, words", [
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--gan-loss", "wasserstein"], "invalid choice"),
    (["--batch-size", "two"], "invalid int value"),
    (["--image-size", "20"], "multiple of 8"),
    (["--image-size", "8"], "at least 16"),
    (["--batch-size", "1"], "at least 2 images"),
    (["--width", "0.001"], "empty layer"),
    (["--latent-dim", "0"], "empty latent"),
    (["--recon-layer", "5"], "out of range"),
    (["--gamma", "2"], "--gamma 2.0 must be in [0, 1]"),
    (["--lr", "-1"], "must be positive"),
    (["--equilibrium", "nan"], "finite numbers"),
    (["--device", "cuda:7"], "cuda"),
    (["--device", "tpu"], "not a device"),
    (["--dataset", "mnist", "--channels", "3"], "does not fit mnist"),
    (["--dataset", "folder", "--data-root", "/nonexistent/images"], "does not exist"),
])
def test_bad_input_is_one_clear_paragraph_and_exit_2(tmp_path, args, words):
    out = tmp_path / "run"
    result = run_cli(*args, "--out", str(out), "--max-steps", "1")
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing written


def test_out_folder_holding_a_run_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    result = run_cli("--out", str(out), "--max-steps", "1", *TINY)
    assert result.returncode == 2 and "already holds a run" in result.stderr and "--overwrite" in result.stderr
    assert json.loads((out / "config.json").read_text()) == {"old": True}


def test_unwritable_out_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("--out", str(blocker / "run"), "--max-steps", "1", *TINY)
    assert result.returncode == 2 and "cannot write into --out" in result.stderr
    assert "Traceback" not in result.stderr


def parse(*args):
    parser = main.build_parser()
    return main.resolve_config(parser.parse_args(list(args)), torch.device("cpu"))


def test_auto_preset_on_cpu_is_the_cpu_preset_and_explicit_flags_win():
    cfg, line = parse("--dataset", "mnist")
    assert cfg.preset == "cpu" and "preset cpu (auto on cpu)" in line and "--preset paper" in line
    assert (cfg.image_size, cfg.width, cfg.epochs) == tuple(main.PRESETS["cpu"].values()) == (32, 0.25, 5)
    assert (cfg.gamma, cfg.llike_weight) == (1e-5, 1.0)
    cfg, _ = parse("--preset", "paper", "--epochs", "3", "--width", "0.5")
    assert (cfg.image_size, cfg.width, cfg.epochs) == (64, 0.5, 3)
    on_gpu, _ = main.resolve_config(main.build_parser().parse_args([]), torch.device("cuda"))
    assert on_gpu.preset == "paper" and on_gpu.image_size == 64


def test_folder_dataset_trains_and_skips_corrupt_images(tmp_path):
    files = write_images(tmp_path / "images", 34, size=(24, 20))  # 2 held out, 32 = two batches of 16
    files[1].write_bytes(b"broken")
    out = tmp_path / "run"
    result = run_cli("--dataset", "folder", "--data-root", str(tmp_path / "images"), "--out", str(out),
                     "--max-steps", "3", "--num-workers", "0", *TINY)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable image" in result.stderr
    assert json.loads((out / "config.json").read_text())["channels"] == 3


def test_short_real_mnist_run_learns_and_writes_every_output(tmp_path, real_data):
    out = tmp_path / "run"
    result = run_cli("--dataset", "mnist", "--data-root", str(real_data), "--out", str(out), "--max-steps", "40",
                     "--sample-every", "20", "--seed", "3", *TINY)
    assert result.returncode == 0, result.stderr
    assert "device: cpu" in result.stdout and "parameters: encoder" in result.stdout
    assert "measured" in result.stderr + result.stdout and "s/step" in result.stdout + result.stderr

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    for term in ("loss_prior", "loss_llike"):
        first = sum(float(r[term]) for r in rows[:5]) / 5
        last = sum(float(r[term]) for r in rows[-5:]) / 5
        assert last < first, term
    assert {r["update_dis"] for r in rows} <= {"0", "1"}

    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 16 and config["dataset"] == "mnist" and config["torch_version"] == torch.__version__
    for png in ["samples/epoch_001.png", "samples/step_0000020.png", "reconstructions/epoch_001.png",
                "plots/kl_divergence.png", "plots/gan_loss.png", "plots/recon_loss.png"]:
        with Image.open(out / png) as image:
            image.verify()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 40 and set(state["optimizers"]) == {"encoder", "decoder", "discriminator"}


def test_same_seed_same_run(tmp_path, real_data):
    runs = []
    for name in ("a", "b"):
        result = run_cli("--data-root", str(real_data), "--out", str(tmp_path / name), "--max-steps", "3", *TINY)
        assert result.returncode == 0, result.stderr
        runs.append(torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["decoder"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_sampling_with_batch_statistics_leaves_running_statistics_alone():
    nets = main.build_networks(main.ModelConfig(image_size=16, width=0.125, latent_dim=8))
    before = {k: v.clone() for k, v in nets.decoder.state_dict().items()}
    nets.decoder.eval()
    images = main.decode_with_batch_statistics(nets.decoder, torch.randn(4, 8))
    assert images.shape == (4, 1, 16, 16) and not nets.decoder.training
    assert all(torch.equal(before[k], v) for k, v in nets.decoder.state_dict().items())


def test_failed_download_through_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--dataset", "fashion-mnist", "--data-root", str(tmp_path / "data"), "--out", str(out), *TINY)
    if result.returncode == 0:
        pytest.skip("the download succeeded: this machine has internet access")
    assert result.returncode == 2 and "could not download Fashion-MNIST" in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("flags, note", [
    (["--amp", "bf16"], "autocast to bf16"),
    (["--amp", "fp16"], "with dynamic loss scaling"),
    (["--channels-last"], "channels-last memory format"),
    (["--compile"], "torch.compile"),
])
def test_fast_paths_run_on_the_cpu_too(tmp_path, flags, note):
    out = tmp_path / "run"
    result = run_cli("--out", str(out), "--max-steps", "3", *TINY, *flags)
    assert result.returncode == 0, result.stderr
    assert note in result.stdout
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["loss_llike"]) == float(r["loss_llike"]) for r in rows)  # no NaN
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod") for key in state["encoder"])  # plain weights, also when compiled


@pytest.mark.parametrize("model", list(main.MODELS))
def test_each_model_builds_and_updates_only_its_own_networks(model):
    torch.manual_seed(0)
    nets = main.build_networks(main.ModelConfig(image_size=16, width=0.125, latent_dim=8), "cpu", model)
    assert tuple(nets.modules()) == main.MODELS[model]
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in nets.modules().items()}
    stats = main.train_step(nets, main.build_optimizers(nets, 1e-3, 0.9), torch.rand(8, 1, 16, 16) * 2 - 1,
                            main.LossConfig(model=model, equilibrium=None))
    for name, module in nets.modules().items():
        assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), before[name])), name
    terms = main.LOSS_TERMS[model]
    assert all(stats[k] == stats[k] for k in terms)  # the model's own terms are numbers, not NaN


@pytest.mark.parametrize("model", ["vae", "vae-disl", "gan"])
def test_each_model_trains_from_the_command_line_and_saves_only_its_networks(tmp_path, model):
    out = tmp_path / "run"
    result = run_cli("--model", model, "--out", str(out), "--max-steps", "3", *TINY)
    assert result.returncode == 0, result.stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    owned = set(main.MODELS[model])
    assert {k for k in ("encoder", "decoder", "discriminator") if k in state} == owned == set(state["optimizers"])
    assert (out / "samples" / "epoch_001.png").exists()
    assert (out / "reconstructions" / "epoch_001.png").exists() == ("encoder" in owned)
    assert (out / "plots" / "gan_loss.png").exists() == ("discriminator" in owned)
    assert (out / "plots" / "kl_divergence.png").exists() == ("encoder" in owned)


@pytest.mark.parametrize("case, words", [("empty", "holds no images"), ("all corrupt", "could be read")])
def test_unusable_image_folder_through_the_command_line(tmp_path, case, words):
    images = tmp_path / "images"
    images.mkdir()
    if case == "all corrupt":
        for i in range(3):
            (images / f"{i}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    result = run_cli("--dataset", "folder", "--data-root", str(images), "--out", str(out), *TINY)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.skipif(main.glibc() is None, reason="malloc tuning is for glibc (Linux)")
def test_cpu_training_keeps_freed_memory_for_reuse():
    """A 64 MiB block allocated and freed step after step: kept, its pages are reused once the heap
    has settled; otherwise every page is faulted in afresh each time (what each training step
    would pay for its activations)."""
    code = ("import resource, sys, torch, main\n"
            "applied = main.keep_freed_memory(torch.device(sys.argv[1]), keep=sys.argv[2] == 'keep')\n"
            "for step in range(8):\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    block = torch.ones(1 << 24)\n"
            "    del block\n"
            "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {}
    # On a GPU the activations are not in malloc's memory: left alone. keep=False is how bench.py
    # measures memory: every large block mapped on its own and returned when freed.
    for device, keep in (("cpu", "keep"), ("cuda", "keep"), ("cpu", "exact")):
        result = subprocess.run([sys.executable, "-c", code, device, keep], capture_output=True, text=True, cwd=ROOT)
        applied, faults[device, keep] = result.stdout.split()
        assert applied == str(device == "cpu")
    assert int(faults["cpu", "keep"]) < 1000  # 64 MiB is 16,384 pages of 4 KiB
    assert int(faults["cuda", "keep"]) > 10_000 and int(faults["cpu", "exact"]) > 10_000


def test_channels_last_is_the_cpu_default_and_can_be_turned_off(tmp_path):
    for flags, expected in (([], True), (["--no-channels-last"], False)):
        out = tmp_path / f"run{len(flags)}"
        assert main.main(["--out", str(out), "--max-steps", "1", *TINY, *flags]) == 0
        assert json.loads((out / "config.json").read_text())["channels_last"] is expected
