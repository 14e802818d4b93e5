import gzip
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from conftest import ROOT, write_idx, write_images


def tiny_idx_dataset(folder, n_train=70, n_test=20, gz=False):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = data.IDX_FILES[split]
        write_idx(folder / images_name, rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / labels_name, rng.integers(0, 10, (n,)))
    if gz:
        for path in list(folder.iterdir()):
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()


def test_mnist_reads_the_shipped_copy_when_the_data_root_has_none(tmp_path):
    splits = data.load_dataset("mnist", tmp_path / "empty", image_size=32)
    assert splits.train.images.shape == (60000, 1, 28, 28)
    assert splits.heldout.images.shape == (10000, 1, 28, 28)
    assert splits.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert abs(splits.train.images.float().mean().item() / 255 - 0.1307) < 1e-3
    assert not (tmp_path / "empty").exists()  # nothing downloaded or created


def test_shipped_mnist_equals_the_real_files(real_data):
    shipped = data.load_idx_splits(data.find_idx_files(data.SHIPPED_MNIST))
    real = data.load_dataset("mnist", real_data, image_size=28)
    assert torch.equal(shipped.train.images, real.train.images)
    assert torch.equal(shipped.heldout.labels, real.heldout.labels)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_in_the_data_root_wins_over_the_shipped_copy(tmp_path, gz):
    tiny_idx_dataset(tmp_path / "MNIST" / "raw", gz=gz)
    splits = data.load_dataset("mnist", tmp_path, image_size=32)
    assert len(splits.train) == 70 and len(splits.heldout) == 20


def test_fashion_mnist_reads_idx_files(tmp_path):
    tiny_idx_dataset(tmp_path / "FashionMNIST" / "raw", gz=True)
    splits = data.load_dataset("fashion-mnist", tmp_path, image_size=16)
    assert splits.channels == 1 and len(splits.train) == 70


@pytest.mark.parametrize("damage", ["truncated", "not idx", "bad gzip"])
def test_corrupt_idx_file_is_a_clear_error(tmp_path, damage):
    folder = tmp_path / "MNIST" / "raw"
    tiny_idx_dataset(folder)
    victim = folder / "t10k-images-idx3-ubyte"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:500])
    elif damage == "not idx":
        victim.write_text("hello")
    else:
        victim.unlink()
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(data.DataError, match="corrupt or truncated"):
        data.load_dataset("mnist", tmp_path, image_size=32)


@pytest.mark.parametrize("dataset, names", [
    ("fashion-mnist", "train-images-idx3-ubyte"),
    ("cifar10", "cifar-10-batches-py"),
    ("celeba", "img_align_celeba"),
])
def test_failed_download_names_the_files_and_where(tmp_path, dataset, names):
    """A real download attempt: this machine has no internet, so it fails."""
    try:
        data.load_dataset(dataset, tmp_path, image_size=32)
    except data.DataError as error:
        message = str(error)
    else:
        pytest.skip("the download succeeded: this machine has internet access")
    assert "could not download" in message and names in message and str(tmp_path) in message


