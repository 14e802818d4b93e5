"""Sample quality and reconstruction fidelity of a checkpoint (`main.py evaluate`), measured as the field does.

FID and KID come from torchmetrics (FrechetInceptionDistance, KernelInceptionDistance) and
precision and recall (k = 3 nearest neighbours) from torch-fidelity, on the features of images
quantised to uint8 first, as a tool that reads image files sees them. Two feature networks:

  * the domain classifier (MNIST, Fashion-MNIST; for CelebA one of its 40 attributes, for label
    fidelity only): four convolutions on 28x28 images, trained once on the training split and
    cached under <data root>/classifiers; offline, always. Its
    figures carry its name: fid[mnist-cnn], kid[mnist-cnn], ...; its predictions also say how
    often a reconstruction keeps its class, recon_accuracy[mnist-cnn], and how many samples it
    recognises as one class with probability 0.9 or more, confident[mnist-cnn] (held-out
    images: confident_heldout[mnist-cnn]).
  * the Inception network of the FID literature (torch-fidelity's TensorFlow-compatible
    InceptionV3, with the weights file pytorch-fid and torch-fidelity use): fid[inception],
    comparable with papers, when --inception-weights names the file or it lies in torch's
    hub cache.

A conditional checkpoint also gets two label figures: label fidelity (samples drawn for the held-out
images' labels, given back by the label classifier: accuracy for classes; for CelebA's attributes
also the cosine similarity and MSE of the predicted attribute vectors, real images beside them as the
upper bound) and train-on-generated, test-on-real (the classifier trained on generated labelled
images and on as many real ones, both tested on the held-out split).

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


class DomainClassifier(nn.Module):
    """(N, channels, 28, 28) in [-1, 1] -> (logits (N, outputs), features (N, 128))."""

    def __init__(self, channels: int = 1, outputs: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                                # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                                # 7x7
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, outputs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.head(h), h


def label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class indices (N,); binary cross-entropy of each attribute for booleans (N, A)."""
    if targets.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    return F.cross_entropy(logits, targets.long())


