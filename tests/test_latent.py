"""The latent-space commands and evaluate, on a tiny checkpoint made here."""

import numpy as np
import pytest
import torch
from PIL import Image

import config
import latent
import models
import utils
from conftest import TINY, run_cli, write_images


@pytest.fixture
def runs(tiny_runs):
    return tiny_runs


command = run_cli


def png_size(path):
    with Image.open(path) as image:
        return image.size


def test_sample_writes_a_grid_an_npz_and_individual_pngs(runs, tmp_path):
    result = command("sample", "--checkpoint", str(runs["gan"]), "--num", "10", "--individual", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'samples.png'}" in result.stdout
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (10, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert len(list((tmp_path / "individual").glob("*.png"))) == 10
    assert png_size(tmp_path / "individual" / "sample_00000.png") == (16, 16)  # the image itself, no border


def test_reconstruct_held_out_images_and_given_files(runs, tmp_path):
    result = command("reconstruct", "--checkpoint", str(runs["vaegan"]), "--num", "12", "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    arrays = np.load(tmp_path / "a" / "reconstructions.npz")
    assert arrays["originals"].shape == arrays["reconstructions"].shape == (12, 1, 16, 16)
    assert arrays["labels"].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6]  # MNIST's first test labels
    files = write_images(tmp_path / "mine", 3, mode="L")
    (tmp_path / "mine" / "broken.png").write_bytes(b"no")
    result = command("reconstruct", "--checkpoint", str(runs["vaegan"]), "--images", str(tmp_path / "mine"),
                     str(files[0]), "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable" in result.stdout
    assert np.load(tmp_path / "b" / "reconstructions.npz")["originals"].shape[0] == 4


def test_interpolate_rows_walk_between_the_endpoints(runs, tmp_path):
    result = command("interpolate", "--checkpoint", str(runs["vaegan"]), "--pairs", "3", "--steps", "5",
                     "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "interpolation.png") == (5 * 18 + 2, 3 * 18 + 2)
    result = command("interpolate", "--checkpoint", str(runs["gan"]), "--prior", "--pairs", "2", "--steps", "4",
                     "--out", str(tmp_path / "prior"))
    assert result.returncode == 0, result.stderr


def test_interpolation_endpoints_are_the_codes():
    nets = models.build_networks(models.NetworkConfig(image_size=16, width=0.125, latent_dim=8))
    captured = []
    original = latent.decode_each
    latent.decode_each = lambda nets, z, y=None: (captured.append(z), original(nets, z, y))[1]
    try:
        start, end = torch.zeros(2, 8), torch.ones(2, 8)
        latent.write_interpolation(nets, start, end, 3, __import__("pathlib").Path("/tmp/vaegan-test-interp"))
    finally:
        latent.decode_each = original
    rows = captured[0].view(2, 3, 8)
    assert torch.equal(rows[:, 0], start) and torch.equal(rows[:, 2], end) and torch.allclose(rows[:, 1], 0.5 * end)


def test_codes_of_images_are_decoded_each_on_its_own():
    """Interpolation and attribute columns: an image depends on its code alone, and a vector added to
    every code changes the images (batch statistics would normalise it away)."""
    nets = models.build_networks(models.NetworkConfig(image_size=16, width=0.125, latent_dim=8))
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    alone = torch.cat([latent.decode_each(nets, code[None]) for code in z])
    assert torch.allclose(latent.decode_each(nets, z), alone, atol=1e-5)
    assert (latent.decode_each(nets, z + 2.0) - latent.decode_each(nets, z)).abs().max() > 1e-2
    assert nets.decoder.training


def test_attribute_vector_is_the_difference_of_class_means():
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [20.0, 30.0], [30.0, 20.0]])
    has = torch.tensor([0, 0, 1, 1, 1])
    expected = torch.tensor([20.0, 20.0]) - torch.tensor([2.0, 1.0])
    assert torch.allclose(latent.attribute_vector(z, has), expected)
    with pytest.raises(config.UsageError, match="both with and without"):
        latent.attribute_vector(z, torch.ones(5))


def test_attributes_from_class_labels(runs, tmp_path):
    result = command("attributes", "--checkpoint", str(runs["vaegan"]), "--from", "3", "--to", "8",
                     "--num-labelled", "200", "--num-queries", "4", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "class_3_to_8.png") == (4 * 18 + 2, 4 * 18 + 2)  # columns: orig, recon, -v, +v


def test_attributes_from_a_csv_for_a_folder_dataset(tmp_path):
    files = write_images(tmp_path / "faces", 40, size=(20, 20))
    rows = ["filename,Smiling,Glasses"] + [f"{f.name},{i % 2},{int(i % 3 == 0)}" for i, f in enumerate(files)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert run_cli("--dataset", "folder", "--data-root", str(tmp_path / "faces"), "--out", str(run),
                   "--max-steps", "2", "--num-workers", "0", *TINY).returncode == 0
    result = command("attributes", "--checkpoint", str(run), "--labels", str(tmp_path / "labels.csv"),
                     "--num-queries", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "attribute_Smiling.png").exists() and (tmp_path / "out" / "attribute_Glasses.png").exists()
    result = command("attributes", "--checkpoint", str(run), "--labels", str(tmp_path / "labels.csv"),
                     "--attribute", "Hat")
    assert result.returncode == 2 and "unknown attribute 'Hat'" in result.stderr and "Smiling" in result.stderr


def test_decoder_average_or_last_weights(runs, tmp_path):
    """The cpu preset keeps a moving average of the decoder; --decoder picks it (the default) or the
    last step's weights, and a run without an average has only those."""
    grids = {}
    for choice in ("average", "last"):
        result = command("sample", "--checkpoint", str(runs["vaegan"]), "--num", "8", "--decoder", choice,
                         "--out", str(tmp_path / choice))
        assert result.returncode == 0, result.stderr
        grids[choice] = np.load(tmp_path / choice / "samples.npz")["images"]
    assert not np.array_equal(grids["average"], grids["last"])
    result = command("sample", "--checkpoint", str(runs["vaegan"]), "--num", "8", "--out", str(tmp_path / "default"))
    assert np.array_equal(np.load(tmp_path / "default" / "samples.npz")["images"], grids["average"])
    _, nets, _, _ = utils.load_run(runs["vaegan"], torch.device("cpu"), "last")
    state = torch.load(runs["vaegan"] / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(v, state["decoder"][k]) for k, v in nets.decoder.state_dict().items())
    state["config"]["ema_decay"] = 0.0  # as a run without an average
    del state["decoder_average"]
    torch.save(state, tmp_path / "no-average.pt")
    _, plain, _, _ = utils.load_run(tmp_path / "no-average.pt", torch.device("cpu"), "average")
    assert all(torch.equal(v, state["decoder"][k]) for k, v in plain.decoder.state_dict().items())
    assert "the run kept no average" in utils.decoder_weights(config.TrainConfig(), "average")


def test_a_checkpoint_with_a_damaged_average_is_a_clear_error(runs, tmp_path):
    state = torch.load(runs["vaegan"] / "checkpoint.pt", weights_only=True)
    del state["decoder_average"]
    torch.save(state, tmp_path / "damaged.pt")
    result = command("sample", "--checkpoint", str(tmp_path / "damaged.pt"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "holds no decoder_average" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    result = command("sample", "--checkpoint", str(tmp_path / "damaged.pt"), "--decoder", "last",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr  # the last step's weights are still there


@pytest.mark.parametrize("args, words", [
    (["sample", "--checkpoint", "/nonexistent/run"], "there is no checkpoint"),
    (["reconstruct", "--checkpoint", "{gan}"], "needs an encoder"),
    (["interpolate", "--checkpoint", "{gan}"], "needs an encoder"),
    (["attributes", "--checkpoint", "{vaegan}"], "--from A --to B"),
    (["attributes", "--checkpoint", "{vaegan}", "--from", "3", "--to", "12"], "--to 12 is not a class"),
    (["reconstruct", "--checkpoint", "{vaegan}", "--images", "/nonexistent.png"], "does not exist"),
    (["sample", "--checkpoint", "{gan}", "--num", "0"], "argument --num: 0 must be at least 1"),
    (["evaluate", "--checkpoint", "{gan}", "--num", "1"], "at least 2"),
])
def test_commands_reject_bad_input_clearly(runs, args, words):
    args = [a.format(**{k: str(v) for k, v in runs.items()}) for a in args]
    result = command(*args)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def test_unreadable_images_are_a_clear_error(runs, tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    result = command("reconstruct", "--checkpoint", str(runs["vaegan"]), "--images", str(tmp_path / "a.png"))
    assert result.returncode == 2 and "could be read as an image" in result.stderr and "Traceback" not in result.stderr


def test_conditional_commands_draw_the_labels_asked_for(tiny_conditional_run, tmp_path):
    run = str(tiny_conditional_run)
    with Image.open(tiny_conditional_run / "samples" / "epoch_001.png") as grid:
        assert grid.size == (8 * 18 + 2, 10 * 18 + 2)  # one row per class, 8 columns
    result = command("sample", "--checkpoint", run, "--label", "7", "--num", "5", "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "s" / "samples.npz")["labels"].argmax(1).tolist() == [7] * 5
    result = command("sample", "--checkpoint", run, "--num", "4", "--out", str(tmp_path / "h"))
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "h" / "samples.npz")["labels"].argmax(1).tolist() == [7, 2, 1, 0]  # held-out labels
    for args in (["reconstruct", "--num", "6", "--label", "3"], ["reconstruct", "--num", "6"],
                 ["interpolate", "--pairs", "2", "--steps", "3"], ["interpolate", "--prior", "--label", "1"]):
        result = command(*args, "--checkpoint", run, "--out", str(tmp_path / "-".join(args)))
        assert result.returncode == 0, result.stderr
    mine = write_images(tmp_path / "mine", 2, mode="L")
    result = command("reconstruct", "--checkpoint", run, "--images", str(mine[0]), "--label", "4",
                     "--out", str(tmp_path / "files"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, words", [
    (["sample", "--checkpoint", "{vaegan}", "--label", "3"], "trained without --conditional"),
    (["reconstruct", "--checkpoint", "{vaegan}", "--label", "3"], "trained without --conditional"),
    (["interpolate", "--checkpoint", "{gan}", "--prior", "--attributes", "Smiling=1"], "trained without --conditional"),
    (["attributes", "--checkpoint", "{conditional}", "--from", "3", "--to", "8"], "is conditional"),
    (["sample", "--checkpoint", "{conditional}", "--attributes", "Smiling=1"], "conditioned on classes; use --label"),
    (["sample", "--checkpoint", "{conditional}", "--label", "10"], "is not a class"),
    (["reconstruct", "--checkpoint", "{conditional}", "--images", "{vaegan}"], "image files have no labels"),
])
def test_conditional_questions_of_the_wrong_checkpoint_are_refused_before_any_work(runs, tiny_conditional_run,
                                                                                   tmp_path, args, words):
    paths = {**{k: str(v) for k, v in runs.items()}, "conditional": str(tiny_conditional_run)}
    result = command(*[a.format(**paths) for a in args], "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_conditional_folder_needs_class_sub_folders(tmp_path):
    write_images(tmp_path / "flat", 24, size=(20, 20))
    write_images(tmp_path / "one" / "cats", 24, size=(20, 20))
    for folder, words in (("flat", "0 class sub-folder(s)"), ("one", "1 class sub-folder(s) (cats)")):
        result = run_cli("--dataset", "folder", "--data-root", str(tmp_path / folder), "--conditional",
                         "--out", str(tmp_path / "run"), "--num-workers", "0", *TINY)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists()
