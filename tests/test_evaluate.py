import json

import torch

import evaluate
from conftest import run_cli


def test_frechet_distance_is_zero_for_identical_sets_and_large_for_different_ones():
    torch.manual_seed(0)
    a = torch.randn(500, 16)
    assert abs(evaluate.frechet_distance(a, a)) < 1e-6
    shifted = evaluate.frechet_distance(a, a + 3.0)  # mean shift of 3 in 16 dims: 16 * 9 = 144
    assert abs(shifted - 144.0) < 1e-3
    scaled = evaluate.frechet_distance(a, 2 * a)  # variances x4: each dim adds (1 - 2)^2 * var
    assert 10 < scaled < 25


def test_classifier_shapes_and_any_input_size():
    model = evaluate.DigitClassifier().eval()
    predicted, features = evaluate.classify(model, torch.rand(7, 1, 32, 32) * 2 - 1)
    assert predicted.shape == (7,) and features.shape == (7, 128)


def test_evaluate_prints_a_table_and_writes_json(tiny_runs, tmp_path, writable_mnist_root):
    result = run_cli("evaluate", "--checkpoint", str(tiny_runs["vaegan"]), "--num", "200", "--data-root",
                     str(writable_mnist_root), "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["images"] == 200 and report["model"] == "vaegan" and report["pixel_mse"] > 0 and report["kl"] >= 0
    assert report["classifier_test_accuracy[mnist-cnn]"] >= 0.99
    assert report["sample_fid[mnist-cnn]"] > 0 and 0 <= report["recon_accuracy[mnist-cnn]"] <= 1
    assert "sample_fid[mnist-cnn]" in result.stdout and any("Inception" in n for n in report["notes"])


def test_classifier_fid_is_near_zero_for_identical_sets_and_large_for_different_ones(writable_mnist_root):
    classifier, accuracy = evaluate.cached_classifier("mnist", writable_mnist_root)
    splits = evaluate.data.load_dataset("mnist", writable_mnist_root, 28)
    ones = evaluate.data.uint8_to_model(splits.heldout.images[splits.heldout.labels == 1][:300])
    zeros = evaluate.data.uint8_to_model(splits.heldout.images[splits.heldout.labels == 0][:300])
    _, a = evaluate.classify(classifier, ones)
    _, b = evaluate.classify(classifier, zeros)
    assert abs(evaluate.frechet_distance(a, a)) < 1e-3
    assert evaluate.frechet_distance(a, b) > 100 * max(1.0, abs(evaluate.frechet_distance(a[:150], a[150:])))


def test_evaluate_rejects_a_count_too_small_for_fid(tiny_runs):
    result = run_cli("evaluate", "--checkpoint", str(tiny_runs["gan"]), "--num", "1")
    assert result.returncode == 2 and "at least 2" in result.stderr and "Traceback" not in result.stderr
