"""The benchmark scripts run end to end (on small subsets), so they cannot rot unnoticed."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_compare_quick_writes_the_results_table(real_data, tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "results.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--data-dir", str(real_data),
         "--out", str(out), "--json", str(tmp_path / "results.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    for row in ("one epoch, tutorial settings", "scikit-learn `LogisticRegression()`", "image-logreg `--deskew`", "fit time"):
        assert row in table
    import json

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epoch_speed"]["ratio"] > 1  # even on subsets, image-logreg's epoch is the faster one
    assert 0.5 < results["datasets"]["mnist"]["image_logreg"]["test_accuracy"] <= 1
    assert results["datasets"]["mnist"]["sklearn"]["test_accuracy"] > 0.5


def test_startup_measures_every_command(real_data, mnist_run, tmp_path):
    """The timings themselves drift with the machine's load; here the script only has to run through."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--data-dir", str(real_data), "--run", str(mnist_run),
         "--repeats", "1", "--json", str(tmp_path / "startup.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: a target missed on a busy machine
    for row in ('`python -c "import torch"`', "`image-logreg --help`", "`image-logreg --version`", "`image-logreg predict RUN one.png`"):
        assert row in done.stdout
    import json

    figures = json.loads((tmp_path / "startup.json").read_text())["figures"]
    assert all(f["median"] > 0 for f in figures.values())
