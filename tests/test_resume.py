"""Runs that survive: exact resume, signals, SIGKILL at random moments, NaNs, bad checkpoints, full disk."""
import csv
import errno
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
import utils
from conftest import ROOT, TINY, run_cli, write_images


def start_cli(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def steps_in_metrics(run):
    with open(run / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def assert_same_state(a, b):
    for name in ("encoder", "decoder", "discriminator"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"
        for p, q in zip(a["optimizers"][name]["state"].values(), b["optimizers"][name]["state"].values()):
            assert all(torch.equal(p[k], q[k]) for k in p), f"{name} optimizer"
    assert a.keys() == b.keys()
    for key in a.get("decoder_average", {}):  # the cpu preset keeps a moving average of the decoder
        assert torch.equal(a["decoder_average"][key], b["decoder_average"][key]), f"decoder_average.{key}"


def load(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("conditional", [[], ["--conditional"]], ids=["unconditional", "conditional"])
def test_two_steps_resume_two_steps_equals_four_steps_inside_an_epoch(tmp_path, real_data, conditional):
    common = ["--data-root", str(real_data), *TINY, *conditional]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(*common, "--out", str(straight), "--max-steps", "4").returncode == 0
    assert run_cli(*common, "--out", str(split), "--max-steps", "2").returncode == 0
    assert load(split)["epoch_batches"] == 2  # stopped inside the first epoch
    result = run_cli("--resume", str(split), "--max-steps", "4")
    assert result.returncode == 0, result.stderr
    assert "resuming at step 2" in result.stdout
    assert_same_state(load(straight), load(split))
    assert steps_in_metrics(split) == [1, 2, 3, 4]
    with open(straight / "metrics.csv") as f, open(split / "metrics.csv") as g:
        losses = [[r["loss_llike"] for r in csv.DictReader(h)] for h in (f, g)]
    assert losses[0] == losses[1]
    if conditional:
        assert load(split)["labels"] == {"names": [str(c) for c in range(10)], "attributes": False}
        assert (split / "samples" / "epoch_001.png").read_bytes() == (straight / "samples" / "epoch_001.png").read_bytes()


def test_resume_across_an_epoch_boundary_with_file_dataset_workers(tmp_path):
    write_images(tmp_path / "images", 34, size=(20, 20))  # 32 training images: 2 steps of 16 per epoch
    common = ["--dataset", "folder", "--data-root", str(tmp_path / "images"), "--num-workers", "1", *TINY]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(*common, "--out", str(straight), "--max-steps", "6").returncode == 0
    assert run_cli(*common, "--out", str(split), "--max-steps", "3").returncode == 0
    result = run_cli("--resume", str(split / "checkpoint.pt"), "--max-steps", "6")
    assert result.returncode == 0, result.stderr
    assert_same_state(load(straight), load(split))
    assert steps_in_metrics(split) == list(range(1, 7))


def wait_for_training(process, run, seconds=1.5, ready="config.json"):
    """Wait until the run has written `ready`, then `seconds` more."""
    deadline = time.time() + 120
    while not (run / ready).exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(seconds)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, real_data, signum, code):
    run = tmp_path / "run"
    process = start_cli("--data-root", str(real_data), "--out", str(run), "--max-steps", "100000", *TINY)
    wait_for_training(process, run)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert f"--resume {run}" in stderr and "Traceback" not in stderr
    state = utils.load_checkpoint(run)
    assert state["step"] > 0 and steps_in_metrics(run) == list(range(1, state["step"] + 1))
    assert (run / "samples" / f"step_{state['step']:07d}.png").exists() and (run / "plots" / "gan_loss.png").exists()


def test_sigkill_at_random_moments_always_leaves_a_resumable_run(tmp_path, real_data):
    run = tmp_path / "run"
    total = 400
    rng = random.Random(1)
    args = ["--data-root", str(real_data), "--out", str(run), "--max-steps", str(total), "--checkpoint-every", "7",
            "--sample-every", "50", *TINY]
    for attempt in range(4):
        process = start_cli(*args) if attempt == 0 else start_cli("--resume", str(run), "--checkpoint-every", "7")
        # a random moment after the first checkpoint (before it there is nothing to resume, by design)
        wait_for_training(process, run, seconds=rng.uniform(0.5, 2.5), ready="checkpoint.pt")
        process.kill()
        process.wait()
        state = utils.load_checkpoint(run)  # loadable after every kill
        assert steps_in_metrics(run)[: state["step"]] == list(range(1, state["step"] + 1))
    result = run_cli("--resume", str(run))
    assert result.returncode == 0, result.stderr
    assert steps_in_metrics(run) == list(range(1, total + 1))
    assert load(run)["step"] == total
    assert not list(run.glob(".*.tmp"))  # no temporary files left behind by the kills


def test_nan_loss_stops_with_the_term_and_step_and_keeps_the_last_checkpoint(tmp_path, real_data):
    run = tmp_path / "run"
    assert run_cli("--data-root", str(real_data), "--out", str(run), "--max-steps", "2", *TINY).returncode == 0
    before = (run / "checkpoint.pt").read_bytes()
    result = run_cli("--resume", str(run), "--max-steps", "50", "--lr", "1e30")
    assert result.returncode == 1
    assert "training diverged" in result.stderr and "at step" in result.stderr and "loss_" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli("--out", str(run), "--max-steps", "2", *TINY)
    assert result.returncode == 0, result.stderr
    return run


def test_a_fresh_process_reproduces_the_sample_grid(finished_run, tmp_path):
    code = (
        "import sys, torch, config, kernels, main, models, utils\n"
        "cfg, nets, _, _ = utils.load_run(sys.argv[1], torch.device('cpu'))\n"  # the decoder's average, as the grids
        "nets.decoder.to(memory_format=kernels.memory_format(cfg.channels_last))\n"  # as the run computed its grids
        "z = torch.randn(main.SAMPLE_GRID, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed))\n"
        "utils.write_grid(models.decode_with_batch_statistics(nets.decoder, z), sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(finished_run), str(tmp_path / "again.png")], check=True, cwd=ROOT)
    assert (tmp_path / "again.png").read_bytes() == (finished_run / "samples" / "epoch_001.png").read_bytes()


def damaged_checkpoints(source, folder):
    folder.mkdir()
    whole = (source / "checkpoint.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (folder / "garbage.pt").write_bytes(b"this is not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    state = torch.load(source / "checkpoint.pt", weights_only=True)
    state["config"]["width"] = 0.25  # weights of one model, config of another
    torch.save(state, folder / "other-model.pt")
    return folder


@pytest.mark.parametrize("name, words", [
    ("missing.pt", "there is no checkpoint"),
    ("truncated.pt", "truncated or not a checkpoint"),
    ("garbage.pt", "truncated or not a checkpoint"),
    ("foreign.pt", "not a checkpoint of this tool"),
    ("other-model.pt", "made for another model"),
])
def test_bad_checkpoints_are_clear_errors(finished_run, tmp_path, name, words):
    folder = damaged_checkpoints(finished_run, tmp_path / "bad")
    result = run_cli("--resume", str(folder / name))
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, words", [
    (["--image-size", "32"], "--image-size 32 (the checkpoint has 16)"),
    (["--dataset", "cifar10"], "--dataset cifar10 (the checkpoint has mnist)"),
    (["--width", "0.5", "--latent-dim", "4"], "--latent-dim 4 (the checkpoint has 8), --width 0.5"),
    (["--conditional"], "--conditional True (the checkpoint has False)"),
])
def test_resume_with_contradicting_settings_names_them(finished_run, flags, words):
    before = (finished_run / "checkpoint.pt").read_bytes()
    result = run_cli("--resume", str(finished_run), *flags)
    assert result.returncode == 2 and words in result.stderr and "win" in result.stderr
    assert (finished_run / "checkpoint.pt").read_bytes() == before


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main.main(["--out", str(run), "--max-steps", "1", *TINY]) == 0
    before = (run / "checkpoint.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    code = main.main(["--resume", str(run), "--max-steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "last good checkpoint is intact" in err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob(".*.tmp"))
    assert json.loads((run / "config.json").read_text())["max_steps"] == 1  # config.json untouched too


def test_a_checkpoint_of_the_first_format_still_resumes(tmp_path):
    """tests/fixtures/checkpoint-format-1.pt was written by the code before settings were declared in
    config.py (2 steps of a tiny run); it continues under today's code."""
    run = tmp_path / "old"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((ROOT / "tests" / "fixtures" / "checkpoint-format-1.pt").read_bytes())
    result = run_cli("--resume", str(run), "--max-steps", "4")
    assert result.returncode == 0, result.stderr
    assert "resuming at step 2" in result.stdout
    assert steps_in_metrics(run) == [1, 2, 3, 4] and load(run)["step"] == 4
