"""The latent-space commands on a trained checkpoint: sample, reconstruct, interpolate, attributes.

Each command is a pair: `add_<command>_arguments(parser)` declares its options (the shared ones
come from config.add_checkpoint_arguments) and `<command>_command(args)` runs it, writes PNG
grids (and arrays where useful) and returns the paths it wrote. main.py's command table joins
them to the command line.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

import config
import data
import models
import utils
from config import TrainConfig, UsageError
from models import Networks


@torch.no_grad()
def encode(nets: Networks, images: torch.Tensor, y: torch.Tensor | None = None, batch: int = 256) -> torch.Tensor:
    """Posterior means of q(z|x) (q(z|x, y) with label vectors `y`), in batches."""
    return torch.cat([nets.encoder(chunk, label)[0] for chunk, label in models.in_batches(images, y, batch)])


def decode(nets: Networks, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Prior samples from codes (and labels), BatchNorm with batch statistics (as the training grids are drawn)."""
    return models.decode_with_batch_statistics(nets.decoder, z, y)


def decode_each(nets: Networks, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Images from codes (and labels), each on its own: BatchNorm with the running statistics. Batch
    statistics would make an image depend on the other codes of its batch and normalise away a shift
    that all of them share, such as an attribute vector."""
    return models.decode_with_running_statistics(nets.decoder, z, y)


def heldout_split(cfg: TrainConfig, data_root: str | None) -> data.Split:
    """The run's held-out split; with its labels for a conditional run."""
    return data.load_dataset(cfg.dataset, data_root or cfg.data_root, cfg.image_size, cfg.channels,
                             labels=cfg.conditional).heldout


def heldout_batch(split: data.Split, count: int, cfg: TrainConfig, device: torch.device,
                  option: str = "--num") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `count` held-out images in [-1, 1] and their labels (None for file datasets loaded
    without); a note says so when the split has fewer (`option` names the count asked for)."""
    images, labels = data.labelled_images(split, count, cfg.image_size)
    say_if_fewer(len(images), count, option, "held-out images")
    return images.to(device), labels


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """--label and --attributes: what a conditional checkpoint is asked to draw."""
    parser.add_argument("--label", metavar="CLASS", help=config.with_default(
        "conditional checkpoints of classes: every image's class, by index or name", "the held-out images' own"))
    parser.add_argument("--attributes", metavar="NAME=0|1,...", help=config.with_default(
        "conditional CelebA checkpoints: attributes every image has (1) or lacks (0), the others the held-out "
        "images' own", "the held-out images' own"))


def label_request(args: argparse.Namespace, labels: data.Labels | None, checkpoint: str) -> dict[int, float]:
    """--label or --attributes as {position in y: value}; UsageError for a question the checkpoint
    cannot answer (a label for an unconditional checkpoint, attributes for one of classes, or back)."""
    asked = "--label" if args.label is not None else "--attributes" if args.attributes is not None else None
    if asked is None:
        return {}
    if labels is None:
        raise UsageError(f"{asked} asks for images of given labels, but {checkpoint} was trained without "
                         f"--conditional: its networks take no label. Leave {asked} out, or use the checkpoint of "
                         "a run trained with --conditional.")
    if labels.attributes != (asked == "--attributes"):
        kind, right = ("attributes", "--attributes NAME=0|1,...") if labels.attributes else ("classes", "--label CLASS")
        raise UsageError(f"{asked} does not fit {checkpoint}, which is conditioned on {kind}; use {right}.")
    if asked == "--label":
        if args.label in labels.names or (args.label.isdigit() and int(args.label) < labels.dim):
            return {labels.names.index(args.label) if args.label in labels.names else int(args.label): 1.0}
        raise UsageError(f"--label {args.label} is not a class of {checkpoint}; its classes are "
                         f"{', '.join(labels.names)} (by name, or by index 0..{labels.dim - 1}).")
    request = {}
    for item in args.attributes.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in labels.names or value not in ("0", "1"):
            raise UsageError(f"--attributes {item.strip()!r} is not NAME=1 or NAME=0 for one of the checkpoint's "
                             f"attributes: {', '.join(labels.names)}.")
        request[labels.names.index(name)] = 1.0 if value == "1" else -1.0
    return request


def label_vectors(labels: data.Labels, request: dict[int, float], count: int,
                  known: torch.Tensor | None) -> torch.Tensor:
    """The label vectors y of `count` images: --label's class for all; else the images' `known` labels
    with the --attributes asked for set (without known labels the others are 0, neither has nor lacks)."""
    if request and not labels.attributes:
        return labels.vectors(torch.full((count,), next(iter(request))))
    y = labels.vectors(known) if known is not None else torch.zeros(count, labels.dim)
    for position, value in request.items():
        y[:, position] = value
    return y


def heldout_labels(cfg: TrainConfig, args: argparse.Namespace, labels: data.Labels, request: dict[int, float],
                   count: int) -> torch.Tensor:
    """y for `count` new images: --label's class, or the labels of the first held-out images (again from
    the first where `count` is larger) with --attributes set."""
    if request and not labels.attributes:
        return label_vectors(labels, request, count, None)
    known = heldout_split(cfg, args.data_root).labels
    return label_vectors(labels, request, count, known[torch.arange(count) % len(known)])


def say_if_fewer(got: int, asked: int, option: str, what: str) -> None:
    if got < asked:
        print(f"note: {option} asks for {asked:,}, but there are {got:,} {what}; used {got:,}")


def read_images(paths: list[str], cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """Image files (or folders of them) prepared as in training; UsageError if none is readable."""
    files: list[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            files += data.find_images(path)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"--images {name} does not exist; give image files or folders of them.")
    dataset = data.ImageFiles(files, cfg.channels, cfg.image_size)
    images = [image for image, index in (dataset[i] for i in range(len(dataset))) if index >= 0]
    if not images:
        raise UsageError(f"none of the {len(files)} file(s) given with --images could be read as an image "
                         f"({', '.join(data.IMAGE_EXTENSIONS)}).")
    if len(images) < len(files):
        print(f"warning: skipped {len(files) - len(images)} unreadable file(s) of --images")
    return torch.stack(images).to(device)


def write_samples(nets: Networks, cfg: TrainConfig, out: Path, num: int, individual: bool, seed: int,
                  y: torch.Tensor | None = None) -> list[Path]:
    """`num` prior samples (for label vectors `y`, conditional checkpoints): a grid, an .npz of the
    array in [0, 1] (and the labels) and, if asked, one PNG each."""
    device = next(nets.decoder.parameters()).device
    z = torch.randn(num, cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
    images = decode(nets, z.to(device), y.to(device) if y is not None else None)
    written = [out / "samples.png", out / "samples.npz"]
    utils.write_grid(images, written[0], nrow=max(1, int(np.ceil(np.sqrt(num)))))
    arrays = {"images": utils.model_to_unit(images).numpy()}
    if y is not None:
        arrays["labels"] = y.numpy()
    utils.write_npz(written[1], **arrays)
    if individual:
        for index, image in enumerate(images):
            written.append(out / "individual" / f"sample_{index:05d}.png")
            utils.write_grid(image[None], written[-1], nrow=1)
    return written


def write_reconstructions(nets: Networks, images: torch.Tensor, labels: torch.Tensor | None,
                          out: Path, y: torch.Tensor | None = None) -> list[Path]:
    """Images beside their reconstructions Dec(mean of q(z|x)) (with label vectors `y`, conditional
    checkpoints): a grid and an .npz."""
    y = y.to(images.device) if y is not None else None
    recon = torch.cat([models.reconstruct(nets, chunk, label) for chunk, label in models.in_batches(images, y, 256)])
    written = [out / "reconstructions.png", out / "reconstructions.npz"]
    utils.write_grid(utils.interleave(images[:64], recon[:64]), written[0])
    arrays = {"originals": utils.model_to_unit(images).numpy(), "reconstructions": utils.model_to_unit(recon).numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    utils.write_npz(written[1], **arrays)
    return written


def line(start: torch.Tensor, end: torch.Tensor, steps: int) -> torch.Tensor:
    """(P, D) starts and ends -> (P * steps, D): `steps` evenly spaced points from each start to its end."""
    weights = torch.linspace(0, 1, steps, device=start.device)[None, :, None]           # (1, K, 1)
    return ((1 - weights) * start[:, None, :] + weights * end[:, None, :]).flatten(0, 1)


def write_interpolation(nets: Networks, start: torch.Tensor, end: torch.Tensor, steps: int, out: Path,
                        labels: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Path]:
    """One row per (start, end) code pair: `steps` evenly spaced points on the line between them; a
    conditional checkpoint's label vectors walk the line between their (start, end) `labels` too."""
    y = line(*labels, steps) if labels is not None else None
    images = decode_each(nets, line(start, end, steps), y)
    path = out / "interpolation.png"
    utils.write_grid(images, path, nrow=steps)
    return [path]


