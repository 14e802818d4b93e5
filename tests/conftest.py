"""Shared test helpers: the real-data location and tiny image files."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
TINY = ["--image-size", "16", "--width", "0.125", "--latent-dim", "8", "--batch-size", "16"]  # a run of seconds


def run_cli(*args, cwd=None, timeout=600, env=None):
    """python3 main.py ARGS, as a user types it (`env`: variables to set on top of this process's)."""
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny vaegan and a tiny gan checkpoint, trained a few steps on MNIST."""
    folder = tmp_path_factory.mktemp("runs")
    made = {}
    for model in ("vaegan", "gan"):
        made[model] = folder / model
        result = run_cli("--model", model, "--out", str(made[model]), "--max-steps", "3", *TINY)
        assert result.returncode == 0, result.stderr
    return made


@pytest.fixture(scope="session", params=["first", "every"], ids=["label-first-layer", "label-every-layer"])
def tiny_conditional_run(tmp_path_factory, request) -> Path:
    """A tiny --conditional vaegan checkpoint (the label at each network's first layer, or at every
    layer), trained a few steps on MNIST."""
    run = tmp_path_factory.mktemp("runs") / "conditional"
    result = run_cli("--conditional", "--label-layers", request.param, "--out", str(run), "--max-steps", "3", *TINY)
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture
def real_data() -> Path:
    """../shared/data as exported by .ci/run in VAEGAN_DATA; tests that need it skip without it."""
    location = os.environ.get("VAEGAN_DATA")
    if not location:
        pytest.skip("VAEGAN_DATA is not set (it names the folder that holds MNIST/raw, e.g. ../shared/data)")
    path = Path(location)
    if not (path / "MNIST" / "raw").is_dir():
        pytest.skip(f"VAEGAN_DATA={location} holds no MNIST/raw folder")
    return path


def write_images(folder: Path, count: int, size=(40, 30), mode="RGB", suffix=".png", seed=0) -> list[Path]:
    """`count` random images of `size` (width, height) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        path = folder / f"img_{i:04d}{suffix}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, as MNIST ships them."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def writable_mnist_root(tmp_path_factory) -> Path:
    """A writable data root whose MNIST is the real one (../shared/data is read-only in CI), with
    the evaluation classifier trained and cached beside it once per test session."""
    location = os.environ.get("VAEGAN_DATA")
    if not location or not (Path(location) / "MNIST" / "raw").is_dir():
        pytest.skip("VAEGAN_DATA is not set to a folder holding MNIST/raw (e.g. ../shared/data)")
    root = tmp_path_factory.mktemp("data")
    (root / "MNIST").mkdir()
    (root / "MNIST" / "raw").symlink_to(Path(location).resolve() / "MNIST" / "raw")
    evaluate.cached_classifier("mnist", root)  # here, with no time limit, rather than in a command's first test
    return root