@torch.enable_grad()  # also when called from a no_grad evaluation
def train_classifier(images: torch.Tensor, targets: torch.Tensor, outputs: int = 10, epochs: int = 3,
                     seed: int = 0) -> DomainClassifier:
    """Adam, batch 128, learning rate 1e-3 cut to 0.3x after each epoch, on uint8 (N, C, H, W) images
    (seen at 28x28) and their labels: class indices (N,) or attribute booleans (N, outputs)."""
    torch.manual_seed(seed)
    model = DomainClassifier(images.shape[1], outputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.3)
    for _ in range(epochs):
        for indices in torch.randperm(len(images)).split(128):
            logits, _ = model(data.resize(data.uint8_to_model(images[indices]), CLASSIFIER_SIZE))
            loss = label_loss(logits, targets[indices])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def outputs(model: DomainClassifier, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images of any size, or float ones in [-1, 1] -> (logits, features)."""
    logits, feats = [], []
    for chunk in images.split(batch):
        chunk = data.uint8_to_model(chunk) if chunk.dtype == torch.uint8 else chunk.float()
        out, h = model(data.resize(chunk.cpu(), CLASSIFIER_SIZE))
        logits.append(out)
        feats.append(h)
    return torch.cat(logits), torch.cat(feats)


def classify(model: DomainClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images of any size, or float ones in [-1, 1] -> (predicted classes, features)."""
    logits, features = outputs(model, images)
    return logits.argmax(1), features


def accuracy(model: DomainClassifier, images: torch.Tensor, targets: torch.Tensor) -> float:
    """The share of classes (or, for attribute booleans, of attributes) `model` predicts right."""
    logits, _ = outputs(model, images)
    predicted = logits > 0 if targets.dim() == 2 else logits.argmax(1)
    return float((predicted == targets.to(predicted.dtype)).float().mean())


CONFIDENT = 0.9  # the class probability that counts an image as a recognisable member of its class


def confident_share(logits: torch.Tensor) -> float:
    """The share of images the classifier gives one class at least CONFIDENT probability: of samples, how
    many read as a recognisable digit (or garment); the held-out images' own share is its ceiling."""
    return float((logits.float().softmax(1).amax(1) >= CONFIDENT).float().mean())


def labelled_uint8(split: data.Split, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images of a split as uint8 (file splits: at the size they were loaded with), with labels."""
    if isinstance(split, data.TensorImages):
        return split.images[:count], split.labels[:count]
    images, labels = data.labelled_images(split, count, split.image_size)
    return data.model_to_uint8(images), labels


CLASSIFIER_TRAIN_IMAGES, CLASSIFIER_TEST_IMAGES = 60_000, 10_000  # at most, of the training and held-out splits


def cached_classifier(dataset: str, root: Path) -> tuple[DomainClassifier, float]:
    """The dataset's classifier under <root>/classifiers (of classes; of CelebA's attributes), trained on
    first use; with its accuracy on the held-out split."""
    path = root / "classifiers" / f"{dataset}-cnn.pt"
    splits = data.load_dataset(dataset, root, CLASSIFIER_SIZE, say=lambda note: None,  # its notes are said already
                               labels=dataset == "celeba")
    test_images, test_labels = labelled_uint8(splits.heldout, CLASSIFIER_TEST_IMAGES)
    shape = dict(channels=splits.channels, outputs=test_labels.shape[1] if test_labels.dim() == 2 else 10)
    model = DomainClassifier(**shape)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
    else:
        print(f"training the {dataset} classifier once (cached in {path}) ...", flush=True)
        model = train_classifier(*labelled_uint8(splits.train, CLASSIFIER_TRAIN_IMAGES), shape["outputs"])
        try:
            utils.write_atomic(path, lambda tmp: torch.save(model.state_dict(), tmp))
        except OSError as error:
            print(f"note: could not cache the classifier in {path} ({error.strerror}); it is retrained next time")
    return model, accuracy(model, test_images, test_labels)


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
                  device: torch.device, y: torch.Tensor | None = None) -> torch.Tensor:
    """`count` prior samples (for the label vectors `y`, conditional decoders) as uint8 images, with
    BatchNorm's batch statistics (`batch`, as the training grids) or its running ones (`running`)."""
    z = torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    y = y.to(device) if y is not None else None
    decode = models.decode_with_batch_statistics if batchnorm == "batch" else models.decode_with_running_statistics
    return data.model_to_uint8(decode(decoder, z, y)).cpu()


class SampleQuality:
    """The domain figures of prior samples against `count` held-out images, for --eval-every; a
    conditional run's samples are drawn for those images' labels."""

    def __init__(self, dataset: str, root: Path, heldout: data.Split, count: int, image_size: int,
                 labels: data.Labels | None = None):
        self.name = f"{dataset}-cnn"
        with torch.random.fork_rng(devices=[]):  # building the classifier draws its initial weights: not training's
            self.classifier, _ = cached_classifier(dataset, root)
        self.count = min(count, len(heldout))
        real, real_labels = data.labelled_images(heldout, self.count, image_size)
        self.y = labels.vectors(real_labels) if labels is not None else None
        _, self.real = classify(self.classifier, data.model_to_uint8(real))

    def columns(self) -> list[str]:
        return [f"fid[{self.name}]", f"kid[{self.name}]", f"confident[{self.name}]"]

    def measure(self, decoder: nn.Module, latent_dim: int, device: torch.device) -> dict[str, float]:
        """FID, KID and the confident share of `count` prior samples (fixed codes, batch statistics), in the
        networks' current state."""
        samples = prior_samples(decoder, self.count, latent_dim, 0, "batch", device, self.y)
        logits, fake = outputs(self.classifier, samples)
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets: training's random numbers stay as they were
            figures = distances(self.real, fake, precision_recall=False)
        return dict(zip(self.columns(), (figures["fid"], figures["kid"], confident_share(logits))))


@torch.no_grad()
def reconstruction_figures(nets: models.Networks, images: torch.Tensor,
                           y: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Pixel MSE and KL of reconstructions Dec(mean of q(z|x)) (running statistics), and the reconstructions;
    `y`: the images' label vectors, for conditional networks."""
    posterior = [nets.encoder(chunk, label) for chunk, label in models.in_batches(images, y, 256)]
    mean, logvar = (torch.cat(parts) for parts in zip(*posterior))
    recon = torch.cat([nets.decoder(chunk, label) for chunk, label in models.in_batches(mean, y, 256)])
    return {"pixel_mse": float((recon - images).pow(2).mean()), "kl": float(losses.kl_divergence(mean, logvar))}, recon


def run_description(cfg: config.TrainConfig, checkpoint: Path, step: int, num: int, batchnorm: str,
                    decoder: str = "average") -> dict:
    """What the figures of `evaluate_checkpoint` were measured on."""
    return {"checkpoint": str(checkpoint), "model": cfg.model, "dataset": cfg.dataset, "step": step,
            "conditional": cfg.conditional, "samples": num, "decoder_weights": utils.decoder_weights(cfg, decoder),
            "reference": f"the first {num:,} images of the held-out split",
            "sampling_batchnorm": {"batch": f"batch statistics, {models.SAMPLE_BATCH} samples a batch",
                                   "running": "running statistics"}[batchnorm],
            "images": "quantised to uint8 before features are taken", "feature_networks": {}}


@torch.no_grad()
def evaluate_checkpoint(checkpoint: Path, num: int, data_root: str | None, device: torch.device, seed: int = 0,
                        inception: tuple[Path, FeatureExtractorInceptionV3] | None = None,
                        batchnorm: str = "batch", tstr_num: int = 0, decoder: str = "average") -> dict:
    """Every figure the checkpoint's model and dataset allow, with what each was measured on. A
    conditional checkpoint's samples are drawn for the held-out images' labels, and it also gets label
    fidelity and, with `tstr_num` images, train-on-generated, test-on-real."""
    cfg, nets, step, labels = utils.load_run(checkpoint, device, decoder)
    root = Path(data_root or cfg.data_root).expanduser()
    split = latent.heldout_split(cfg, str(root))
    notes = []
    if num > len(split):
        notes.append(f"--num {num} is more than the held-out split's {len(split):,} images; used {len(split):,}")
        num = len(split)
    heldout, heldout_labels = latent.heldout_batch(split, num, cfg, device)
    y = labels.vectors(heldout_labels).to(device) if labels is not None else None
    real, fake = data.model_to_uint8(heldout).cpu(), prior_samples(nets.decoder, num, cfg.latent_dim, seed,
                                                                     batchnorm, device, y)
    results = run_description(cfg, checkpoint, step, num, batchnorm, decoder)
    recon = None
    if nets.encoder is not None:
        figures, recon = reconstruction_figures(nets, heldout, y)
        results.update(figures)
    if data.DATASETS[cfg.dataset].domain_classifier:
        results.update(domain_figures(cfg.dataset, root, real, fake, recon, heldout_labels, results["feature_networks"]))
    if labels is not None and data.DATASETS[cfg.dataset].label_classifier:
        results.update(label_fidelity(cfg.dataset, root, real, fake, heldout_labels, results["feature_networks"]))
    elif labels is not None:
        judged = ", ".join(name for name, spec in data.DATASETS.items() if spec.label_classifier)
        notes.append(f"label fidelity skipped: evaluate has no classifier of {cfg.dataset}'s labels (only {judged})")
    if labels is not None and tstr_num:
        results.update(train_on_generated(nets.decoder, cfg, labels, root, tstr_num, seed, batchnorm, device))
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


def label_fidelity(dataset: str, root: Path, real: torch.Tensor, fake: torch.Tensor, requested: torch.Tensor,
                   networks: dict) -> dict[str, float]:
    """How often the label classifier gives samples back the labels they were drawn for (classes:
    accuracy; attributes: also the cosine similarity and MSE of the predicted attribute vectors, in
    [-1, 1], with the requested ones), beside the same figures of the real images (the upper bound)."""
    classifier, test_accuracy = cached_classifier(dataset, root)
    name = f"{dataset}-cnn"
    networks.setdefault(name, f"the {dataset} classifier (held-out accuracy {test_accuracy:.2%})")
    figures = {}
    for prefix, images in (("label", fake), ("real_label", real)):
        figures[f"{prefix}_accuracy[{name}]"] = accuracy(classifier, images, requested)
        if requested.dim() == 2:  # attributes
            predicted, wanted = torch.sigmoid(outputs(classifier, images)[0]) * 2 - 1, requested.float() * 2 - 1
            figures[f"{prefix}_cosine[{name}]"] = float(F.cosine_similarity(predicted, wanted, dim=1).mean())
            figures[f"{prefix}_mse[{name}]"] = float((predicted - wanted).pow(2).mean())
    return figures


TSTR_EPOCHS = 2  # of the train-on-generated classifiers: short, for CPUs
TSTR_CHUNK = 5000  # samples decoded at once


def train_on_generated(decoder: nn.Module, cfg: config.TrainConfig, labels: data.Labels, root: Path, count: int,
                       seed: int, batchnorm: str, device: torch.device) -> dict[str, float]:
    """Train on generated, test on real: the domain classifier trained on `count` samples drawn for the
    training split's labels, and the same trained on `count` real training images, each tested on the
    held-out split."""
    splits = data.load_dataset(cfg.dataset, root, CLASSIFIER_SIZE, cfg.channels, say=lambda note: None, labels=True)
    real, real_labels = labelled_uint8(splits.train, count)
    wanted = real_labels[torch.arange(count) % len(real_labels)]  # the training labels, repeated if count is larger
    generated = generated_images(decoder, cfg.latent_dim, labels.vectors(wanted), seed + 1, batchnorm, device)
    test, test_labels = labelled_uint8(splits.heldout, CLASSIFIER_TEST_IMAGES)
    trained = {source: train_classifier(images, targets, labels.dim, TSTR_EPOCHS)
               for source, (images, targets) in {"generated": (generated, wanted), "real": (real, real_labels)}.items()}
    figures = {f"tstr_accuracy[trained_on_{source}]": accuracy(model, test, test_labels)
               for source, model in trained.items()}
    return {"tstr_images": count, "tstr_real_images": len(real), **figures}


def generated_images(decoder: nn.Module, latent_dim: int, y: torch.Tensor, seed: int, batchnorm: str,
                     device: torch.device) -> torch.Tensor:
    """Prior samples for the label vectors `y`, as uint8 images at the classifier's size."""
    chunks = []
    for i, chunk in enumerate(y.split(TSTR_CHUNK)):
        samples = prior_samples(decoder, len(chunk), latent_dim, seed + i, batchnorm, device, chunk)
        chunks.append(data.model_to_uint8(data.resize(data.uint8_to_model(samples), CLASSIFIER_SIZE)))
    return torch.cat(chunks)


def domain_figures(dataset: str, root: Path, real: torch.Tensor, fake: torch.Tensor, recon: torch.Tensor | None,
                   labels: torch.Tensor | None, networks: dict) -> dict[str, float]:
    """The domain classifier's figures: sample distances and how often a reconstruction keeps its class."""
    classifier, accuracy = cached_classifier(dataset, root)
    name = f"{dataset}-cnn"
    networks[name] = f"the {dataset} classifier's 128 penultimate features (test accuracy {accuracy:.2%})"
    (real_logits, real_features), (fake_logits, fake_features) = outputs(classifier, real), outputs(classifier, fake)
    figures = {f"{key}[{name}]": value for key, value in distances(real_features, fake_features).items()}
    figures[f"classifier_test_accuracy[{name}]"] = accuracy
    figures[f"confident[{name}]"] = confident_share(fake_logits)
    figures[f"confident_heldout[{name}]"] = confident_share(real_logits)
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
    parser.add_argument("--tstr-num", type=config.count(0), default=60000, help=config.with_default(
        "conditional checkpoints: generated images that train the train-on-generated, test-on-real classifier, and "
        "real ones its twin (0: skip it)", 60000))


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
                                  args.sample_batchnorm, args.tstr_num, args.decoder)
    print(format_table(results))
    utils.write_json(results, out / "evaluation.json")
    return [out / "evaluation.json"]
