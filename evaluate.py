"""Offline figures for a trained model, scored by a small MNIST-style digit classifier.

The classifier (a two-layer CNN on 28x28 images) is trained once on the training split
and cached under the data root. Its 128-d penultimate features give a classifier-feature
FID between generated and held-out images ("cnn-FID", never to be mistaken for the
Inception FID), and its predictions say whether a reconstruction keeps the digit.

    python3 evaluate.py RUN_DIR [--samples 2000]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import main

CLASSIFIER_SIZE = 28  # the classifier sees every image at MNIST's own resolution


class DigitClassifier(nn.Module):
    """(N, 1, 28, 28) in [-1, 1] -> (logits (N, 10), features (N, 128))."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.head(h), h


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 2, seed: int = 0) -> DigitClassifier:
    """Adam, batch 128, on uint8 (N, 1, 28, 28) images."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for indices in torch.randperm(len(images)).split(128):
            logits, _ = model(data.to_unit_range(images[indices]))
            loss = F.cross_entropy(logits, labels[indices].long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [-1, 1] of any size -> (predicted labels, features)."""
    preds, feats = [], []
    for chunk in images.split(batch):
        logits, h = model(data.resize(chunk.float().cpu(), CLASSIFIER_SIZE))
        preds.append(logits.argmax(1))
        feats.append(h)
    return torch.cat(preds), torch.cat(feats)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (float64)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^(1/2)) = sum of sqrt of eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * middle)


def cached_classifier(root: Path) -> tuple[DigitClassifier, float]:
    """The MNIST classifier under <root>/classifiers, trained on first use; with its test accuracy."""
    path = root / "classifiers" / "mnist-cnn.pt"
    splits = data.load_dataset("mnist", root, CLASSIFIER_SIZE)
    if path.exists():
        model = DigitClassifier()
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
    else:
        print(f"training the MNIST classifier once (cached in {path}) ...", flush=True)
        model = train_classifier(splits.train.images, splits.train.labels)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    predicted, _ = classify(model, data.to_unit_range(splits.heldout.images))
    return model, float((predicted == splits.heldout.labels).float().mean())


@torch.no_grad()
def evaluate_run(run_dir: Path, samples: int, root: Path) -> dict[str, float]:
    """cnn-FID of prior samples (BatchNorm with batch and with running statistics) and recon accuracy."""
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = main.TrainConfig(**state["config"])
    nets = main.build_networks(cfg.model())
    for name, module in nets.modules().items():
        module.load_state_dict(state[name])
    classifier, accuracy = cached_classifier(root)
    test = data.load_dataset("mnist", root, cfg.image_size).heldout
    test_images = data.resize(data.to_unit_range(test.images[:samples]), cfg.image_size)
    _, real_feats = classify(classifier, test_images)
    generator = torch.Generator().manual_seed(1234)
    z = torch.randn(samples, cfg.latent_dim, generator=generator)
    batch_stats = torch.cat([main.decode_with_batch_statistics(nets.decoder, c) for c in z.split(64)])
    nets.decoder.eval()
    running_stats = torch.cat([nets.decoder(c) for c in z.split(64)])
    recon = torch.cat([main.reconstruct(nets, c) for c in test_images.split(64)])
    predicted, _ = classify(classifier, recon)
    half = len(test_images) // 2
    return {
        "classifier_test_accuracy": accuracy,
        "cnn_fid_samples_batch_stats": frechet_distance(classify(classifier, batch_stats)[1], real_feats),
        "cnn_fid_samples_running_stats": frechet_distance(classify(classifier, running_stats)[1], real_feats),
        "cnn_fid_real_vs_real": frechet_distance(real_feats[:half], real_feats[half:]),
        "recon_keeps_digit": float((predicted == test.labels[:samples]).float().mean()),
        "recon_pixel_mse": float((recon - test_images).pow(2).mean()),
        "steps": state["step"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--data-root", type=Path, default=Path("./data"))
    args = parser.parse_args()
    results = evaluate_run(args.run_dir, args.samples, args.data_root)
    print(" | ".join(f"{k} {v:.4g}" for k, v in results.items()))
    sys.exit(0)
