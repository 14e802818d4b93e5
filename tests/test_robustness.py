"""Nothing breaks it: resource limits, paths of the wrong kind, counts larger than what exists,
damaged data mid-run, and (pytest -m soak) long runs killed at random. docs/robustness.md lists
every case with its exit code and what is left on disk; test_the_robustness_table_names_real_tests
keeps that table and the tests in step."""
import csv
import errno
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import data
import main
import step
import utils
from conftest import ROOT, TINY, run_cli, write_images


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------
# Resource limits
# ---------------------------------------------------------------------------

def test_a_configuration_too_large_for_memory_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--image-size", "2048", "--width", "4", "--batch-size", "1024", "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs about" in result.stderr and "GiB free" in result.stderr and "--batch-size" in result.stderr
    assert not out.exists()


def allocation_fails_at(step_number, monkeypatch):
    """The allocator refuses memory at the given step of this process, as PyTorch's CPU allocator says it."""
    real_step, taken = step.train_step, []

    def failing_step(*args, **kwargs):
        taken.append(1)
        if len(taken) == step_number:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 68719476736 bytes. Error code 12")
        return real_step(*args, **kwargs)
    monkeypatch.setattr(step, "train_step", failing_step)


def test_running_out_of_memory_in_a_new_run_leaves_no_folder_behind(tmp_path, monkeypatch, capsys):
    allocation_fails_at(3, monkeypatch)
    out = tmp_path / "run"
    assert main.main(["--out", str(out), "--max-steps", "10", *TINY]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "lower --batch-size" in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not out.exists()


def test_running_out_of_memory_in_a_resumed_run_keeps_its_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main.main(["--out", str(out), "--max-steps", "2", *TINY]) == 0
    before = tree(out)
    allocation_fails_at(1, monkeypatch)
    assert main.main(["--resume", str(out), "--max-steps", "5"]) == 2
    assert "out of memory" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]
    assert [int(r["step"]) for r in rows_of(out / "metrics.csv")] == [1, 2]


