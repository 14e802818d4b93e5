#!/usr/bin/env bash
# The GPU check: on a CUDA machine, in about 8 minutes, the CUDA tests, bench.py at the paper's
# configuration (batch 64 and 256; float32, bf16, bf16 + torch.compile) and a 300-step training
# run at the paper preset; every figure into one JSON (default gpu_check.json, or $1).
# On a machine without a CUDA GPU it says so in one line and exits 0.
#
#     bash tools/gpu_check.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
python=${PYTHON:-python3}
if ! "$python" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $python cannot import torch; install the requirements first (pip install -r requirements.txt)." >&2
    exit 1
fi
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check."
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pytest -q -m cuda tests --junitxml "$work/tests.xml" | tail -3 || true
for batch in 64 256; do
    for amp in off bf16; do
        "$python" bench.py --device cuda --batch-size "$batch" --amp "$amp" --steps 10 --json "$work/bench_${amp}_${batch}.json"
    done
    "$python" bench.py --device cuda --batch-size "$batch" --amp bf16 --compile --steps 10 \
        --json "$work/bench_bf16_compile_${batch}.json"
done
"$python" main.py --dataset mnist --preset paper --max-steps 300 --device cuda --out "$work/run" | tail -3
"$python" - "$work" "$out" <<'PY'
import csv, json, pathlib, statistics, sys, xml.etree.ElementTree as ET
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
root = ET.parse(work / "tests.xml").getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
rows = list(csv.DictReader(open(work / "run" / "metrics.csv")))[10:]  # after the first steps (cuDNN's search)
step = [float(r["sec_per_step"]) for r in rows]
wait = [float(r["data_wait"]) for r in rows]
figures = {
    "tests": {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")},
    "bench": {p.stem[len("bench_"):]: json.loads(p.read_text()) for p in sorted(work.glob("bench_*.json"))},
    "training_300_steps": {"median_seconds_per_step": statistics.median(step),
                           "data_wait_share": sum(wait) / (sum(step) + sum(wait)),
                           "config": json.loads((work / "run" / "config.json").read_text())},
}
out.write_text(json.dumps(figures, indent=2))
for name, report in figures["bench"].items():
    project = report["results"]["project"]
    print(f"{name:18} project {project['seconds']:.4f} s/step, {project['share_of_matmul']:.0%} of its matmul"
          + (f", {report['fp32_over_project']:.2f}x over float32" if "fp32_over_project" in report else ""))
print(f"training: {figures['training_300_steps']['median_seconds_per_step']:.4f} s/step, data wait "
      f"{figures['training_300_steps']['data_wait_share']:.1%}; tests {figures['tests']}; all figures in {out}")
PY
