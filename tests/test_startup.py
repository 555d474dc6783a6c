"""Starting fast: what each command imports (modules, not timings, which drift on shared machines).

``benchmarks/startup.py`` measures the times; these tests keep the heavy imports where they belong:
torch not at all for ``--version`` and ``--help``, torchvision only to read or fetch a dataset,
matplotlib only for figures.
"""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import train

HEAVY = ("torch", "torchvision", "matplotlib", "tqdm", "safetensors")


def imported(*argv: str, module: str = "image_logreg") -> set[str]:
    """The top-level packages ``python -X importtime -m MODULE ARGV...`` imports."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    return {name.split(".")[0] for name in names[1:]}  # the first line is the header


def test_version_and_help_import_no_torch():
    for argv in (["--version"], ["--help"], ["train", "--help"], ["predict", "--help"]):
        loaded = imported(*argv)
        assert not loaded & set(HEAVY), (argv, sorted(loaded & set(HEAVY)))


def test_importing_the_cli_imports_no_torchvision_or_matplotlib():
    code = "import sys, image_logreg.cli; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    top = {name.split(".")[0] for name in done.stdout.split()}
    assert not top & set(HEAVY), sorted(top & set(HEAVY))


def test_the_settings_import_no_array_or_image_library():
    """The run configuration and its table are plain data: --help builds every train flag from them."""
    code = "import sys, image_logreg.settings; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    top = {name.split(".")[0] for name in done.stdout.split()}
    assert not top & {*HEAVY, "numpy", "PIL"}, sorted(top & {*HEAVY, "numpy", "PIL"})


def test_the_package_still_offers_its_functions():
    """Its names are imported on first use, yet read as before."""
    import image_logreg

    assert image_logreg.TrainConfig().batch_size == 128 and callable(image_logreg.fit)
    assert set(image_logreg.__all__) <= set(dir(image_logreg))
    from image_logreg import LogisticRegression, load_split  # noqa: F401


def test_predicting_a_file_imports_no_torchvision_or_matplotlib(capsys, toy_data, tmp_path):
    run = tmp_path / "run"
    train(capsys, toy_data, run)
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[4:24, 12:16] = 255
    Image.fromarray(digit).save(tmp_path / "one.png")
    loaded = imported("predict", str(run), str(tmp_path / "one.png"))
    assert "torch" in loaded and "safetensors" in loaded
    assert not loaded & {"torchvision", "matplotlib"}, sorted(loaded & {"torchvision", "matplotlib"})
