#!/usr/bin/env bash
# The GPU check, in one go: the `cuda` tests, then CPU and GPU figures from one process.
#
#   benchmarks/device_check.sh                      # from anywhere; runs in the repository root
#   OUT=/tmp/dc DATA=../shared/data PYTHON=.venv/bin/python benchmarks/device_check.sh
#
# Installs nothing: it uses the venv as it is. PYTHON and DATA are taken from the repository root.
# Without a GPU the cuda tests skip and only the cpu column is measured, so the script itself can
# be checked anywhere. It writes pytest-cuda.txt, device_speed.md and device_check.json to $OUT
# (default /tmp). Exits with pytest's status, after the figures: a failed test still gets them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data}
if [[ ! -d $DATA/MNIST/raw && -d shared/data/MNIST/raw ]]; then
    DATA=shared/data  # a copy of the checkout that carries shared/ inside it
fi
RESULTS=${OUT:-/tmp}
mkdir -p "$RESULTS"
LIMIT=${LIMIT:-240}  # seconds per step: a hung device must not eat the whole loan

echo "== machine"
date -u +%Y-%m-%dT%H:%M:%SZ
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "| cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'

echo "== tests (-m cuda)"
set +e
timeout "$LIMIT" "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m cuda tests/ \
    2>&1 | tee "$RESULTS/pytest-cuda.txt"
tests=${PIPESTATUS[0]}
set -e

# The figures are measured even when a test failed: they are what a rare GPU run is for.
echo "== speed (benchmarks/device_speed.py)"
timeout "$LIMIT" "$PYTHON" benchmarks/device_speed.py --data-dir "$DATA" --json "$RESULTS/device_check.json" \
    | tee "$RESULTS/device_speed.md"

echo "== done: tests exit status $tests; figures in $RESULTS/device_check.json"
exit "$tests"
