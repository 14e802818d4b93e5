"""Datasets: one table, each entry a loader that returns a training and a held-out split.

MNIST, Fashion-MNIST and CIFAR-10 are held in memory as one uint8 tensor and batched by
slicing (no worker processes). CelebA and image folders are read from files by a
DataLoader with worker processes and pinned memory. Every batch reaches the model as
float images in [-1, 1] of the requested size.

MNIST never touches the network: it is read from `<data root>/MNIST/raw` when present
there, else from the gzipped copy shipped in `assets/MNIST`.
"""
from __future__ import annotations

import gzip
import os
import pickle
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SHIPPED_MNIST = Path(__file__).resolve().parent / "assets" / "MNIST"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IDX_FILES = {  # split -> (images, labels), as named by the dataset authors and torchvision
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CELEBA_FILES = ("img_align_celeba/", "list_eval_partition.txt")
CELEBA_CROP = 148  # centre crop of the 178x218 aligned faces before resizing


class DataError(Exception):
    """Data that cannot be read; the message says which files were expected and where."""


# ---------------------------------------------------------------------------
# Splits: what a loader returns
# ---------------------------------------------------------------------------

@dataclass
class TensorImages:
    """A split held in memory: uint8 images (N, C, H, W), resized per batch, and class labels (N,)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


class ImageFiles(torch.utils.data.Dataset):
    """A split read from image files: each item is (image in [-1, 1], index or -1 if unreadable).

    `labels`, when asked for: class indices (N,) (-1: the file is in no class folder) or CelebA's
    attributes (N, 40) as booleans, row i for file i."""

    def __init__(self, files: list[Path], channels: int, image_size: int, crop: int | None = None,
                 labels: torch.Tensor | None = None):
        self.files, self.channels, self.image_size, self.crop = files, channels, image_size, crop
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        """Open, centre-crop to a square (or to `crop`), resize; raises OSError if unreadable."""
        with Image.open(self.files[index]) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
        side = self.crop or min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        array = np.asarray(img, dtype=np.uint8).reshape(self.image_size, self.image_size, self.channels)
        return uint8_to_model(torch.from_numpy(array.copy()).permute(2, 0, 1))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            return self.load(index), index
        except (OSError, ValueError, SyntaxError):  # what PIL raises for corrupt or truncated files
            return torch.zeros(self.channels, self.image_size, self.image_size), -1


Split = TensorImages | ImageFiles


@dataclass(frozen=True)
class Labels:
    """What a conditional run conditions on: classes (y is one-hot) or attributes (y is +1 or -1 for
    each, CelebA's convention), by name."""
    names: tuple[str, ...]
    attributes: bool = False

    @property
    def dim(self) -> int:
        return len(self.names)

    def vectors(self, labels: torch.Tensor) -> torch.Tensor:
        """A split's labels (class indices (N,), or attribute booleans (N, dim)) -> float label vectors y (N, dim)."""
        if self.attributes:
            return labels.float() * 2 - 1
        return F.one_hot(labels.long(), self.dim).float()


@dataclass
class Splits:
    train: Split
    heldout: Split  # the test split where the dataset has one
    channels: int
    labels: Labels | None = None  # when asked for: what the splits' labels name


def uint8_to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the networks see."""
    return images.float().div(127.5).sub(1.0)


def model_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded: an image as a file would hold it."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Float (N, C, H, W) -> (N, C, image_size, image_size), bilinear with antialiasing."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


# ---------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as a uint8 array; DataError if it is not one."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
            raise ValueError("not an IDX file of unsigned bytes")
        ndim = raw[3]
        shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"holds {data.size} values where its header promises {int(np.prod(shape))}")
        return data.reshape(shape)
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as error:
        raise DataError(
            f"{path} is corrupt or truncated ({error}). Delete it and supply a good copy "
            "(the dataset's original .gz or the unpacked file), or use another --data-root."
        ) from error


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """Paths of the four IDX files in `folder` (unpacked or .gz), or None if any is missing."""
    found = {}
    for name in (n for pair in IDX_FILES.values() for n in pair):
        candidates = [folder / name, folder / f"{name}.gz"]
        present = [p for p in candidates if p.is_file()]
        if not present:
            return None
        found[name] = present[0]
    return found


def load_idx_splits(files: dict[str, Path]) -> Splits:
    """Train and test images of an MNIST-format dataset as (N, 1, 28, 28) uint8 tensors, with labels."""
    def split(name: str) -> TensorImages:
        images, labels = (torch.from_numpy(read_idx(files[f]).copy()) for f in IDX_FILES[name])
        if len(images) != len(labels):
            raise DataError(f"{files[IDX_FILES[name][0]]} holds {len(images)} images but its label file "
                            f"{len(labels)} labels; replace both with matching copies.")
        return TensorImages(images.unsqueeze(1), labels.long())

    return Splits(split("train"), split("test"), channels=1)


def expected_idx_message(dataset: str, folder: Path) -> str:
    names = ", ".join(n for pair in IDX_FILES.values() for n in pair)
    return f"{dataset} needs the files {names} (each may end in .gz) in {folder}."


def load_mnist(root: Path, say: Callable[[str], None], **_: object) -> Splits:
    files = find_idx_files(root / "MNIST" / "raw")
    if files is None:
        files = find_idx_files(SHIPPED_MNIST)
        if files is None:
            raise DataError(
                f"MNIST was found neither in {root / 'MNIST' / 'raw'} nor in the copy shipped with this tool "
                f"({SHIPPED_MNIST}). {expected_idx_message('MNIST', root / 'MNIST' / 'raw')} "
                "Restore the shipped copy with `git checkout assets/MNIST`, or put the files there.")
        say(f"note: no MNIST in {root / 'MNIST' / 'raw'}; using the copy shipped with the tool ({SHIPPED_MNIST})")
    return load_idx_splits(files)


def load_fashion_mnist(root: Path, **_: object) -> Splits:
    folder = root / "FashionMNIST" / "raw"
    files = find_idx_files(folder)
    if files is None:
        download("Fashion-MNIST", root, lambda: torchvision_dataset("FashionMNIST", root),
                 expected_idx_message("Fashion-MNIST", folder))
        files = find_idx_files(folder)
    return load_idx_splits(files)


# ---------------------------------------------------------------------------
# Downloads through torchvision
# ---------------------------------------------------------------------------

def torchvision_dataset(name: str, root: Path, **kwargs: object) -> object:
    """Construct torchvision.datasets.<name>(root, download=True, ...) (downloads if needed)."""
    import torchvision
    return getattr(torchvision.datasets, name)(str(root), download=True, **kwargs)


def download(dataset: str, root: Path, fetch: Callable[[], object], expected: str) -> object:
    """Run `fetch` (a torchvision download); any failure becomes one clear DataError."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the data root {root} ({error.strerror}); choose a writable --data-root.") from error
    if not os.access(root, os.W_OK):
        raise DataError(f"the data root {root} is not writable, so {dataset} cannot be downloaded into it; "
                        "choose a writable --data-root or put the files there yourself.")
    print(f"{dataset} is not in {root}; downloading it (once)...", flush=True)
    try:
        return fetch()
    except Exception as error:  # network, mirror or checksum failure: all end the same way
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise DataError(
            f"could not download {dataset} ({reason}). {expected} Download them on a machine with "
            f"internet access and copy them there, then run the same command again."
        ) from error


def read_cifar_batches(folder: Path, names: list[str]) -> TensorImages:
    """Images (N, 3, 32, 32) and labels from CIFAR-10's pickled python batches."""
    images, labels = [], []
    for name in names:
        try:
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
        except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as error:
            raise DataError(f"{folder / name} is missing, corrupt or not a CIFAR-10 batch ({error}). Delete "
                            f"{folder} and run again to download it, or unpack cifar-10-python.tar.gz there.") from error
    return TensorImages(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long))