def test_cifar10_reads_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(range(4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    splits = data.load_dataset("cifar10", tmp_path, image_size=32)
    assert splits.train.images.shape == (20, 3, 32, 32) and splits.heldout.labels.tolist() == [0, 1, 2, 3]


def test_celeba_reads_aligned_images_and_the_split_list(tmp_path):
    folder = tmp_path / "celeba"
    files = write_images(folder / "img_align_celeba", 6, size=(178, 218), suffix=".jpg")
    parts = ["0", "0", "0", "0", "1", "2"]
    (folder / "list_eval_partition.txt").write_text("".join(f"{f.name} {p}\n" for f, p in zip(files, parts)))
    splits = data.load_dataset("celeba", tmp_path, image_size=32)
    assert len(splits.train) == 4 and len(splits.heldout) == 1
    image, index = splits.train[0]
    assert image.shape == (3, 32, 32) and index == 0


def test_folder_dataset_reads_nested_images_and_holds_out_every_20th(tmp_path):
    write_images(tmp_path / "a", 30, suffix=".png")
    write_images(tmp_path / "b" / "c", 10, suffix=".jpg", mode="L")
    (tmp_path / "notes.txt").write_text("not an image")
    splits = data.load_dataset("folder", tmp_path, image_size=16, channels=3)
    assert len(splits.train) + len(splits.heldout) == 40 and len(splits.heldout) == 2
    assert not set(splits.train.files) & set(splits.heldout.files)
    image, _ = splits.heldout[0]
    assert image.shape == (3, 16, 16) and -1 <= image.min() and image.max() <= 1
    grey = data.load_dataset("folder", tmp_path, image_size=16, channels=1)
    assert grey.train[0][0].shape == (1, 16, 16)


def test_non_square_images_are_centre_cropped(tmp_path):
    from PIL import Image
    array = np.zeros((10, 30), dtype=np.uint8)
    array[:, 10:20] = 255  # white centre square, black sides
    Image.fromarray(array, "L").save(tmp_path / "wide.png")
    image, _ = data.load_dataset("folder", tmp_path, image_size=10, channels=1).train[0]
    assert image.min() > 0.9  # only the white centre survived the crop


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"),
    ("empty", "holds no images"),
    ("all corrupt", "could be read"),
])
def test_folder_errors(tmp_path, case, words):
    root = tmp_path / "images"
    if case != "missing":
        root.mkdir()
    if case == "all corrupt":
        for i in range(3):
            (root / f"{i}.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(data.DataError, match=words):
        data.load_dataset("folder", root, image_size=16, channels=3)


def test_unreadable_images_are_skipped_in_batches(tmp_path):
    files = write_images(tmp_path, 8)
    files[3].write_bytes(files[3].read_bytes()[:60])  # truncated PNG
    files[5].write_bytes(b"garbage")
    splits = data.load_dataset("folder", tmp_path, image_size=16, channels=3)
    batches = data.Batches(splits.train, 4, 16, torch.device("cpu"), seed=0, num_workers=0)
    seen = list(batches.epoch(1))
    assert sum(d for _, _, d in seen) == 2
    assert sum(len(x) for x, _, _ in seen) == 6


def test_in_memory_batches_are_shuffled_reproducibly_and_cover_the_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 16, 16).contiguous()
    split = data.TensorImages(images, torch.zeros(10, dtype=torch.long))
    batches = data.Batches(split, 3, 16, torch.device("cpu"), seed=7)
    assert len(batches) == 3  # the last partial batch is dropped

    def pixels(epoch):
        return [x[:, 0, 0, 0] for x, _, _ in batches.epoch(epoch)]

    first = torch.cat(pixels(1))
    assert len(first.unique()) == 9 and first.min() >= -1 and first.max() <= 1
    assert all(x.shape == (3, 1, 16, 16) for x, _, _ in batches.epoch(1))
    assert torch.equal(first, torch.cat(pixels(1)))          # same seed and epoch: same order
    assert not torch.equal(first, torch.cat(pixels(2)))      # next epoch: reshuffled


def test_processes_get_disjoint_equal_shards_reshuffled_each_epoch(tmp_path):
    images = torch.arange(21, dtype=torch.uint8).view(21, 1, 1, 1).expand(21, 1, 16, 16).contiguous()
    split = data.TensorImages(images, torch.zeros(21, dtype=torch.long))
    shards = [data.Batches(split, 3, 16, torch.device("cpu"), seed=7, rank=rank, world_size=2) for rank in (0, 1)]
    assert [len(b) for b in shards] == [3, 3]  # 10 images each (one dropped), 3 batches of 3

    def seen(batches, epoch):
        return torch.cat([x[:, 0, 0, 0] for x, _, _ in batches.epoch(epoch)]).tolist()

    first = [seen(b, 1) for b in shards]
    assert len(set(first[0])) == len(set(first[1])) == 9 and not set(first[0]) & set(first[1])
    assert first == [seen(b, 1) for b in shards]                                  # reproducible
    assert [set(seen(b, 2)) for b in shards] != [set(s) for s in first]           # reshuffled across processes
    # A process resuming at batch 2 gets the rest of its own shard.
    rest = [x for x, _, _ in shards[1].epoch(1, start=2)]
    assert len(rest) == 1 and rest[0][:, 0, 0, 0].tolist() == first[1][6:]
    # Image files: the same sampler decides each process's files.
    write_images(tmp_path, 8)
    files = data.load_dataset("folder", tmp_path, image_size=16, channels=3).train
    orders = [data.Batches(files, 2, 16, torch.device("cpu"), seed=0, num_workers=0, rank=r, world_size=2).order(1)
              for r in (0, 1)]
    assert len(orders[0]) == len(orders[1]) and not set(orders[0].tolist()) & set(orders[1].tolist())


