"""The command line as a user types it: help, bad input, presets, and a short real MNIST run."""
import csv
import json

import pytest
import torch
from PIL import Image

import main
import models
from conftest import ROOT, TINY, run_cli, write_images

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
    (["--ema-decay", "1"], "--ema-decay 1.0 must be in [0, 1)"),
    (["--equilibrium", "nan"], "must be a finite number"),
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
    for term in ("recon_mse", "loss_gan"):  # it learns to reconstruct in pixels, and its discriminator to tell
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


def test_failed_download_through_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--dataset", "fashion-mnist", "--data-root", str(tmp_path / "data"), "--out", str(out), *TINY)
    if result.returncode == 0:
        pytest.skip("the download succeeded: this machine has internet access")
    assert result.returncode == 2 and "could not download Fashion-MNIST" in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("flags, note", [
    (["--amp", "bf16"], "precision: bfloat16 autocast"),
    (["--amp", "fp16"], "precision: float16 autocast with loss scaling"),
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
    assert any(float(r["update_dis"]) for r in rows)  # the discriminator's backward pass ran, reused by L_llike's
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod") for key in state["encoder"])  # plain weights, also when compiled


@pytest.mark.parametrize("model", ["vae", "vae-disl", "gan"])
def test_each_model_trains_from_the_command_line_and_saves_only_its_networks(tmp_path, model):
    out = tmp_path / "run"
    result = run_cli("--model", model, "--out", str(out), "--max-steps", "3", *TINY)
    assert result.returncode == 0, result.stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    owned = set(models.MODELS[model])
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


def test_channels_last_is_the_cpu_default_and_can_be_turned_off(tmp_path):
    for flags, expected in (([], True), (["--no-channels-last"], False)):
        out = tmp_path / f"run{len(flags)}"
        assert main.main(["--out", str(out), "--max-steps", "1", *TINY, *flags]) == 0
        assert json.loads((out / "config.json").read_text())["channels_last"] is expected


def tree(folder):
    """Every file below `folder` with its bytes: what "nothing on disk changed" compares."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CHECKPOINT_COMMANDS = {  # each command with arguments that work on the tiny vaegan run
    "sample": [], "reconstruct": ["--num", "4"], "interpolate": ["--pairs", "2", "--steps", "3"],
    "attributes": ["--from", "3", "--to", "8", "--num-labelled", "50", "--num-queries", "2"], "evaluate": ["--num", "50"],
}
NONSENSE_COUNTS = {"sample": ["--num", "0"], "reconstruct": ["--num", "-3"], "interpolate": ["--steps", "1"],
                   "attributes": ["--num-queries", "0"], "evaluate": ["--num", "1"]}


@pytest.mark.parametrize("case", ["no gpu", "bad count", "out is a file", "out holds other files",
                                  "missing checkpoint", "damaged checkpoint"])
@pytest.mark.parametrize("command", list(CHECKPOINT_COMMANDS))
def test_every_command_refuses_bad_input_with_one_paragraph_and_changes_nothing(tiny_runs, tmp_path, command, case):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "config.json"):
        (run / name).write_bytes((tiny_runs["vaegan"] / name).read_bytes())
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    args = [command, "--checkpoint", str(run), *CHECKPOINT_COMMANDS[command], "--device", "cpu"]
    if case == "no gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        args += ["--device", "cuda"]
    elif case == "bad count":
        args += NONSENSE_COUNTS[command]
    elif case == "out is a file":
        args += ["--out", str(tmp_path / "a-file")]
    elif case == "out holds other files":
        args += ["--out", str(tmp_path / "other")]
    elif case == "missing checkpoint":
        args[2] = str(tmp_path / "nowhere")
    else:
        (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:5000])
    before = tree(tmp_path)
    result = run_cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "error" in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1
    words = {"no gpu": "no CUDA GPU", "bad count": "must be at least", "out is a file": "is a file",
             "out holds other files": "notes.txt", "missing checkpoint": "there is no checkpoint",
             "damaged checkpoint": "truncated or not a checkpoint"}[case]
    assert words in result.stderr
    assert tree(tmp_path) == before


def test_training_on_a_gpu_that_is_not_there_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("--device", "cuda", "--out", str(tmp_path / "run"), *TINY)
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["a file", "other files"])
def test_training_refuses_an_out_that_is_a_file_or_holds_other_files(tmp_path, case):
    out = tmp_path / "out"
    if case == "a file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    result = run_cli("--out", str(out), "--max-steps", "1", *TINY)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("is a file" if case == "a file" else "notes.txt") in result.stderr
    assert tree(tmp_path) == before


def test_each_checkpoint_command_reuses_its_own_folder(tiny_runs, tmp_path):
    for _ in range(2):
        result = run_cli("sample", "--checkpoint", str(tiny_runs["vaegan"]), "--num", "4", "--out", str(tmp_path / "s"))
        assert result.returncode == 0, result.stderr


def shown_default(action) -> str:
    """The default an option's --help shows: the text in its closing "(default: ...)"."""
    text = " ".join(action.help.split())
    assert text.endswith(")") and "(default: " in text, f"{action.option_strings} does not show its default"
    return text[text.rindex("(default: ") + len("(default: "):-1]


def parser_options(command):
    return {option: shown_default(action) for action in main.build_parser(command)._actions
            for option in action.option_strings if option.startswith("--") and option != "--help"}


def readme_rows(header):
    """Cells of the README table whose header row starts with `header`."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def test_the_readme_option_tables_list_every_option_with_its_default():
    training = {}
    for flags, default, _ in readme_rows("| option | default | what it sets |"):
        for option in flags.split("` / `"):
            training[option] = default
    assert training == parser_options("train")
    commands = {}
    for flags, names, default, _ in readme_rows("| option | commands | default | what it sets |"):
        for name in names.split(", "):
            commands[name, flags] = default
    expected = {(name, option): default for name in main.COMMANDS if name != "train"
                for option, default in parser_options(name).items()}
    assert commands == expected


def test_eval_every_measures_sample_quality_into_metrics_and_a_plot(tmp_path, writable_mnist_root):
    """A tiny real-MNIST run: FID and KID at every 100th step only, and the FID falls as it learns."""
    out = tmp_path / "run"
    result = run_cli("--data-root", str(writable_mnist_root), "--out", str(out), "--max-steps", "400",
                     "--eval-every", "100", "--seed", "1", *TINY)
    assert result.returncode == 0, result.stderr
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    measured = {int(r["step"]): float(r["fid[mnist-cnn]"]) for r in rows if r["fid[mnist-cnn]"] != "nan"}
    assert sorted(measured) == [100, 200, 300, 400]
    assert all(float(r["kid[mnist-cnn]"]) > 0 for r in rows if int(r["step"]) in measured)
    confident = {int(r["step"]): float(r["confident[mnist-cnn]"]) for r in rows if int(r["step"]) in measured}
    assert all(0 <= share <= 1 for share in confident.values())
    assert measured[400] < measured[100]
    with Image.open(out / "plots" / "sample_quality.png") as image:
        image.verify()


def test_eval_every_measures_without_changing_the_training(tmp_path, writable_mnist_root):
    runs = {every: tmp_path / f"every{every}" for every in (0, 2)}
    for every, out in runs.items():
        result = run_cli("--data-root", str(writable_mnist_root), "--out", str(out), "--max-steps", "4",
                         "--eval-every", str(every), *TINY)
        assert result.returncode == 0, result.stderr
    columns = {every: [(r["loss_llike"], r["loss_gan"]) for r in csv.DictReader(open(out / "metrics.csv"))]
               for every, out in runs.items()}
    assert columns[0] == columns[2]


def test_eval_every_needs_a_dataset_with_a_domain_classifier(tmp_path):
    write_images(tmp_path / "images", 40, size=(20, 20))
    result = run_cli("--dataset", "folder", "--data-root", str(tmp_path / "images"), "--eval-every", "10",
                     "--out", str(tmp_path / "run"), *TINY)
    assert result.returncode == 2 and "domain classifier" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_writes_its_evolution_gif_and_tensorboard_events(tmp_path, real_data):
    """--sample-every 2 over 5 steps: grids at steps 2, 4 and the epoch's end, each a GIF frame and a TensorBoard image."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    result = run_cli("--data-root", str(real_data), "--out", str(out), "--max-steps", "5", "--sample-every", "2",
                     "--tensorboard", *TINY)
    assert result.returncode == 0, result.stderr
    with Image.open(out / "samples" / "evolution.gif") as gif:
        assert gif.n_frames == 3
    events = event_accumulator.EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    with open(out / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert set(events.Tags()["scalars"]) == set(columns) - {"step"}
    assert [e.step for e in events.Scalars("loss_llike")] == [1, 2, 3, 4, 5]
    assert [e.step for e in events.Images("samples")] == [2, 4, 5]


def test_the_readme_is_at_most_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
