"""Offline figures for a trained checkpoint (`main.py evaluate`).

For MNIST and Fashion-MNIST a small domain classifier (four convolutions on 28x28 images)
is trained once on the training split and cached under the data root. Its 128-d
penultimate features give a classifier-feature FID between prior samples and held-out
images, and its predictions say whether a reconstruction keeps the class; both carry the
classifier's name ("mnist-cnn") so they are never mistaken for the Inception FID, which
is computed too when torchvision's Inception-v3 weights are on the machine.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import data
import latent
import losses
import utils

CLASSIFIER_SIZE = 28  # the classifier sees every image at MNIST's own resolution


class DigitClassifier(nn.Module):
    """(N, 1, 28, 28) in [-1, 1] -> (logits (N, 10), features (N, 128))."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                                # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                                # 7x7
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.head(h), h


@torch.enable_grad()  # also when called from a no_grad evaluation
def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3, seed: int = 0) -> DigitClassifier:
    """Adam, batch 128, learning rate 1e-3 cut to 0.3x after each epoch, on uint8 (N, 1, 28, 28) images."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.3)
    for _ in range(epochs):
        for indices in torch.randperm(len(images)).split(128):
            logits, _ = model(data.uint8_to_model(images[indices]))
            loss = F.cross_entropy(logits, labels[indices].long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
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


CLASSIFIER_DATASETS = ("mnist", "fashion-mnist")  # datasets with a domain classifier
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's ImageNet Inception-v3 weights
INCEPTION_URL = f"https://download.pytorch.org/models/{INCEPTION_FILE}"


def cached_classifier(dataset: str, root: Path) -> tuple[DigitClassifier, float]:
    """The dataset's classifier under <root>/classifiers, trained on first use; with its test accuracy."""
    path = root / "classifiers" / f"{dataset}-cnn.pt"
    splits = data.load_dataset(dataset, root, CLASSIFIER_SIZE)
    model = DigitClassifier()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
    else:
        print(f"training the {dataset} classifier once (cached in {path}) ...", flush=True)
        model = train_classifier(splits.train.images, splits.train.labels)
        try:
            utils.write_atomic(path, lambda tmp: torch.save(model.state_dict(), tmp))
        except OSError as error:
            print(f"note: could not cache the classifier in {path} ({error.strerror}); it is retrained next time")
    predicted, _ = classify(model, data.uint8_to_model(splits.heldout.images))
    return model, float((predicted == splits.heldout.labels).float().mean())


def inception_features() -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """A function images -> 2048-d Inception-v3 pool features, if the weights are on this machine."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        return None, (f"Inception FID skipped: the Inception-v3 weights are not on this machine and are not "
                      f"downloaded here. Put {INCEPTION_URL} at {path} to get it.")
    import torchvision
    network = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    network.load_state_dict(torch.load(path, weights_only=True))
    network.fc = nn.Identity()
    network.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in images.split(50):
            x = chunk.float().cpu().add(1).div(2).expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(network((x - mean) / std))
        return torch.cat(out)

    return features, f"Inception FID uses torchvision's ImageNet Inception-v3 ({path})"


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str | Path, num: int, data_root: str | None, device: torch.device,
                        seed: int = 0) -> dict:
    """Every figure the checkpoint's model and dataset allow, with how many images each used."""
    cfg, nets, step = utils.load_run(checkpoint, device)
    root = Path(data_root or cfg.data_root).expanduser()
    heldout, labels = latent.heldout_batch(latent.heldout_split(cfg, str(root)), num, cfg, device)
    z = torch.randn(len(heldout), cfg.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    samples = latent.decode(nets, z)
    results: dict = {"checkpoint": str(utils.checkpoint_path(checkpoint)), "model": cfg.model,
                     "dataset": cfg.dataset, "step": step, "images": len(heldout), "notes": []}
    recon = None
    if nets.encoder is not None:
        posterior = [nets.encoder(chunk) for chunk in heldout.split(256)]
        mean, logvar = (torch.cat(parts) for parts in zip(*posterior))
        recon = torch.cat([nets.decoder(chunk) for chunk in mean.split(256)])
        results["pixel_mse"] = float((recon - heldout).pow(2).mean())
        results["kl"] = float(losses.kl_divergence(mean, logvar))
    if cfg.dataset in CLASSIFIER_DATASETS:
        classifier, accuracy = cached_classifier(cfg.dataset, root)
        name = f"{cfg.dataset}-cnn"
        _, real_feats = classify(classifier, heldout)
        _, sample_feats = classify(classifier, samples)
        results[f"classifier_test_accuracy[{name}]"] = accuracy
        results[f"sample_fid[{name}]"] = frechet_distance(sample_feats, real_feats)
        if recon is not None:
            predicted, _ = classify(classifier, recon)
            results[f"recon_accuracy[{name}]"] = float((predicted == labels.to(predicted.device)).float().mean())
    features, note = inception_features()
    results["notes"].append(note)
    if features is not None:
        results["sample_fid[inception]"] = frechet_distance(features(samples), features(heldout))
    return results


def format_table(results: dict) -> str:
    rows = [(k, v) for k, v in results.items() if k != "notes"]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines + [f"note: {n}" for n in results["notes"]])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_checkpoint_arguments(parser)
    parser.add_argument("--num", type=config.count(2), default=2000,
                        help=config.with_default("held-out images and prior samples to use", 2000))


def evaluate_command(args: argparse.Namespace) -> list[Path]:
    """main.py evaluate: print the table and write it as evaluation.json."""
    device = config.resolve_device(args.device)
    checkpoint = utils.checkpoint_path(args.checkpoint)
    out = config.output_folder(args.out, checkpoint, "evaluate", ("evaluation.json",))
    results = evaluate_checkpoint(checkpoint, args.num, args.data_root, device, args.seed)
    print(format_table(results))
    utils.write_json(results, out / "evaluation.json")
    return [out / "evaluation.json"]
