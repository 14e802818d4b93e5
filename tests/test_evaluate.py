import torch

import evaluate


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