def attribute_vector(z: torch.Tensor, has_attribute: torch.Tensor) -> torch.Tensor:
    """The paper's visual attribute vector: mean z of images with the attribute minus mean z of those without."""
    has_attribute = has_attribute.bool()
    if has_attribute.all() or not has_attribute.any():
        raise UsageError("an attribute vector needs labelled images both with and without the attribute; "
                         "these labels have only one kind. Use more labelled images (--num-labelled).")
    return z[has_attribute].mean(0) - z[~has_attribute].mean(0)


def write_attribute_grid(nets: Networks, queries: torch.Tensor, vector: torch.Tensor, path: Path) -> Path:
    """Columns: original, reconstruction, reconstruction - vector, reconstruction + vector."""
    z = encode(nets, queries)
    columns = [queries, decode_each(nets, z), decode_each(nets, z - vector), decode_each(nets, z + vector)]
    utils.write_grid(torch.stack(columns, dim=1).flatten(0, 1), path, nrow=4)
    return path


def read_attribute_csv(path: Path, files: list[Path]) -> tuple[list[str], torch.Tensor, list[int]]:
    """A CSV `filename,attr1,attr2,...` (1/true/yes = has it) -> names, (N, A) booleans, and which `files` it labels."""
    truthy = {"1", "true", "yes", "y"}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as error:
        raise UsageError(f"cannot read the attribute CSV {path} ({error.strerror}).") from None
    if len(rows) < 2 or len(rows[0]) < 2:
        raise UsageError(f"{path} must have a header `filename,attr1,...` and one row per image.")
    names = [name.strip() for name in rows[0][1:]]
    by_name = {row[0].strip(): [value.strip().lower() in truthy for value in row[1:]] for row in rows[1:] if row}
    labels = [by_name.get(f.name) or by_name.get(str(f)) for f in files]
    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        raise UsageError(f"no file named in {path} is among the dataset's images; the first column must hold "
                         "their file names.")
    return names, torch.tensor([labels[i] for i in keep]), keep


