"""notebooks/walkthrough.ipynb runs top to bottom in a kernel from this venv, and says the right things.

The notebook is executed exactly as notebooks/execute.py executes it for the committed outputs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
WALKTHROUGH = NOTEBOOKS / "walkthrough.ipynb"


def _load_execute():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _load_execute()


def _text(nb) -> str:
    """Everything the code cells printed or returned, as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                parts.append(out["text"])
            elif out["output_type"] in ("execute_result", "display_data"):
                parts.append(out["data"].get("text/markdown", out["data"].get("text/plain", "")))
    return "\n".join(parts)


def _figures(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_kernel_is_this_venvs_python_started_in_the_given_folder(tmp_path):
    nb = new_notebook(cells=[new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())\nprint(os.environ['PROBE'])")])
    execute.run_notebook(nb, tmp_path, dict(os.environ, PROBE="passed"))
    lines = nb.cells[0].outputs[0]["text"].splitlines()
    assert Path(lines[0]).resolve() == Path(sys.executable).resolve()
    assert Path(lines[1]).resolve() == tmp_path.resolve()
    assert lines[2] == "passed"


def test_a_failing_cell_fails_the_run(tmp_path):
    from nbclient.exceptions import CellExecutionError

    nb = new_notebook(cells=[new_code_cell("print('first')"), new_code_cell("1 / 0"), new_code_cell("print('never')")])
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        execute.run_notebook(nb, tmp_path)
    assert nb.cells[2].outputs == []


def test_committed_notebook_is_executed_and_small():
    nb = nbformat.read(WALKTHROUGH, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "commit the notebook with its outputs (notebooks/execute.py)"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "outputs from one run, top to bottom"
    assert not any(out["output_type"] == "error" for c in code for out in c.outputs)
    assert WALKTHROUGH.stat().st_size < 1_000_000
    assert "/tmp/" not in _text(nb)  # nothing machine-specific printed


@pytest.mark.integration
def test_walkthrough_runs_top_to_bottom(real_data, tmp_path):
    out = tmp_path / "walkthrough.ipynb"
    nb = execute.execute_notebook(WALKTHROUGH, data_dir=real_data, out_path=out)
    text = _text(nb)

    assert f"data: {real_data}" in text  # $IMAGE_LOGREG_DATA was honoured
    assert "60,000 training images and 10,000 test images of 28x28 pixels" in text
    assert "parameters: 7850" in text
    assert "48,000 images to train on, 12,000 to validate on" in text
    tutorial_final = re.findall(r"epoch 5: .* val loss [\d.]+ acc ([\d.]+)", text)
    defaults_final = re.findall(r"epoch 3: .* val loss [\d.]+ acc ([\d.]+)", text)
    assert len(tutorial_final) == 1 and len(defaults_final) == 2  # the tutorial's 5 epochs, then the defaults' 3
    assert 0.78 <= float(tutorial_final[0]) <= 0.84  # the tutorial's run: "over 80%"
    assert float(defaults_final[1]) >= 0.91  # the defaults
    assert "predicted: 2 - two" in text  # the drawing, through the CLI's preprocessing
    accuracy = float(re.search(r"test accuracy: ([\d.]+)", text).group(1))
    assert accuracy >= 0.9
    assert f"test accuracy of the loaded model: {accuracy:.4f}" in text
    assert "identical probabilities on all 10,000 test images: True" in text
    assert "identical predictions: True" in text
    assert "8 configurations trained" in text
    best = float(re.search(r"best: .* test accuracy ([\d.]+)", text).group(1))
    assert best >= 0.9
    # samples, curves, test image, drawing, confusion matrix, weight templates, sweep
    assert _figures(nb) >= 7
    assert _text(nbformat.read(out, as_version=4)) == text  # saved with its outputs


def test_execute_saves_nothing_unless_asked(tmp_path, capsys, monkeypatch):
    nb = new_notebook(cells=[new_code_cell("x = 1 + 1\nx")])
    path = tmp_path / "small.ipynb"
    nbformat.write(nb, str(path))
    before = path.read_bytes()
    assert execute.main([str(path)]) == 0
    assert path.read_bytes() == before and "saved nowhere" in capsys.readouterr().out
    assert execute.main([str(path), "--in-place"]) == 0
    assert nbformat.read(str(path), as_version=4).cells[0].outputs[0]["data"]["text/plain"] == "2"


def test_execute_without_the_notebook_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    real = execute.importlib.util.find_spec
    monkeypatch.setattr(execute.importlib.util, "find_spec", lambda name: None if name == "nbclient" else real(name))
    assert execute.main([str(tmp_path / "any.ipynb")]) == 2
    assert "pip install -e '.[notebook]'" in capsys.readouterr().err