def test_resize_and_unit_range():
    images = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    out = data.resize(data.uint8_to_model(images), 32)
    assert out.shape == (2, 1, 32, 32) and torch.allclose(out, torch.ones_like(out))
    assert data.uint8_to_model(torch.zeros(1, dtype=torch.uint8)).item() == -1.0


def test_celeba_attribute_list(tmp_path):
    folder = tmp_path / "celeba"
    folder.mkdir()
    (folder / "list_attr_celeba.txt").write_text(
        "3\nSmiling Eyeglasses\n000001.jpg  1 -1\n000002.jpg -1  1\n000003.jpg  1  1\n")
    files = [folder / "img_align_celeba" / name for name in ("000003.jpg", "missing.jpg", "000001.jpg")]
    names, labels, keep = data.celeba_attributes(tmp_path, files)
    assert names == ["Smiling", "Eyeglasses"] and keep == [0, 2]
    assert labels.tolist() == [[True, True], [True, False]]


def test_loader_workers_leave_stop_signals_to_the_training_process():
    # torchrun and terminals signal a whole process group; a loader worker must not die of it.
    code = ("import os, signal, data; data.ignore_stop_signals(0); "
            "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGINT); print('alive')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "alive", result.stderr


def test_conditional_batches_carry_each_image_s_label_vector():
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 1, 16, 16).contiguous()
    split = data.TensorImages(images, torch.arange(12) % 3)
    labels = data.Labels(("a", "b", "c"))
    batches = data.Batches(split, 4, 16, torch.device("cpu"), seed=1, labels=labels)
    for x, y, dropped in batches.epoch(1):
        index = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()  # the pixel value is the image's index
        assert torch.equal(y, torch.nn.functional.one_hot(index % 3, 3).float()) and dropped == 0
    assert all(y is None for _, y, _ in data.Batches(split, 4, 16, torch.device("cpu"), seed=1).epoch(1))
    attributes = data.Labels(("Smiling", "Male"), attributes=True)
    assert attributes.vectors(torch.tensor([[True, False]])).tolist() == [[1.0, -1.0]]


def test_a_folder_s_classes_are_its_sub_folders_and_reach_the_batches(tmp_path):
    for index, name in enumerate(("cats", "dogs")):
        write_images(tmp_path / name, 12, size=(20, 20), seed=index)
    (tmp_path / "dogs" / "img_0003.png").write_bytes(b"broken")
    splits = data.load_dataset("folder", tmp_path, image_size=16, channels=3, labels=True)
    assert splits.labels == data.Labels(("cats", "dogs"))
    assert splits.train.labels.tolist() == [0 if f.parent.name == "cats" else 1 for f in splits.train.files]
    batches = data.Batches(splits.train, 4, 16, torch.device("cpu"), seed=0, num_workers=0, labels=splits.labels)
    seen = list(batches.epoch(1))
    assert [len(x) for x, _, _ in seen] == [len(y) for _, y, _ in seen]  # the unreadable file's label left out too
    assert sum(len(x) + dropped for x, _, dropped in seen) == len(batches) * 4
    assert data.load_dataset("folder", tmp_path, image_size=16, channels=3).labels is None  # only when asked