# ---------------------------------------------------------------------------
# The commands: their options and what they run
# ---------------------------------------------------------------------------

# What each command writes into its folder (name patterns), so that rerunning it may reuse the folder.
WRITES = {
    "sample": ("samples.png", "samples.npz", "individual"),
    "reconstruct": ("reconstructions.png", "reconstructions.npz"),
    "interpolate": ("interpolation.png",),
    "attributes": ("class_*_to_*.png", "attribute_*.png"),
}


def open_run(args: argparse.Namespace, command: str,
             needs_encoder: bool) -> tuple[TrainConfig, Networks, torch.device, Path, data.Labels | None]:
    """The checks every command makes before its work (device, --out, checkpoint), then the run's
    networks and its labels (None: unconditional)."""
    device = config.resolve_device(args.device)
    checkpoint = utils.checkpoint_path(args.checkpoint)
    out = config.output_folder(args.out, checkpoint, command, WRITES[command])
    config.check_data_root(args.data_root)
    cfg, nets, _, labels = utils.load_run(checkpoint, device, args.decoder)
    if needs_encoder and nets.encoder is None:
        raise UsageError(f"`{command}` needs an encoder, and a --model {cfg.model} checkpoint has none; "
                         "use a checkpoint of vaegan, vae or vae-disl.")
    torch.manual_seed(args.seed)
    return cfg, nets, device, out, labels


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_checkpoint_arguments(parser)
    parser.add_argument("--num", type=config.count(1), default=64, help=config.with_default("how many samples", 64))
    parser.add_argument("--individual", action="store_true", help=config.with_default("also one PNG per sample", "off"))
    add_label_arguments(parser)


