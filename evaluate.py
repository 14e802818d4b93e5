"""Sample quality and reconstruction fidelity of a checkpoint (`main.py evaluate`), measured as the field does.

FID and KID come from torchmetrics (FrechetInceptionDistance, KernelInceptionDistance) and
precision and recall (k = 3 nearest neighbours) from torch-fidelity, on the features of images
quantised to uint8 first, as a tool that reads image files sees them. Two feature networks:

  * the domain classifier (MNIST, Fashion-MNIST): four convolutions on 28x28 images, trained
    once on the training split and cached under <data root>/classifiers; offline, always. Its
    figures carry its name: fid[mnist-cnn], kid[mnist-cnn], ...; its predictions also say how
    often a reconstruction keeps its class, recon_accuracy[mnist-cnn].
  * the Inception network of the FID literature (torch-fidelity's TensorFlow-compatible
    InceptionV3, with the weights file pytorch-fid and torch-fidelity use): fid[inception],
    comparable with papers, when --inception-weights names the file or it lies in torch's
    hub cache.

`SampleQuality` measures the domain figures during training (--eval-every).
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_prc import prc_features_to_metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

import config
import data
import latent
import losses
import models
import utils
from config import UsageError

CLASSIFIER_SIZE = 28  # the classifier sees every image at MNIST's own resolution
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILES[0]}"


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
    """uint8 images of any size, or float ones in [-1, 1] -> (predicted labels, features)."""
    preds, feats = [], []
    for chunk in images.split(batch):
        chunk = data.uint8_to_model(chunk) if chunk.dtype == torch.uint8 else chunk.float()
        logits, h = model(data.resize(chunk.cpu(), CLASSIFIER_SIZE))
        preds.append(logits.argmax(1))
        feats.append(h)
    return torch.cat(preds), torch.cat(feats)


def cached_classifier(dataset: str, root: Path) -> tuple[DigitClassifier, float]:
    """The dataset's classifier under <root>/classifiers, trained on first use; with its test accuracy."""
    path = root / "classifiers" / f"{dataset}-cnn.pt"
    splits = data.load_dataset(dataset, root, CLASSIFIER_SIZE, say=lambda note: None)  # its notes are said already
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
    predicted, _ = classify(model, splits.heldout.images)
    return model, float((predicted == splits.heldout.labels).float().mean())


class GivenFeatures(nn.Module):
    """The "feature network" torchmetrics runs on features that are already computed: the identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def distances(real: torch.Tensor, fake: torch.Tensor, precision_recall: bool = True) -> dict[str, float]:
    """FID, KID (mean and spread over subsets) and, if asked, precision and recall between two feature sets."""
    fid = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1]))
    with warnings.catch_warnings():  # "KID will save all extracted features in buffer": we know
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=GivenFeatures(real.shape[1]), subsets=50,
                                      subset_size=min(1000, len(real), len(fake)))
    for metric in (fid, kid):
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
    kid_mean, kid_std = kid.compute()
    figures = {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
    if precision_recall:
        prc = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=3, prc_batch_size=10000,
                                     save_cpu_ram=True, verbose=False)
        figures.update(precision=prc["precision"], recall=prc["recall"])
    return figures


def inception_weights(path: str | None) -> Path | None:
    """--inception-weights, else a copy in torch's hub cache, else None. UsageError for a path that is not a file."""
    if path is not None:
        given = Path(path).expanduser()
        if not given.is_file():
            raise UsageError(f"--inception-weights {given} is not a file; give the path of "
                             f"{INCEPTION_FILES[0]} (from {INCEPTION_URL}).")
        return given
    cached = [Path(torch.hub.get_dir()) / "checkpoints" / name for name in INCEPTION_FILES]
    return next((p for p in cached if p.is_file()), None)