def test_a_full_disk_while_writing_a_grid_keeps_the_grids_before_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, saved = utils.save_image, []

    def save_until_full(grid, path, **kwargs):
        saved.append(path)
        if len(saved) == 3:  # the step-4 sample grid: half a file, then the disk is full
            open(path, "wb").write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(grid, path, **kwargs)
    monkeypatch.setattr(utils, "save_image", save_until_full)
    assert main.main(["--out", str(out), "--max-steps", "6", "--sample-every", "2", *TINY]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "written atomically" in err
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["evolution.gif", "step_0000002.png"]
    with Image.open(out / "samples" / "evolution.gif") as gif:
        assert gif.n_frames == 1  # the grid written before the disk filled
    assert not list(out.rglob(".*.tmp"))


def test_a_full_disk_while_appending_to_metrics_keeps_whole_rows(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_write = os.write

    def write_until_full(fd, data):
        if data.startswith(b"5,"):  # the row of step 5: part of it, then the disk is full
            real_write(fd, data[:7])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(utils.os, "write", write_until_full)
    assert main.main(["--out", str(out), "--max-steps", "8", *TINY]) == 2
    assert "No space left on device" in capsys.readouterr().err
    text = (out / "metrics.csv").read_text()
    assert text.endswith("\n") and [int(r["step"]) for r in rows_of(out / "metrics.csv")] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------
# Paths of the wrong kind, arguments checked first, no silent changes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "sample", "evaluate"])
def test_a_data_root_that_is_a_file_is_refused(tiny_runs, tmp_path, command):
    (tmp_path / "a-file").write_text("mine")
    args = ["--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "a-file")]
    args = [*args, *TINY] if command == "train" else [command, "--checkpoint", str(tiny_runs["vaegan"]), *args]
    result = run_cli(*args)
    assert result.returncode == 2 and "is a file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_mnist_falls_back_to_the_bundled_copy_and_says_so_in_one_line(tmp_path):
    result = run_cli("--data-root", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "--max-steps", "1", *TINY)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if "shipped with the tool" in line]
    assert len(notes) == 1 and str(tmp_path / "empty") in notes[0]


def test_a_missing_labels_file_is_refused_before_the_checkpoint_is_read(tmp_path):
    result = run_cli("attributes", "--checkpoint", str(tmp_path / "no-run"), "--labels", str(tmp_path / "none.csv"))
    assert result.returncode == 2 and "--labels" in result.stderr and "is not a file" in result.stderr


def test_counts_larger_than_what_exists_are_used_with_a_note(tiny_runs, tmp_path):
    result = run_cli("reconstruct", "--checkpoint", str(tiny_runs["vaegan"]), "--num", "20000",
                     "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert "note: --num asks for 20,000, but there are 10,000 held-out images; used 10,000" in result.stdout
    result = run_cli("attributes", "--checkpoint", str(tiny_runs["vaegan"]), "--from", "3", "--to", "8",
                     "--num-labelled", "100000", "--num-queries", "5000", "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert "note: --num-labelled asks for 100,000" in result.stdout and "note: --num-queries asks for 5,000" in result.stdout


def test_unreadable_files_mid_run_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    """Files that break between epochs are skipped; each epoch line says how many so far."""
    files = write_images(tmp_path / "images", 40, size=(20, 20))  # 38 training images: 2 steps of 16 an epoch
    end_epoch = main.Run.end_epoch

    def break_files_after_epoch_1(run):
        end_epoch(run)
        if run.epoch == 1:
            for path in files[1:4]:
                path.write_bytes(b"truncated")
            files[5].unlink()
    monkeypatch.setattr(main.Run, "end_epoch", break_files_after_epoch_1)
    code = main.main(["--dataset", "folder", "--data-root", str(tmp_path / "images"), "--out", str(tmp_path / "run"),
                      "--epochs", "2", "--num-workers", "0", *TINY])
    assert code == 0
    train = [f for i, f in enumerate(files) if i % 20]  # data.load_folder holds out every 20th file
    order = data.Batches(data.ImageFiles(train, 3, 16), 16, 16, torch.device("cpu"), seed=0).order(2)[:32]
    drawn = sum(train[i] in files[1:4] + files[5:6] for i in order.tolist())
    err = capsys.readouterr().err
    assert drawn > 0 and f"skipped {drawn} unreadable image(s) so far" in err and "Traceback" not in err


# ---------------------------------------------------------------------------
# The table in docs/robustness.md
# ---------------------------------------------------------------------------

def test_the_robustness_table_names_real_tests():
    table = (ROOT / "docs" / "robustness.md").read_text()
    named = set(re.findall(r"`(tests/test_\w+\.py)::(\w+)`", table))
    assert named, "the table names no tests"
    for path, name in sorted(named):
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name} does not exist"
    here = set(re.findall(r"^def (test_\w+)\(", (ROOT / "tests" / "test_robustness.py").read_text(), re.M))
    missing = here - {name for path, name in named if path == "tests/test_robustness.py"}
    assert missing == {"test_the_robustness_table_names_real_tests"}


# ---------------------------------------------------------------------------
# Soak: long runs killed at random (pytest -m soak)
# ---------------------------------------------------------------------------

SOAK = ["--image-size", "16", "--width", "0.125", "--latent-dim", "8", "--batch-size", "16", "--max-steps", "3000",
        "--checkpoint-every", "50", "--seed", "4"]


def kill_at(process, run, moment, during_write):
    """SIGKILL `process` at a random moment after its first checkpoint, or while it writes one."""
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if during_write:  # poll without sleeping: a checkpoint of this size is written in milliseconds
        while process.poll() is None and time.time() < deadline and not any(
                entry.name.startswith(".checkpoint.pt.") for entry in os.scandir(run)):
            pass
    else:
        time.sleep(moment)
    process.kill()
    process.wait()


def start(args, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


@pytest.mark.soak
def test_soak_twenty_random_kills_leave_the_run_of_an_uninterrupted_one(tmp_path, real_data):
    rng = random.Random(20)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli("--data-root", str(real_data), "--out", str(straight), *SOAK, timeout=1800).returncode == 0
    lost = []
    for kill in range(20):
        args = ([*SOAK, "--data-root", str(real_data), "--out", str(killed)] if kill == 0
                else ["--resume", str(killed)])
        process = start(args)
        kill_at(process, killed, rng.uniform(0.2, 3.0), during_write=kill % 4 == 3)
        state = utils.load_checkpoint(killed)  # loadable after every kill
        steps = [int(r["step"]) for r in rows_of(killed / "metrics.csv")]
        assert steps == list(range(1, len(steps) + 1))  # no gap, no repeated step
        lost.append(steps[-1] - state["step"] if steps else 0)
    result = run_cli("--resume", str(killed), timeout=1800)
    assert result.returncode == 0, result.stderr
    assert [int(r["step"]) for r in rows_of(killed / "metrics.csv")] == list(range(1, 3001))
    a, b = torch.load(straight / "checkpoint.pt", weights_only=True), torch.load(killed / "checkpoint.pt",
                                                                                 weights_only=True)
    for name in ("encoder", "decoder", "discriminator"):
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["step"] == b["step"] == 3000
    for name in a["optimizers"]:
        for p, q in zip(a["optimizers"][name]["state"].values(), b["optimizers"][name]["state"].values()):
            assert all(torch.equal(p[k], q[k]) for k in p), name
    assert max(lost) <= 50  # never more than one checkpoint interval of work lost
    print(f"soak: 20 kills, steps lost per kill {lost}")


@pytest.mark.soak
def test_soak_a_killed_torchrun_worker_resumes(tmp_path, real_data):
    run = tmp_path / "run"
    env = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "main.py"), *SOAK, "--device", "cpu", "--data-root", str(real_data), "--out", str(run)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **env})
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)
    workers = subprocess.run(["pgrep", "-f", f"main.py.*--out {run}"], capture_output=True, text=True).stdout.split()
    workers = [int(pid) for pid in workers if int(pid) != process.pid]
    os.kill(max(workers), signal.SIGKILL)  # one worker dies
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and "lost contact with the other training processes" in stderr
    state = utils.load_checkpoint(run)
    lost = len(rows_of(run / "metrics.csv")) - state["step"]
    resume = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              str(ROOT / "main.py"), "--resume", str(run)]
    result = subprocess.run(resume, capture_output=True, text=True, timeout=1800, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(r["step"]) for r in rows_of(run / "metrics.csv")] == list(range(1, 3001))
    assert state["step"] > 0 and 0 <= lost <= 50
    print(f"soak under torchrun: worker killed after step {state['step'] + lost}, resumed from {state['step']}")
