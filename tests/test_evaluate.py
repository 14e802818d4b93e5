import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from conftest import TINY, run_cli, write_images


def test_identical_feature_sets_are_at_distance_zero():
    torch.manual_seed(0)
    a = torch.randn(1200, 16)
    figures, shifted = evaluate.distances(a, a), evaluate.distances(a, a + 0.5)
    assert abs(figures["fid"]) < 1e-6 and shifted["fid"] > 3
    # KID compares random subsets, which share most samples here: near zero, against about 1 for the shift
    assert abs(figures["kid"]) < 0.02 * shifted["kid"]
    assert figures["precision"] == figures["recall"] == 1.0


def test_shifted_gaussians_give_the_closed_form_fid():
    """Two Gaussians with the same covariance: FID = squared distance of the means (here 16 x 0.5^2 = 4)."""
    torch.manual_seed(0)
    a = torch.randn(5000, 16, dtype=torch.float64)
    b = a + 0.5  # the same samples shifted: equal covariances exactly
    figures = evaluate.distances(a, b)
    assert figures["fid"] == pytest.approx(4.0, rel=1e-6)
    assert figures["kid"] > 10 * max(figures["kid_std"], 1e-6)  # and KID sees the shift clearly
    far = evaluate.distances(a, a + 5.0)
    assert far["precision"] < 0.05 and far["recall"] < 0.05  # no sample near the other set


def test_precision_and_recall_tell_a_collapsed_generator_from_a_good_one():
    torch.manual_seed(0)
    real = torch.randn(2000, 8)
    collapsed = torch.randn(2000, 8) * 0.05  # every sample near the centre: precise, little recall
    figures = evaluate.distances(real, collapsed)
    assert figures["precision"] > 0.9 and figures["recall"] < 0.2


def test_classifier_shapes_and_any_input_size():
    model = evaluate.DomainClassifier().eval()
    predicted, features = evaluate.classify(model, torch.rand(7, 1, 32, 32) * 2 - 1)
    assert predicted.shape == (7,) and features.shape == (7, 128)
    predicted, features = evaluate.classify(model, torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8))
    assert features.shape == (3, 128)


def write_random_inception_weights(path, monkeypatch):
    """A state dict of the FID Inception's architecture with random weights, made without downloading."""
    from torch_fidelity import feature_extractor_inceptionv3 as module
    with monkeypatch.context() as patch:
        patch.setattr(module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        torch.manual_seed(0)
        network = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), path)