def inception_network(path: Path) -> FeatureExtractorInceptionV3:
    """torch-fidelity's TF-compatible InceptionV3 giving the 2048-d pool features, with the weights at `path`."""
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as error:  # not a state dict, or one of another network: both unusable here
        raise UsageError(f"{path} is not the FID Inception weights file ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]}); use {INCEPTION_FILES[0]} from {INCEPTION_URL}.") from None


@torch.no_grad()
def inception_features(network: FeatureExtractorInceptionV3, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) images -> (N, 2048); grey images are given to it as three equal channels."""
    return torch.cat([network(chunk.expand(-1, 3, -1, -1).contiguous())[0] for chunk in images.cpu().split(50)])


@torch.no_grad()
def prior_samples(decoder: nn.Module, count: int, latent_dim: int, seed: int, batchnorm: str,
                  device: torch.device) -> torch.Tensor:
    """`count` prior samples as uint8 images, with BatchNorm's batch statistics (`batch`, as the
    training grids) or its running ones (`running`)."""
    z = torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    if batchnorm == "batch":
        images = [models.decode_with_batch_statistics(decoder, z)]
    else:
        mode = decoder.training
        decoder.eval()
        images = [decoder(chunk) for chunk in z.split(500)]
        decoder.train(mode)
    return data.model_to_uint8(torch.cat(images)).cpu()


class SampleQuality:
    """The domain figures of prior samples against `count` held-out images, for --eval-every."""

    def __init__(self, dataset: str, root: Path, heldout: data.Split, count: int, image_size: int):
        self.name = f"{dataset}-cnn"
        self.classifier, _ = cached_classifier(dataset, root)
        self.count = min(count, len(heldout))
        real = data.heldout_images(heldout, self.count, image_size)
        _, self.real = classify(self.classifier, data.model_to_uint8(real))

    def columns(self) -> list[str]:
        return [f"fid[{self.name}]", f"kid[{self.name}]"]

    def measure(self, decoder: nn.Module, latent_dim: int, device: torch.device) -> dict[str, float]:
        """FID and KID of `count` prior samples (fixed codes, batch statistics), in the networks' current state."""
        _, fake = classify(self.classifier, prior_samples(decoder, self.count, latent_dim, 0, "batch", device))
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets: training's random numbers stay as they were
            figures = distances(self.real, fake, precision_recall=False)
        return dict(zip(self.columns(), (figures["fid"], figures["kid"])))


