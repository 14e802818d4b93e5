"""The latent-space commands: sample, reconstruct, interpolate and attribute arithmetic.

Each works on a trained checkpoint, writes PNG grids (and arrays where useful) and
returns the paths it wrote; main.py gives them their command lines.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

import data
import main
import utils


class CommandError(Exception):
    """A request the checkpoint or the data cannot serve; the message says what to do."""


def load_run(checkpoint: str | Path, device: torch.device) -> tuple[main.TrainConfig, main.Networks, int]:
    """The config, the networks (evaluation mode) and the step of a checkpoint."""
    state = utils.load_checkpoint(checkpoint)
    cfg = main.TrainConfig(**state["config"])
    nets = main.build_networks(cfg.model_config(), "cpu", cfg.model)
    main.load_networks(state, nets)
    for module in nets.modules().values():
        module.to(device).eval()
    return cfg, nets, state["step"]


def require_encoder(nets: main.Networks, cfg: main.TrainConfig, command: str) -> None:
    if nets.encoder is None:
        raise CommandError(f"`{command}` needs an encoder, and a --model {cfg.model} checkpoint has none; "
                           "use a checkpoint of vaegan, vae or vae-disl.")


def to_unit(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] tensors -> float32 arrays in [0, 1], (N, C, H, W)."""
    return images.detach().float().cpu().clamp(-1, 1).add(1).div(2).numpy()