def sample_command(args: argparse.Namespace) -> list[Path]:
    cfg, nets, _, out, labels = open_run(args, "sample", needs_encoder=False)
    request = label_request(args, labels, args.checkpoint)
    y = heldout_labels(cfg, args, labels, request, args.num) if labels is not None else None
    return write_samples(nets, cfg, out, args.num, args.individual, args.seed, y)


def add_reconstruct_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_checkpoint_arguments(parser)
    parser.add_argument("--num", type=config.count(1), default=64,
                        help=config.with_default("how many held-out images", 64))
    parser.add_argument("--images", nargs="+", metavar="PATH",
                        help=config.with_default("image files or folders instead of held-out images", "none"))
    add_label_arguments(parser)


def reconstruct_command(args: argparse.Namespace) -> list[Path]:
    cfg, nets, device, out, labels = open_run(args, "reconstruct", needs_encoder=True)
    request = label_request(args, labels, args.checkpoint)
    if args.images and labels is not None and not request:
        raise UsageError(f"{args.checkpoint} is conditional, and image files have no labels: say which with "
                         f"{'--attributes NAME=0|1,...' if labels.attributes else '--label CLASS'}.")
    if args.images:
        images, known = read_images(args.images, cfg, device), None
    else:
        images, known = heldout_batch(heldout_split(cfg, args.data_root), args.num, cfg, device)
    y = label_vectors(labels, request, len(images), known) if labels is not None else None
    return write_reconstructions(nets, images, known, out, y)


def add_interpolate_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_checkpoint_arguments(parser)
    parser.add_argument("--pairs", type=config.count(1), default=8, help=config.with_default("rows: pairs of endpoints", 8))
    parser.add_argument("--steps", type=config.count(2), default=10,
                        help=config.with_default("images per row, endpoints included", 10))
    parser.add_argument("--prior", action="store_true",
                        help=config.with_default("endpoints drawn from the prior instead of encoded images", "off"))
    add_label_arguments(parser)


def interpolate_command(args: argparse.Namespace) -> list[Path]:
    """Conditional checkpoints: encoded endpoints keep their images' labels, prior ones take those of
    the first held-out images; --label or --attributes sets them for every endpoint."""
    cfg, nets, device, out, labels = open_run(args, "interpolate", needs_encoder=not args.prior)
    request = label_request(args, labels, args.checkpoint)
    if args.prior:
        codes = torch.randn(2, args.pairs, cfg.latent_dim, generator=torch.Generator().manual_seed(args.seed))
        z = codes.to(device).flatten(0, 1)
        y = heldout_labels(cfg, args, labels, request, len(z)).to(device) if labels is not None else None
    else:
        images, known = heldout_batch(heldout_split(cfg, args.data_root), 2 * args.pairs, cfg, device,
                                      "--pairs (two images each)")
        if len(images) < 2:
            raise UsageError("interpolation needs at least two held-out images; use --prior instead.")
        y = label_vectors(labels, request, len(images), known).to(device) if labels is not None else None
        z = encode(nets, images, y)
    half = len(z) // 2
    ends = (y[:half], y[half:2 * half]) if y is not None else None
    return write_interpolation(nets, z[:half], z[half:2 * half], args.steps, out, ends)


def add_attributes_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_checkpoint_arguments(parser)
    parser.add_argument("--attribute", help=config.with_default(
        "one attribute by name, CelebA's or the --labels CSV's", "all"))
    parser.add_argument("--from", dest="source", type=int,
                        help=config.with_default("class datasets: the class the vector starts at", "none"))
    parser.add_argument("--to", dest="target", type=int,
                        help=config.with_default("class datasets: the class the vector points to", "none"))
    parser.add_argument("--labels", help=config.with_default(
        "for --dataset folder: a CSV filename,attr1,attr2,... (1 = has it)", "none"))
    parser.add_argument("--num-labelled", type=config.count(2), default=10000,
                        help=config.with_default("labelled images that build each vector", 10000))
    parser.add_argument("--num-queries", type=config.count(1), default=8,
                        help=config.with_default("images the vector is added to (rows)", 8))


