"""The scripts in tools/ that make the README's figures."""
import csv
import json
import subprocess
import sys

from PIL import Image

from conftest import ROOT


def write_run(folder, model, fids):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": model}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "sec_per_step", "data_wait", "fid[mnist-cnn]"])
        writer.writeheader()
        for step, fid in enumerate(fids, 1):
            writer.writerow({"step": step, "sec_per_step": 1.5, "data_wait": 0.5, "fid[mnist-cnn]": fid})


def test_sample_quality_plot_reads_the_fid_at_the_seconds_spent_training(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import plot_sample_quality
    write_run(tmp_path / "a", "vaegan", ["nan", 300.0, "nan", 100.0])
    assert plot_sample_quality.fid_curve(tmp_path / "a") == ([4.0, 8.0], [300.0, 100.0])
    write_run(tmp_path / "b", "vae", ["nan", 400.0, "nan", 350.0])
    subprocess.run([sys.executable, str(ROOT / "tools" / "plot_sample_quality.py"), str(tmp_path / "a"),
                    str(tmp_path / "b"), "--out", str(tmp_path / "quality.png")], check=True)
    with Image.open(tmp_path / "quality.png") as image:
        image.verify()