def load_cifar10(root: Path, **_: object) -> Splits:
    folder = root / "cifar-10-batches-py"
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    if not all((folder / name).is_file() for name in train_names + ["test_batch"]):
        download("CIFAR-10", root, lambda: torchvision_dataset("CIFAR10", root),
                 f"CIFAR-10 needs cifar-10-python.tar.gz unpacked as {folder}/ (data_batch_1..5, test_batch).")
    return Splits(read_cifar_batches(folder, train_names), read_cifar_batches(folder, ["test_batch"]), channels=3)


# ---------------------------------------------------------------------------
# File datasets (CelebA, folders)
# ---------------------------------------------------------------------------

def load_celeba(root: Path, image_size: int, labels: bool = False, **_: object) -> Splits:
    folder = root / "celeba"
    expected = (f"CelebA needs the aligned images in {folder / 'img_align_celeba'}/ and the split list "
                f"{folder / 'list_eval_partition.txt'} (both from the CelebA website's 'Align&Cropped Images' "
                "and 'Eval' folders; Google Drive often refuses automatic downloads).")
    if not all((folder / name).exists() for name in CELEBA_FILES):
        download("CelebA", root, lambda: torchvision_dataset("CelebA", root, split="all"), expected)
    splits: dict[str, list[Path]] = {"0": [], "1": [], "2": []}  # train, valid, test
    try:
        for line in (folder / "list_eval_partition.txt").read_text().split("\n"):
            if line.strip():
                name, part = line.split()
                splits[part].append(folder / "img_align_celeba" / name)
    except (ValueError, KeyError, OSError) as error:
        raise DataError(f"{folder / 'list_eval_partition.txt'} is not CelebA's split list ({error}). {expected}") from error
    if not splits["0"] or not splits["2"]:
        raise DataError(f"{folder / 'list_eval_partition.txt'} lists no training or no test images. {expected}")
    if not labels:
        return Splits(ImageFiles(splits["0"], 3, image_size, CELEBA_CROP),
                      ImageFiles(splits["2"], 3, image_size, CELEBA_CROP), channels=3)
    (names, train), (_, heldout) = (attribute_files(root, splits[part], image_size) for part in ("0", "2"))
    return Splits(train, heldout, channels=3, labels=Labels(tuple(names), attributes=True))