def attributes_command(args: argparse.Namespace) -> list[Path]:
    """One grid per attribute vector, built from labelled training images."""
    if args.labels and not Path(args.labels).expanduser().is_file():
        raise UsageError(f"--labels {args.labels} is not a file; give a CSV filename,attr1,attr2,... of the "
                         "dataset's images.")
    cfg, nets, device, out, labels = open_run(args, "attributes", needs_encoder=True)
    if labels is not None:
        raise UsageError(f"`attributes` finds vectors in z, but {args.checkpoint} is conditional: its classes or "
                         "attributes are an input of the networks, not directions in z. Ask for them directly: "
                         "`sample --label CLASS` (or --attributes NAME=0|1,...), or `reconstruct --label` to redraw "
                         "held-out images with another label.")
    check_classes(cfg, args)
    root = Path(args.data_root or cfg.data_root).expanduser()
    splits = data.load_dataset(cfg.dataset, root, cfg.image_size, cfg.channels)
    if isinstance(splits.train, data.TensorImages):
        return [write_class_vector_grid(nets, cfg, splits, args, device, out)]
    if cfg.dataset == "celeba":
        names, labels, keep = data.celeba_attributes(root, splits.train.files)
    elif args.labels:
        names, labels, keep = read_attribute_csv(Path(args.labels).expanduser(), splits.train.files)
    else:
        raise UsageError("a folder dataset has no labels of its own: give --labels CSV with a header "
                         "filename,attr1,attr2,... and 1 where an image has the attribute.")
    wanted = names if args.attribute is None else [args.attribute]
    for name in wanted:
        if name not in names:
            raise UsageError(f"unknown attribute {name!r}; the labels have: {', '.join(names)}.")
    say_if_fewer(len(keep[:args.num_labelled]), args.num_labelled, "--num-labelled", "labelled training images")
    keep = keep[:args.num_labelled]
    z = encode(nets, torch.stack([splits.train[i][0] for i in keep]).to(device))
    queries = heldout_batch(splits.heldout, args.num_queries, cfg, device, "--num-queries")[0]
    return [write_attribute_grid(nets, queries, attribute_vector(z, labels[:len(keep), names.index(name)].to(device)),
                                 out / f"attribute_{name}.png") for name in wanted]


def check_classes(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """For a dataset with class labels: --from and --to name two of its classes (before any data is read)."""
    classes = data.DATASETS[cfg.dataset].classes
    if classes is None:
        return
    if args.source is None or args.target is None:
        raise UsageError(f"{cfg.dataset} has class labels, not attributes: say which vector with --from A --to B "
                         f"(classes 0..{classes - 1}).")
    for name, value in (("--from", args.source), ("--to", args.target)):
        if not 0 <= value < classes:
            raise UsageError(f"{name} {value} is not a class of {cfg.dataset}; its classes are 0..{classes - 1}.")


def write_class_vector_grid(nets: Networks, cfg: TrainConfig, splits: data.Splits, args: argparse.Namespace,
                            device: torch.device, out: Path) -> Path:
    """Class labels: the vector from the mean code of class --from to that of class --to."""
    train, heldout = splits.train, splits.heldout
    chosen = ((train.labels == args.source) | (train.labels == args.target)).nonzero().flatten()
    say_if_fewer(len(chosen[:args.num_labelled]), args.num_labelled, "--num-labelled",
                 f"training images of classes {args.source} and {args.target}")
    chosen = chosen[:args.num_labelled]
    images = data.resize(data.uint8_to_model(train.images[chosen]), cfg.image_size).to(device)
    vector = attribute_vector(encode(nets, images), train.labels[chosen].to(device) == args.target)
    queries = heldout.images[(heldout.labels == args.source).nonzero().flatten()[:args.num_queries]]
    say_if_fewer(len(queries), args.num_queries, "--num-queries", f"held-out images of class {args.source}")
    queries = data.resize(data.uint8_to_model(queries), cfg.image_size).to(device)
    return write_attribute_grid(nets, queries, vector, out / f"class_{args.source}_to_{args.target}.png")