@torch.no_grad()
def reconstruction_figures(nets: models.Networks, images: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Pixel MSE and KL of reconstructions Dec(mean of q(z|x)) (running statistics), and the reconstructions."""
    posterior = [nets.encoder(chunk) for chunk in images.split(256)]
    mean, logvar = (torch.cat(parts) for parts in zip(*posterior))
    recon = torch.cat([nets.decoder(chunk) for chunk in mean.split(256)])
    return {"pixel_mse": float((recon - images).pow(2).mean()), "kl": float(losses.kl_divergence(mean, logvar))}, recon


@torch.no_grad()
def evaluate_checkpoint(checkpoint: Path, num: int, data_root: str | None, device: torch.device, seed: int = 0,
                        inception: tuple[Path, FeatureExtractorInceptionV3] | None = None,
                        batchnorm: str = "batch") -> dict:
    """Every figure the checkpoint's model and dataset allow, with what each was measured on."""
    cfg, nets, step = utils.load_run(checkpoint, device)
    root = Path(data_root or cfg.data_root).expanduser()
    split = latent.heldout_split(cfg, str(root))
    notes = []
    if num > len(split):
        notes.append(f"--num {num} is more than the held-out split's {len(split):,} images; used {len(split):,}")
        num = len(split)
    heldout, labels = latent.heldout_batch(split, num, cfg, device)
    real, fake = data.model_to_uint8(heldout).cpu(), prior_samples(nets.decoder, num, cfg.latent_dim, seed,
                                                                     batchnorm, device)
    results: dict = {"checkpoint": str(checkpoint), "model": cfg.model, "dataset": cfg.dataset, "step": step,
                     "samples": num, "reference": f"the first {num:,} images of the held-out split",
                     "sampling_batchnorm": {"batch": f"batch statistics, {models.SAMPLE_BATCH} samples a batch",
                                            "running": "running statistics"}[batchnorm],
                     "images": "quantised to uint8 before features are taken", "feature_networks": {}}
    recon = None
    if nets.encoder is not None:
        figures, recon = reconstruction_figures(nets, heldout)
        results.update(figures)
    if data.DATASETS[cfg.dataset].domain_classifier:
        results.update(domain_figures(cfg.dataset, root, real, fake, recon, labels, results["feature_networks"]))
    if inception is None:
        notes.append(f"fid[inception] skipped: no Inception weights; put {INCEPTION_FILES[0]} (from {INCEPTION_URL}) "
                     f"in {Path(torch.hub.get_dir()) / 'checkpoints'} or pass --inception-weights PATH")
    else:
        path, network = inception
        figures = distances(inception_features(network, real), inception_features(network, fake))
        results.update({f"{name}[inception]": value for name, value in figures.items()})
        results["feature_networks"]["inception"] = f"torch-fidelity's TF-compatible InceptionV3, pool features, {path}"
    results["notes"] = notes
    return results


def domain_figures(dataset: str, root: Path, real: torch.Tensor, fake: torch.Tensor, recon: torch.Tensor | None,
                   labels: torch.Tensor | None, networks: dict) -> dict[str, float]:
    """The domain classifier's figures: sample distances and how often a reconstruction keeps its class."""
    classifier, accuracy = cached_classifier(dataset, root)
    name = f"{dataset}-cnn"
    networks[name] = f"the {dataset} classifier's 128 penultimate features (test accuracy {accuracy:.2%})"
    (_, real_features), (_, fake_features) = classify(classifier, real), classify(classifier, fake)
    figures = {f"{key}[{name}]": value for key, value in distances(real_features, fake_features).items()}
    figures[f"classifier_test_accuracy[{name}]"] = accuracy
    if recon is not None:
        predicted, _ = classify(classifier, data.model_to_uint8(recon))
        figures[f"recon_accuracy[{name}]"] = float((predicted == labels.to(predicted.device)).float().mean())
    return figures


def format_table(results: dict) -> str:
    rows = [(k, v) for k, v in results.items() if k not in ("notes", "feature_networks")]
    rows += [(f"feature network {k}", v) for k, v in results["feature_networks"].items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines + [f"note: {n}" for n in results["notes"]])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_checkpoint_arguments(parser)
    parser.add_argument("--num", type=config.count(2), default=10000,
                        help=config.with_default("prior samples, and held-out images they are compared with", 10000))
    parser.add_argument("--inception-weights", metavar="FILE", help=config.with_default(
        f"{INCEPTION_FILES[0]}, for fid[inception]", "torch's hub cache, if there"))
    parser.add_argument("--sample-batchnorm", choices=("batch", "running"), default="batch", help=config.with_default(
        "BatchNorm statistics the prior samples are decoded with: each batch's own (as the grids) or the running ones",
        "batch"))


def evaluate_command(args: argparse.Namespace) -> list[Path]:
    """main.py evaluate: print the table and write it as evaluation.json."""
    device = config.resolve_device(args.device)
    checkpoint = utils.checkpoint_path(args.checkpoint)
    out = config.output_folder(args.out, checkpoint, "evaluate", ("evaluation.json",))
    config.check_data_root(args.data_root)
    weights = inception_weights(args.inception_weights)
    inception = (weights, inception_network(weights)) if weights is not None else None  # a bad file stops it here
    utils.load_checkpoint(checkpoint)  # so does a bad checkpoint, before the classifier or the features
    results = evaluate_checkpoint(checkpoint, args.num, args.data_root, device, args.seed, inception,
                                  args.sample_batchnorm)
    print(format_table(results))
    utils.write_json(results, out / "evaluation.json")
    return [out / "evaluation.json"]