@torch.no_grad()
def encode(nets: main.Networks, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of q(z|x), in batches."""
    return torch.cat([nets.encoder(chunk)[0] for chunk in images.split(batch)])


@torch.no_grad()
def decode(nets: main.Networks, z: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images from codes, BatchNorm with batch statistics (as the training grids are drawn)."""
    return torch.cat([main.decode_with_batch_statistics(nets.decoder, chunk) for chunk in z.split(batch)])


def heldout_split(cfg: main.TrainConfig, data_root: str | None) -> data.Split:
    return data.load_dataset(cfg.dataset, data_root or cfg.data_root, cfg.image_size, cfg.channels).heldout


def heldout_batch(split: data.Split, count: int, cfg: main.TrainConfig,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `count` held-out images in [-1, 1] and their labels (None for file datasets)."""
    images = data.heldout_images(split, count, cfg.image_size).to(device)
    labels = split.labels[:count] if isinstance(split, data.TensorImages) else None
    return images, labels


def read_images(paths: list[str], cfg: main.TrainConfig, device: torch.device) -> torch.Tensor:
    """Image files (or folders of them) prepared as in training; CommandError if none is readable."""
    files: list[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            files += data.find_images(path)
        elif path.is_file():
            files.append(path)
        else:
            raise CommandError(f"--images {name} does not exist; give image files or folders of them.")
    dataset = data.ImageFiles(files, cfg.channels, cfg.image_size)
    images = [image for image, index in (dataset[i] for i in range(len(dataset))) if index >= 0]
    if not images:
        raise CommandError(f"none of the {len(files)} file(s) given with --images could be read as an image "
                           f"({', '.join(data.IMAGE_EXTENSIONS)}).")
    if len(images) < len(files):
        print(f"warning: skipped {len(files) - len(images)} unreadable file(s) of --images")
    return torch.stack(images).to(device)


def sample(nets: main.Networks, cfg: main.TrainConfig, out: Path, num: int, individual: bool,
           seed: int) -> list[Path]:
    """`num` prior samples: a grid, an .npz of the array in [0, 1] and, if asked, one PNG each."""
    z = torch.randn(num, cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
    images = decode(nets, z.to(next(nets.decoder.parameters()).device))
    written = [out / "samples.png", out / "samples.npz"]
    utils.save_grid(images, written[0], nrow=max(1, int(np.ceil(np.sqrt(num)))))
    utils.save_npz(written[1], images=to_unit(images))
    if individual:
        for index, image in enumerate(images):
            written.append(out / "individual" / f"sample_{index:05d}.png")
            utils.save_grid(image[None], written[-1], nrow=1)
    return written


def reconstruct(nets: main.Networks, images: torch.Tensor, labels: torch.Tensor | None, out: Path) -> list[Path]:
    """Images beside their reconstructions Dec(mean of q(z|x)): a grid and an .npz."""
    recon = torch.cat([main.reconstruct(nets, chunk) for chunk in images.split(256)])
    written = [out / "reconstructions.png", out / "reconstructions.npz"]
    utils.save_grid(utils.interleave(images[:64], recon[:64]), written[0])
    arrays = {"originals": to_unit(images), "reconstructions": to_unit(recon)}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    utils.save_npz(written[1], **arrays)
    return written


def interpolate(nets: main.Networks, start: torch.Tensor, end: torch.Tensor, steps: int, out: Path) -> list[Path]:
    """One row per (start, end) code pair: `steps` evenly spaced points on the line between them."""
    weights = torch.linspace(0, 1, steps, device=start.device)[None, :, None]           # (1, K, 1)
    line = (1 - weights) * start[:, None, :] + weights * end[:, None, :]                 # (P, K, latent)
    images = decode(nets, line.flatten(0, 1))
    path = out / "interpolation.png"
    utils.save_grid(images, path, nrow=steps)
    return [path]


def attribute_vector(z: torch.Tensor, has_attribute: torch.Tensor) -> torch.Tensor:
    """The paper's visual attribute vector: mean z of images with the attribute minus mean z of those without."""
    has_attribute = has_attribute.bool()
    if has_attribute.all() or not has_attribute.any():
        raise CommandError("an attribute vector needs labelled images both with and without the attribute; "
                           "these labels have only one kind. Use more labelled images (--num-labelled).")
    return z[has_attribute].mean(0) - z[~has_attribute].mean(0)


def attribute_grid(nets: main.Networks, queries: torch.Tensor, vector: torch.Tensor, path: Path) -> Path:
    """Columns: original, reconstruction, reconstruction - vector, reconstruction + vector."""
    z = encode(nets, queries)
    columns = [queries, decode(nets, z), decode(nets, z - vector), decode(nets, z + vector)]
    utils.save_grid(torch.stack(columns, dim=1).flatten(0, 1), path, nrow=4)
    return path


def read_attribute_csv(path: Path, files: list[Path]) -> tuple[list[str], torch.Tensor, list[int]]:
    """A CSV `filename,attr1,attr2,...` (1/true/yes = has it) -> names, (N, A) booleans, and which `files` it labels."""
    truthy = {"1", "true", "yes", "y"}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as error:
        raise CommandError(f"cannot read the attribute CSV {path} ({error.strerror}).") from None
    if len(rows) < 2 or len(rows[0]) < 2:
        raise CommandError(f"{path} must have a header `filename,attr1,...` and one row per image.")
    names = [name.strip() for name in rows[0][1:]]
    by_name = {row[0].strip(): [value.strip().lower() in truthy for value in row[1:]] for row in rows[1:] if row}
    labels = [by_name.get(f.name) or by_name.get(str(f)) for f in files]
    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        raise CommandError(f"no file named in {path} is among the dataset's images; the first column must hold "
                           "their file names.")
    return names, torch.tensor([labels[i] for i in keep]), keep


# ---------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------

def build_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"main.py {command}", description=COMMAND_HELP[command],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_FILE", help="a run folder or its checkpoint.pt")
    p.add_argument("--out", help="where to write (default: <run folder>/<command>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--data-root", help="where the run's dataset is (default: the run's own --data-root)")
    p.add_argument("--seed", type=int, default=0, help="for prior samples and the choice of images")
    if command == "sample":
        p.add_argument("--num", type=int, default=64, help="how many samples")
        p.add_argument("--individual", action="store_true", help="also one PNG per sample")
    if command == "reconstruct":
        p.add_argument("--num", type=int, default=64, help="how many held-out images")
        p.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders instead of held-out images")
    if command == "interpolate":
        p.add_argument("--pairs", type=int, default=8, help="rows: pairs of endpoints")
        p.add_argument("--steps", type=int, default=10, help="images per row, endpoints included")
        p.add_argument("--prior", action="store_true", help="endpoints drawn from the prior instead of encoded images")
    if command == "attributes":
        p.add_argument("--attribute", help="one attribute by name (default: all); CelebA's or the --labels CSV's")
        p.add_argument("--from", dest="source", type=int, help="class datasets: the class the vector starts at")
        p.add_argument("--to", dest="target", type=int, help="class datasets: the class the vector points to")
        p.add_argument("--labels", help="for --dataset folder: a CSV filename,attr1,attr2,... (1 = has it)")
        p.add_argument("--num-labelled", type=int, default=10000, help="labelled images that build each vector")
        p.add_argument("--num-queries", type=int, default=8, help="images the vector is added to (rows)")
    return p


COMMAND_HELP = {
    "sample": "Decode N prior samples: a grid, an .npz of the images in [0, 1] and, with --individual, one PNG each.",
    "reconstruct": "Held-out images (or --images) beside their reconstructions: a grid and an .npz.",
    "interpolate": "Rows that walk the latent line between pairs of encoded images (or prior samples).",
    "attributes": "The paper's visual attribute vectors (mean z with minus mean z without), added to and "
                  "subtracted from query images' z. Columns: original, reconstruction, -vector, +vector.",
}


def positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} {value} must be at least 1.")


def run_command(command: str, argv: list[str]) -> list[Path]:
    """Parse and run one latent-space command; returns the files written."""
    args = build_parser(command).parse_args(argv)
    positive(args, "num", "pairs", "steps", "num_labelled", "num_queries")
    device = main.resolve_device(args.device)
    cfg, nets, _ = load_run(args.checkpoint, device)
    out = Path(args.out).expanduser() if args.out else utils.checkpoint_path(args.checkpoint).parent / command
    torch.manual_seed(args.seed)
    if command == "sample":
        return sample(nets, cfg, out, args.num, args.individual, args.seed)
    if not (command == "interpolate" and args.prior):
        require_encoder(nets, cfg, command)
    if command == "reconstruct":
        if args.images:
            return reconstruct(nets, read_images(args.images, cfg, device), None, out)
        images, labels = heldout_batch(heldout_split(cfg, args.data_root), args.num, cfg, device)
        return reconstruct(nets, images, labels, out)
    if command == "interpolate":
        if args.prior:
            codes = torch.randn(2, args.pairs, cfg.latent_dim, generator=torch.Generator().manual_seed(args.seed))
            start, end = codes.to(device)
        else:
            images, _ = heldout_batch(heldout_split(cfg, args.data_root), 2 * args.pairs, cfg, device)
            if len(images) < 2:
                raise CommandError("interpolation needs at least two held-out images; use --prior instead.")
            z = encode(nets, images)
            half = len(z) // 2
            start, end = z[:half], z[half:2 * half]
        return interpolate(nets, start, end, args.steps, out)
    return attributes(nets, cfg, args, device, out)


def attributes(nets: main.Networks, cfg: main.TrainConfig, args: argparse.Namespace, device: torch.device,
               out: Path) -> list[Path]:
    """One grid per attribute vector, built from labelled training images."""
    root = Path(args.data_root or cfg.data_root).expanduser()
    splits = data.load_dataset(cfg.dataset, root, cfg.image_size, cfg.channels)
    train = splits.train
    if isinstance(train, data.TensorImages):  # class labels: the vector from class --from to class --to
        if args.source is None or args.target is None:
            raise CommandError(f"{cfg.dataset} has class labels, not attributes: say which vector with --from A --to B "
                               f"(classes {int(train.labels.min())}..{int(train.labels.max())}).")
        classes = set(train.labels.unique().tolist())
        for name, value in (("--from", args.source), ("--to", args.target)):
            if value not in classes:
                raise CommandError(f"{name} {value} is not a class of {cfg.dataset}; its classes are "
                                   f"{min(classes)}..{max(classes)}.")
        chosen = ((train.labels == args.source) | (train.labels == args.target)).nonzero().flatten()[:args.num_labelled]
        images = data.resize(data.to_unit_range(train.images[chosen]), cfg.image_size).to(device)
        vector = attribute_vector(encode(nets, images), train.labels[chosen].to(device) == args.target)
        heldout = splits.heldout
        queries = heldout.images[(heldout.labels == args.source).nonzero().flatten()[:args.num_queries]]
        queries = data.resize(data.to_unit_range(queries), cfg.image_size).to(device)
        return [attribute_grid(nets, queries, vector, out / f"class_{args.source}_to_{args.target}.png")]

    if cfg.dataset == "celeba":
        names, labels, keep = data.celeba_attributes(root, train.files)
    elif args.labels:
        names, labels, keep = read_attribute_csv(Path(args.labels).expanduser(), train.files)
    else:
        raise CommandError("a folder dataset has no labels of its own: give --labels CSV with a header "
                           "filename,attr1,attr2,... and 1 where an image has the attribute.")
    wanted = names if args.attribute is None else [args.attribute]
    for name in wanted:
        if name not in names:
            raise CommandError(f"unknown attribute {name!r}; the labels have: {', '.join(names)}.")
    keep = keep[:args.num_labelled]
    labelled = torch.stack([train[i][0] for i in keep]).to(device)
    z = encode(nets, labelled)
    queries = heldout_batch(splits.heldout, args.num_queries, cfg, device)[0]
    written = []
    for name in wanted:
        vector = attribute_vector(z, labels[:len(keep), names.index(name)].to(device))
        written.append(attribute_grid(nets, queries, vector, out / f"attribute_{name}.png"))
    return written
