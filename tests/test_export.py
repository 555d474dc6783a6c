"""Export: the ONNX file run by onnxruntime gives image-logreg's own probabilities, preprocessing included."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, train

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOLERANCE = 1e-5
EXPORT_PAGE = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def assert_one_line_error(code, out, err, *fragments):
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("image-logreg: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def export(capsys, model, out, *extra):
    code, stdout, err = run_cli(capsys, "export", model, "--out", out, "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


def reference(run, images):
    """What image-logreg itself computes: the recorded preprocessing, then predict_proba."""
    from image_logreg.checkpoint import load_model
    from image_logreg.data import prepare_inputs

    model, meta = load_model(run)
    return model.predict_proba(prepare_inputs(torch.from_numpy(images), meta["preprocessing"])).numpy()


def onnx_probabilities(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": images})[0]


def dataset_images(data_dir):
    from image_logreg.datasets import load_split

    return load_split("mnist", data_dir, "test", download=False).images.numpy()


@pytest.fixture
def toy_runs(capsys, toy_data, tmp_path):
    plain, deskewed = tmp_path / "plain", tmp_path / "deskew"
    train(capsys, toy_data, plain)
    train(capsys, toy_data, deskewed, "--deskew")
    return {"plain": plain, "deskew": deskewed}


@pytest.mark.parametrize("kind", ["plain", "deskew"])
def test_onnx_matches_image_logreg(capsys, toy_data, toy_runs, tmp_path, kind):
    run, out = toy_runs[kind], tmp_path / f"{kind}.onnx"
    summary = export(capsys, run, out)
    assert summary["out"] == str(out) and summary["deskew"] == (kind == "deskew")
    images = dataset_images(toy_data)
    for batch in (images[:1], images[:7], images):  # the batch axis is free
        got, want = onnx_probabilities(out, batch), reference(run, batch)
        assert got.shape == want.shape == (len(batch), 10)
        assert np.abs(got - want).max() < TOLERANCE
        assert np.array_equal(got.argmax(1), want.argmax(1))


def test_onnx_graph_signature_and_metadata(capsys, toy_runs, tmp_path):
    out = tmp_path / "model.onnx"
    export(capsys, toy_runs["deskew"], out)
    graph = onnx.load(str(out))
    (inp,), (outp,) = graph.graph.input, graph.graph.output
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 28, 28]
    assert outp.name == "probabilities"
    assert [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim] == ["batch", 10]

    props = {p.key: json.loads(p.value) for p in graph.metadata_props}  # every value is JSON
    assert props["dataset"] == "mnist" and props["input_shape"] == [28, 28] and props["num_classes"] == 10
    assert props["classes"][0].startswith("0") and len(props["classes"]) == 10
    assert props["preprocessing"]["deskew"]["name"] == "moment-deskew"
    assert 0.0 <= props["metrics"]["val_accuracy"] <= 1.0
    assert {p.key: p.value for p in graph.metadata_props} == ort.InferenceSession(
        str(out), providers=["CPUExecutionProvider"]
    ).get_modelmeta().custom_metadata_map


def test_torchscript_matches_image_logreg(capsys, toy_data, toy_runs, tmp_path):
    out = tmp_path / "model.pt"
    export(capsys, toy_runs["deskew"], out, "--format", "torchscript")
    extra = {"image_logreg.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is marked deprecated, and still loads
        module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["image_logreg.json"])["dataset"] == "mnist"
    images = dataset_images(toy_data)
    for batch in (images[:1], images[:7]):
        got = module(torch.from_numpy(batch)).numpy()
        assert np.abs(got - reference(toy_runs["deskew"], batch)).max() < TOLERANCE


def test_tutorial_state_dict_exports_with_dataset(capsys, toy_data, toy_runs, tmp_path):
    from image_logreg.checkpoint import load_model

    model, _ = load_model(toy_runs["plain"])
    model.temperature = 1.0  # a state_dict holds the weights alone, not the run's calibration
    pth = tmp_path / "mnist-logistic.pth"
    torch.save(model.state_dict(), pth)
    out = tmp_path / "tutorial.onnx"
    summary = export(capsys, pth, out, "--dataset", "fashion-mnist")
    assert summary["dataset"] == "fashion-mnist"
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props["classes"][0] == "T-shirt/top" and "metrics" not in props
    images = dataset_images(toy_data)[:7]
    assert np.abs(onnx_probabilities(out, images) - model.predict_proba(torch.from_numpy(images).float() / 255).numpy()).max() < TOLERANCE


def test_refuses_unknown_format_and_existing_files(capsys, toy_runs, tmp_path):
    out = tmp_path / "model.tflite"
    code, stdout, err = run_cli(capsys, "export", toy_runs["plain"], "--out", out, "--format", "tflite")
    assert_one_line_error(code, stdout, err, "unknown export format 'tflite'", "onnx, torchscript")
    assert not out.exists()

    out = tmp_path / "model.onnx"
    out.write_bytes(b"mine")
    code, stdout, err = run_cli(capsys, "export", toy_runs["plain"], "--out", out)
    assert_one_line_error(code, stdout, err, "already exists", "--overwrite")
    assert out.read_bytes() == b"mine"
    export(capsys, toy_runs["plain"], out, "--overwrite")
    assert onnx.load(str(out)).graph.output[0].name == "probabilities"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_export_model_refuses_unknown_format_and_leaves_model_alone(toy_runs, tmp_path):
    from image_logreg.checkpoint import load_model
    from image_logreg.errors import UsageError
    from image_logreg.export import export_model

    model, meta = load_model(toy_runs["plain"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match="unknown export format"):
        export_model(model, meta, tmp_path / "m.x", "coreml")
    export_model(model, meta, tmp_path / "m.onnx", "onnx")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_readme_snippet_runs_with_numpy_and_onnxruntime_only(capsys, toy_data, toy_runs, tmp_path):
    """The export page's five lines, in a process where image_logreg and torch cannot be imported."""
    snippet = re.search(r"# Export.*?```python\n(.*?)```", EXPORT_PAGE.read_text(), re.S).group(1)
    assert len(snippet.strip().splitlines()) == 5
    export(capsys, toy_runs["plain"], tmp_path / "mnist.onnx")  # the name the export page uses
    np.save(tmp_path / "images.npy", dataset_images(toy_data)[:7])
    program = (
        "import sys\n"
        "sys.modules['image_logreg'] = sys.modules['torch'] = None  # not installed, as far as this code knows\n"
        f"import numpy as np\nimages = np.load({str(tmp_path / 'images.npy')!r})\n"
        + snippet
        + "print(labels)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    labels = eval(done.stdout)
    want = reference(toy_runs["plain"], dataset_images(toy_data)[:7]).argmax(1)
    from image_logreg.checkpoint import load_model

    classes = load_model(toy_runs["plain"])[1]["classes"]
    assert labels == [classes[i] for i in want]


@pytest.mark.integration
def test_onnx_matches_on_the_whole_mnist_test_set(capsys, mnist_run, real_data, tmp_path, record_property):
    from image_logreg.cli import main

    deskewed = tmp_path / "deskew"
    assert main(["train", "--data-dir", str(real_data), "--out", str(deskewed), "--deskew", "--quiet"]) == 0
    capsys.readouterr()
    images = dataset_images(real_data)
    assert len(images) == 10_000
    for run in (mnist_run, deskewed):
        out = tmp_path / f"{run.name}.onnx"
        export(capsys, run, out)
        got, want = onnx_probabilities(out, images), reference(run, images)
        diff = float(np.abs(got - want).max())
        record_property(f"{run.name}_max_abs_difference", diff)  # the figure the export page quotes (--junitxml)
        assert diff < TOLERANCE, diff
        assert np.array_equal(got.argmax(1), want.argmax(1))


# --- folder models: colour, and gray of other sizes ------------------------------------------

FOLDER_MODELS = {  # --image-size never square, so a swapped H and W would show
    "rgb": (True, (10, 14), []),
    "gray": (False, (12, 16), []),
    "gray-deskew": (False, (12, 16), ["--deskew"]),
}


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("kind", list(FOLDER_MODELS))
def test_folder_models_export_their_own_shape_and_match_predict(capsys, tmp_path, kind, record_property):
    """A colour folder model (uint8 N x 3 x H x W) and gray ones of a size not 28 x 28: the ONNX
    and TorchScript files take the model's own uint8 shape and give predict's probabilities."""
    from image_logreg.checkpoint import load_model
    from image_logreg.predict import prepare_file
    from test_own_images import make_folder

    color, (h, w), extra = FOLDER_MODELS[kind]
    shape = [3, h, w] if color else [h, w]
    data = make_folder(tmp_path / "data", classes=3, per_class=4, color=color, size=20)  # 20 x 20 files, fitted
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", "folder", "--data-dir", data, "--out", run,
                           "--image-size", f"{h}x{w}", "--epochs", "5", "--cache-dir", tmp_path / "cache",
                           "--quiet", "--no-download", *extra)
    assert code == 0, err
    model, meta = load_model(run)
    assert meta["input_shape"] == shape and meta["classes"] == ["class000", "class001", "class002"]

    out = tmp_path / "model.onnx"
    summary = export(capsys, run, out)
    assert summary["input"] == {"name": "input", "dtype": "uint8", "shape": ["batch", *shape]}
    assert summary["output"]["shape"] == ["batch", 3] and summary["deskew"] == bool(extra)
    graph = onnx.load(str(out))
    (inp,), (outp,) = graph.graph.input, graph.graph.output
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims(inp) == ["batch", *shape] and dims(outp) == ["batch", 3]
    props = {p.key: json.loads(p.value) for p in graph.metadata_props}
    assert props["input"] == {"name": "input", "dtype": "uint8", "shape": ["batch", *shape]}
    assert props["input_shape"] == shape and props["dataset"] == "folder" and props["classes"] == meta["classes"]
    assert props["preprocessing"]["image_files"]["color"] == ("rgb" if color else "gray")

    # The folder's own files decoded as predict decodes them, and random pixels over all of 0..255.
    files = sorted(data.rglob("*.png"))
    decoded = np.stack([prepare_file(model, meta, f) for f in files])
    noise = np.random.default_rng(0).integers(0, 256, (9, *shape), dtype=np.uint8)
    assert decoded.dtype == np.uint8 and decoded.shape == (len(files), *shape)
    code, stdout, err = run_cli(capsys, "predict", run, *files, "--top-k", "3", "--json")
    assert code == 0, err
    predicted = json.loads(stdout)
    by_predict = np.zeros((len(files), 3), dtype=np.float32)
    for row, prediction in zip(by_predict, predicted):
        for entry in prediction["top_k"]:
            row[entry["index"]] = entry["probability"]

    torchscript = tmp_path / "model.pt"
    export(capsys, run, torchscript, "--format", "torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(torchscript))

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, want in ((decoded, by_predict), (decoded[:1], by_predict[:1]), (noise, reference(run, noise))):
        for got in (session.run(["probabilities"], {"input": batch})[0], module(torch.from_numpy(batch)).numpy()):
            assert got.shape == want.shape == (len(batch), 3)
            diff = float(np.abs(got - want).max())
            assert diff < TOLERANCE, diff
            assert np.array_equal(got.argmax(1), want.argmax(1))
            worst = max(worst, diff)
    labels = [meta["classes"][i] for i in session.run(["probabilities"], {"input": decoded})[0].argmax(1)]
    assert labels == [p["label"] for p in predicted]
    record_property(f"{kind}_max_abs_difference", worst)