def test_inception_weights_file_is_loaded_and_gives_fid_inception(tiny_runs, tmp_path, writable_mnist_root, monkeypatch):
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    write_random_inception_weights(weights, monkeypatch)
    result = run_cli("evaluate", "--checkpoint", str(tiny_runs["vaegan"]), "--num", "40", "--data-root",
                     str(writable_mnist_root), "--inception-weights", str(weights), "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["fid[inception]"] > 0 and "kid[inception]" in report and "precision[inception]" in report
    assert str(weights) in report["feature_networks"]["inception"]
    assert not any("inception" in note for note in report["notes"])


def test_without_inception_weights_one_line_says_where_to_put_them(tiny_runs, tmp_path, writable_mnist_root):
    result = run_cli("evaluate", "--checkpoint", str(tiny_runs["vaegan"]), "--num", "40", "--data-root",
                     str(writable_mnist_root), "--out", str(tmp_path / "eval"), env={"TORCH_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "fid[inception] skipped" in line]
    assert len(lines) == 1 and "pt_inception-2015-12-05-6726825d.pth" in lines[0] and str(tmp_path) in lines[0]


@pytest.mark.parametrize("case, words", [("missing", "is not a file"), ("not weights", "is not the FID Inception")])
def test_a_bad_inception_weights_path_is_refused_before_any_work(tiny_runs, tmp_path, case, words):
    weights = tmp_path / "weights.pth"
    if case == "not weights":
        weights.write_bytes(b"not a state dict")
    result = run_cli("evaluate", "--checkpoint", str(tiny_runs["vaegan"]), "--inception-weights", str(weights),
                     "--out", str(tmp_path / "eval"))
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "eval").exists()


def test_evaluate_prints_a_table_and_writes_json(tiny_runs, tmp_path, writable_mnist_root):
    result = run_cli("evaluate", "--checkpoint", str(tiny_runs["vaegan"]), "--num", "200", "--data-root",
                     str(writable_mnist_root), "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["samples"] == 200 and report["model"] == "vaegan" and report["pixel_mse"] > 0 and report["kl"] >= 0
    assert report["classifier_test_accuracy[mnist-cnn]"] >= 0.99
    assert report["fid[mnist-cnn]"] > 0 and report["kid[mnist-cnn]"] > 0 and 0 <= report["recon_accuracy[mnist-cnn]"] <= 1
    assert 0 <= report["precision[mnist-cnn]"] <= 1 and 0 <= report["recall[mnist-cnn]"] <= 1
    assert 0 <= report["confident[mnist-cnn]"] <= 1 and report["confident_heldout[mnist-cnn]"] >= 0.9
    assert "mnist-cnn" in report["feature_networks"] and report["sampling_batchnorm"].startswith("batch statistics")
    assert "200" in report["reference"] and "uint8" in report["images"]
    assert report["decoder_weights"] == "the moving average of its weights (decay 0.999)"  # the cpu preset's
    assert "fid[mnist-cnn]" in result.stdout


def test_classifier_fid_is_near_zero_for_identical_sets_and_large_for_different_ones(writable_mnist_root):
    classifier, accuracy = evaluate.cached_classifier("mnist", writable_mnist_root)
    splits = evaluate.data.load_dataset("mnist", writable_mnist_root, 28)
    ones = evaluate.data.uint8_to_model(splits.heldout.images[splits.heldout.labels == 1][:300])
    zeros = evaluate.data.uint8_to_model(splits.heldout.images[splits.heldout.labels == 0][:300])
    _, a = evaluate.classify(classifier, ones)
    _, b = evaluate.classify(classifier, zeros)
    assert abs(evaluate.distances(a, a)["fid"]) < 1e-3
    assert evaluate.distances(a, b)["fid"] > 100 * max(1.0, evaluate.distances(a[:150], a[150:])["fid"])


def test_confident_share_counts_class_probabilities_of_at_least_0_9():
    logits = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])  # 0.987, 0.333, 0.787
    assert evaluate.confident_share(logits) == pytest.approx(1 / 3)
    assert evaluate.confident_share(logits.bfloat16()) == pytest.approx(1 / 3)


def test_confident_share_is_high_for_digits_and_low_for_blends_and_noise(writable_mnist_root):
    classifier, _ = evaluate.cached_classifier("mnist", writable_mnist_root)
    heldout = evaluate.data.load_dataset("mnist", writable_mnist_root, 28).heldout
    images, labels = heldout.images[:2000], heldout.labels[:2000]
    differ = labels[:1000] != labels[1000:]
    blends = ((images[:1000][differ].float() + images[1000:][differ].float()) / 2).to(torch.uint8)
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    share = {name: evaluate.confident_share(evaluate.outputs(classifier, batch)[0])
             for name, batch in (("digits", images), ("blends", blends), ("noise", noise))}
    assert share["digits"] >= 0.9 and share["blends"] < share["digits"] - 0.3 and share["noise"] < 0.3, share


def test_evaluate_rejects_a_count_too_small_for_fid(tiny_runs):
    result = run_cli("evaluate", "--checkpoint", str(tiny_runs["gan"]), "--num", "1")
    assert result.returncode == 2 and "at least 2" in result.stderr and "Traceback" not in result.stderr


def test_conditional_mnist_samples_carry_their_labels(tmp_path, writable_mnist_root):
    """A short conditional VAE on real MNIST: the classifier gives its samples back their labels far
    more often than chance (10%), and train-on-generated, test-on-real stands beside real training."""
    run = tmp_path / "run"
    result = run_cli("--model", "vae", "--conditional", "--data-root", str(writable_mnist_root), "--out", str(run),
                     "--max-steps", "400", *TINY[:-1], "32")
    assert result.returncode == 0, result.stderr
    result = run_cli("evaluate", "--checkpoint", str(run), "--num", "500", "--tstr-num", "2000",
                     "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["conditional"] is True and report["label_accuracy[mnist-cnn]"] > 0.4
    assert report["real_label_accuracy[mnist-cnn]"] > 0.95 and "label_accuracy[mnist-cnn]" in result.stdout
    assert report["tstr_images"] == 2000 and report["tstr_accuracy[trained_on_real]"] > 0.6
    assert 0.1 < report["tstr_accuracy[trained_on_generated]"] <= 1


CELEBA_ATTRIBUTES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
                     "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
                     "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
                     "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
                     "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie "
                     "Young").split()


def write_tiny_celeba(root, train=36, test=12):
    """CelebA's layout under root/celeba: aligned 178x218 JPEGs, the split list and the attribute list."""
    folder = root / "celeba"
    names = [path.name for path in write_images(folder / "img_align_celeba", train + test, size=(178, 218),
                                                suffix=".jpg")]
    rng = np.random.default_rng(0)
    rows = [f"{name} " + " ".join(rng.choice(["-1", "1"], len(CELEBA_ATTRIBUTES))) for name in names]
    (folder / "list_attr_celeba.txt").write_text("\n".join([str(len(names)), " ".join(CELEBA_ATTRIBUTES), *rows]) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(f"{n} {0 if i < train else 2}" for i, n in enumerate(names)))
    return root


def test_conditional_celeba_attributes_end_to_end(tmp_path):
    root = write_tiny_celeba(tmp_path / "data")
    run = tmp_path / "run"
    result = run_cli("--dataset", "celeba", "--data-root", str(root), "--conditional", "--out", str(run),
                     "--max-steps", "2", "--num-workers", "0", *TINY)
    assert result.returncode == 0, result.stderr
    with Image.open(run / "samples" / "epoch_001.png") as grid:  # 8 held-out attribute vectors, 8 codes each
        assert grid.size == (8 * 18 + 2, 8 * 18 + 2)
    result = run_cli("sample", "--checkpoint", str(run), "--attributes", "Smiling=1,Male=0", "--num", "6",
                     "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    labels = np.load(tmp_path / "s" / "samples.npz")["labels"]
    assert labels.shape == (6, 40) and set(labels[:, CELEBA_ATTRIBUTES.index("Smiling")]) == {1.0}
    assert set(labels[:, CELEBA_ATTRIBUTES.index("Male")]) == {-1.0}
    result = run_cli("sample", "--checkpoint", str(run), "--attributes", "Smiling=2")
    assert result.returncode == 2 and "NAME=1 or NAME=0" in result.stderr
    result = run_cli("evaluate", "--checkpoint", str(run), "--num", "12", "--tstr-num", "36",
                     "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    for prefix in ("label", "real_label"):
        assert -1 <= report[f"{prefix}_cosine[celeba-cnn]"] <= 1 and 0 <= report[f"{prefix}_mse[celeba-cnn]"] <= 4
        assert 0 <= report[f"{prefix}_accuracy[celeba-cnn]"] <= 1
    assert 0 <= report["tstr_accuracy[trained_on_generated]"] <= 1 and report["tstr_real_images"] == 36
    assert (root / "classifiers" / "celeba-cnn.pt").exists()  # the attribute network, cached