def attribute_files(root: Path, files: list[Path], image_size: int) -> tuple[list[str], ImageFiles]:
    """The attribute names and a split of those `files` that CelebA's attribute list labels."""
    names, attributes, keep = celeba_attributes(root, files)
    return names, ImageFiles([files[i] for i in keep], 3, image_size, CELEBA_CROP, attributes)


def celeba_attributes(root: Path, files: list[Path]) -> tuple[list[str], torch.Tensor, list[int]]:
    """CelebA's 40 attribute names, a (N, 40) boolean tensor, and which of `files` they label."""
    path = root / "celeba" / "list_attr_celeba.txt"
    try:
        lines = path.read_text().split("\n")
        names = lines[1].split()
        table = {parts[0]: [value == "1" for value in parts[1:]] for parts in (line.split() for line in lines[2:]) if parts}
    except (OSError, IndexError) as error:
        raise DataError(f"cannot read CelebA's attribute list {path} ({error}); put list_attr_celeba.txt from the "
                        "CelebA website's 'Anno' folder there.") from None
    keep = [i for i, f in enumerate(files) if f.name in table]
    return names, torch.tensor([table[files[i].name] for i in keep]), keep


def find_images(folder: Path) -> list[Path]:
    """Every image file (by extension) in `folder` and the folders below it, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def folder_classes(root: Path, files: list[Path]) -> tuple[tuple[str, ...], torch.Tensor]:
    """The class names (the sub-folders of `root` that hold images, sorted) and each file's class
    index, -1 for a file directly in `root`."""
    tops = [f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else None for f in files]
    names = tuple(sorted({top for top in tops if top is not None}))
    return names, torch.tensor([names.index(top) if top is not None else -1 for top in tops], dtype=torch.long)


def load_folder(root: Path, image_size: int, channels: int, labels: bool = False, **_: object) -> Splits:
    if not root.is_dir():
        raise DataError(f"the image folder {root} does not exist; point --data-root at a folder of images "
                        f"({', '.join(IMAGE_EXTENSIONS)}), searched recursively.")
    try:
        files = find_images(root)
    except OSError as error:
        raise DataError(f"cannot read the image folder {root} ({error.strerror}); check its permissions.") from error
    if not files:
        raise DataError(f"the image folder {root} holds no images: looked for {', '.join(IMAGE_EXTENSIONS)} "
                        "in it and every folder below; point --data-root at the folder that holds them.")
    every = ImageFiles(files, channels, image_size)
    if not any(every[i][1] >= 0 for i in range(len(files))):
        raise DataError(f"none of the {len(files)} image files in {root} could be read (all corrupt or "
                        "not images); check the files or point --data-root elsewhere.")
    every = range(len(files))
    heldout = [i for i in every if i % 20 == 0] if len(files) >= 20 else list(every)  # or all of a tiny folder
    train = [i for i in every if i % 20] if len(files) >= 20 else list(every)
    names, classes = folder_classes(root, files) if labels else ((), None)
    train, heldout = (ImageFiles([files[i] for i in part], channels, image_size,
                                 labels=classes[part] if labels else None) for part in (train, heldout))
    return Splits(train, heldout, channels, Labels(names) if labels else None)


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable[..., Splits]
    channels: int | None  # None: chosen with --channels
    description: str
    classes: int | None = None  # class labels 0..classes-1, if it has them
    domain_classifier: bool = False  # evaluate.py trains a classifier on it to score samples
    label_classifier: bool = False  # evaluate.py trains a classifier of its labels to score conditional samples


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(load_mnist, 1, "MNIST digits, 60k/10k, shipped with the tool", 10, domain_classifier=True,
                         label_classifier=True),
    "fashion-mnist": DatasetSpec(load_fashion_mnist, 1, "Fashion-MNIST, 60k/10k, downloaded on first use", 10,
                                 domain_classifier=True, label_classifier=True),
    "cifar10": DatasetSpec(load_cifar10, 3, "CIFAR-10, 50k/10k, downloaded on first use", 10),
    "celeba": DatasetSpec(load_celeba, 3, "CelebA aligned faces, 163k/20k, files under <data root>/celeba",
                          label_classifier=True),
    "folder": DatasetSpec(load_folder, None, "every image below --data-root; every 20th is held out"),
}


def load_dataset(name: str, root: str | Path, image_size: int, channels: int = 1,
                 say: Callable[[str], None] = print, labels: bool = False) -> Splits:
    """Load a dataset from the table; DataError if its files are missing or broken, or if the data
    root is a file. `say` prints a note (the bundled MNIST used instead of the data root's).
    `labels`: also what a conditional run conditions on (Splits.labels, and the file splits' labels)."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-root {root} is a file; give the folder that holds the dataset (or, for "
                        "--dataset folder, the folder of images).")
    spec = DATASETS[name]
    splits = spec.load(root=root, image_size=image_size, channels=channels, say=say, labels=labels)
    if labels and spec.classes:
        splits.labels = Labels(tuple(str(c) for c in range(spec.classes)))
    return splits


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------

def drop_unreadable(images: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Remove the placeholder rows of unreadable files; returns (images, how many were dropped)."""
    readable = indices >= 0
    return images[readable], int((~readable).sum())


class Batches:
    """Shuffled training batches of one epoch, reproducible from (seed, epoch).

    Under torchrun each of the `world_size` processes gets its own disjoint shard of every
    epoch (torch's DistributedSampler: every world_size-th index of the epoch's permutation).
    Yields (images in [-1, 1] on `device`, their label vectors y or None, number of unreadable
    files skipped); y is given for `labels` (a conditional run).
    """

    def __init__(self, split: Split, batch_size: int, image_size: int, device: torch.device,
                 seed: int, num_workers: int = 2, rank: int = 0, world_size: int = 1, labels: Labels | None = None):
        self.split, self.batch_size, self.image_size = split, batch_size, image_size
        self.device, self.num_workers = device, num_workers
        self.vectors = labels.vectors(split.labels).to(device) if labels is not None else None
        # Every process gets as many images as the others (drop_last), so all take the same number of steps.
        self.sampler = torch.utils.data.DistributedSampler(split, num_replicas=world_size, rank=rank, shuffle=True,
                                                           seed=seed * 1_000_003, drop_last=True)
        # An in-memory set lives where training runs, so batching is one indexing operation.
        self.images = split.images.to(device) if isinstance(split, TensorImages) else None

    def __len__(self) -> int:
        return self.sampler.num_samples // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        """This process's indices for `epoch`, in the order it trains on them."""
        self.sampler.set_epoch(epoch)
        return torch.tensor(list(self.sampler), dtype=torch.long)

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor | None:
        return self.vectors[indices.to(self.device)] if self.vectors is not None else None

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """The batches of `epoch` from batch number `start` on (to resume inside an epoch)."""
        order = self.order(epoch)[start * self.batch_size: len(self) * self.batch_size]
        if self.images is not None:
            for indices in order.to(self.device).split(self.batch_size):
                yield resize(uint8_to_model(self.images[indices]), self.image_size), self.labels_of(indices), 0
            return
        loader = torch.utils.data.DataLoader(
            self.split, batch_size=self.batch_size, sampler=order.tolist(), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", worker_init_fn=ignore_stop_signals,
            generator=torch.Generator().manual_seed(epoch),  # keeps the global RNG untouched, for exact resume
        )
        for images, indices in loader:
            images, dropped = drop_unreadable(images, indices)
            yield images.to(self.device, non_blocking=True), self.labels_of(indices[indices >= 0]), dropped


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the training process, which stops after its step
    (torchrun and terminals signal the whole process group, workers included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def labelled_images(split: Split, count: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `count` readable images of a split in [-1, 1], and their labels (None where the split has none)."""
    if isinstance(split, TensorImages):
        return resize(uint8_to_model(split.images[:count].cpu()), image_size), split.labels[:count]
    items = [(img, index) for img, index in (split[i] for i in range(min(len(split), 4 * count))) if index >= 0][:count]
    if not items:
        return torch.zeros(0, split.channels, image_size, image_size), None
    labels = split.labels[[index for _, index in items]] if split.labels is not None else None
    return torch.stack([img for img, _ in items]), labels
