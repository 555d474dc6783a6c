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


# --- --image-input: gray images of any size, made digits inside the graph as predict makes files ---


def gray_pixels(path) -> np.ndarray:
    """A file's gray uint8 pixels as the export page reads them with Pillow: upright, transparency over white."""
    from PIL import Image, ImageOps

    picture = ImageOps.exif_transpose(Image.open(path)).convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", picture.size, "white"), picture).convert("L"))


def predicted_probabilities(run, paths) -> np.ndarray:
    """``N x K``: what image-logreg predict gives each file (prepare_image, then the model)."""
    from image_logreg.checkpoint import load_model
    from image_logreg.predict import predict_file

    model, meta = load_model(run)
    rows = np.zeros((len(paths), model.num_classes), dtype=np.float32)
    for row, path in zip(rows, paths):
        for entry in predict_file(model, meta, path, k=model.num_classes)[0]["top_k"]:
            row[entry["index"]] = entry["probability"]
    return rows


def image_input_probabilities(run_one, paths) -> np.ndarray:
    """``N x K``: the exported file's answer for each file's gray pixels, one image at a time (any size)."""
    return np.concatenate([run_one(gray_pixels(path)[None]) for path in paths])


def agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """The share of rows with the same top-1 class, and the share whose probabilities all agree within TOLERANCE."""
    return float(np.mean(got.argmax(1) == want.argmax(1))), float(np.mean(np.abs(got - want).max(1) < TOLERANCE))


def user_style_files(images, folder, seed=0):
    from user_digits import write_user_digit_set

    return write_user_digit_set(images, folder, seed=seed)


def test_image_input_gives_predicts_answers_for_user_style_files(capsys, toy_data, toy_runs, tmp_path, record_property):
    """Toy digits drawn as users bring them (dark ink on uneven paper, 3-12x larger, off-centre; grey,
    colour and transparent PNG and JPEG), fed as their gray pixels: the ONNX files (and the
    TorchScript file, whose JIT is slower, on a few) answer as ``image-logreg predict`` answers for
    the files. Measured: every file, top-1 and every probability within 1e-5 (the graph makes the
    very pixels prepare_image makes); the thresholds leave room for a pixel that another
    onnxruntime rounds the other way."""
    paths = user_style_files(dataset_images(toy_data)[:12], tmp_path / "files")
    for kind, run in toy_runs.items():
        summary = export(capsys, run, tmp_path / f"{kind}.onnx", "--image-input")
        assert summary["image_input"] is True and summary["deskew"] == (kind == "deskew")
        assert summary["input"] == {"name": "image", "dtype": "uint8", "shape": ["batch", "height", "width"]}
        assert summary["output"] == {"name": "probabilities", "shape": ["batch", 10]}
        session = ort.InferenceSession(str(tmp_path / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
        got = image_input_probabilities(lambda image: session.run(["probabilities"], {"image": image})[0], paths)
        top1, close = agreement(got, predicted_probabilities(run, paths))
        record_property(f"{kind}_onnx_top1_agreement", top1)
        assert top1 >= 0.9 and close >= 0.8, (kind, top1, close)

    export(capsys, toy_runs["deskew"], tmp_path / "deskew.pt", "--image-input", "--format", "torchscript")
    extra = {"image_logreg.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(tmp_path / "deskew.pt"), _extra_files=extra)
    assert json.loads(extra["image_logreg.json"])["input"]["name"] == "image"
    few = paths[:4]  # one of each kind of file
    got = image_input_probabilities(lambda image: module(torch.from_numpy(image.copy())).numpy(), few)
    top1, close = agreement(got, predicted_probabilities(toy_runs["deskew"], few))
    assert top1 == 1.0 and close >= 0.75, (top1, close)


def test_image_input_graph_signature_batches_blank_pages_and_dataset_samples(capsys, toy_data, toy_runs, tmp_path):
    """Height and width are free, images of one size share a batch, a blank page gets a NaN row
    (predict refuses it: no ink), and a 28 x 28 dataset sample is taken as it is, as predict takes it."""
    out = tmp_path / "image.onnx"
    export(capsys, toy_runs["plain"], out, "--image-input")
    graph = onnx.load(str(out))
    (inp,), (outp,) = graph.graph.input, graph.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims(inp) == ["batch", "height", "width"] and dims(outp) == ["batch", 10]
    props = {p.key: json.loads(p.value) for p in graph.metadata_props}
    assert props["input"] == {"name": "image", "dtype": "uint8", "shape": ["batch", "height", "width"]}
    assert props["input_shape"] == [28, 28] and props["preprocessing"]["image_files"]["name"] == "mnist-normalize"

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    def run_one(image):
        return session.run(["probabilities"], {"image": image})[0]

    (path,) = user_style_files(dataset_images(toy_data)[:1], tmp_path / "files")
    page = gray_pixels(path)
    blank = np.full_like(page, 236)
    batch = np.stack([page, 255 - page, np.roll(page, (7, -5), axis=(0, 1)), blank])
    together = run_one(batch)
    alone = np.concatenate([run_one(image[None]) for image in batch])
    assert np.isnan(together[3]).all() and np.isfinite(together[:3]).all()
    assert np.abs(together[:3] - alone[:3]).max() < TOLERANCE
    assert np.allclose(together[:3].sum(1), 1.0, atol=1e-5)
    from PIL import Image

    from image_logreg.errors import ImageError
    from image_logreg.preprocess import prepare_image

    Image.fromarray(blank).save(tmp_path / "blank.png")
    with pytest.raises(ImageError, match="blank"):  # where predict refuses the file
        prepare_image(tmp_path / "blank.png")

    from conftest import class_pattern

    clean = np.stack([class_pattern(k) for k in range(5)]).astype(np.uint8) * 255  # white on black: kept as they are
    assert np.abs(run_one(clean) - reference(toy_runs["plain"], clean)).max() < TOLERANCE
    noisy = dataset_images(toy_data)[:5]  # their gray border is no dataset's: made digits, by predict too
    files = [tmp_path / f"sample{i}.png" for i in range(len(noisy))]
    for image, file in zip(noisy, files):
        Image.fromarray(image).save(file)
    assert np.abs(run_one(noisy) - predicted_probabilities(toy_runs["plain"], files)).max() < TOLERANCE
    for shape in ((1, 1), (3, 500), (500, 2)):  # no ink to find, and no error either
        assert np.isnan(run_one(np.full((1, *shape), 255, np.uint8))).all()


def test_image_input_is_refused_for_a_model_that_decodes_files_as_its_dataset(capsys, toy_runs, tmp_path):
    """A folder, CSV or CIFAR model's files are resized as its dataset's own were, not made digits:
    the graph would feed it what it never saw."""
    from image_logreg.checkpoint import load_model, save_model
    from image_logreg.data import preprocessing_for

    model, meta = load_model(toy_runs["plain"])
    decode = {"image_size": [28, 28], "resize": "fit", "color": "gray"}
    folder_model = save_model(tmp_path / "folder.safetensors", model, dict(meta, preprocessing=preprocessing_for(False, decode)))
    for fmt in ("onnx", "torchscript"):
        out = tmp_path / f"model.{fmt}"
        code, stdout, err = run_cli(capsys, "export", folder_model, "--out", out, "--image-input", "--format", fmt)
        assert_one_line_error(code, stdout, err, "--image-input", "digit-style")
        assert not out.exists()
    export(capsys, folder_model, tmp_path / "plain.onnx")  # without the flag it exports as before


def test_image_input_snippet_runs_with_numpy_pillow_and_onnxruntime_only(capsys, toy_data, toy_runs, tmp_path):
    """The export page's --image-input lines, on a transparent PNG drawing, in a process where
    image_logreg and torch cannot be imported: predict's label."""
    section = EXPORT_PAGE.read_text().split("\n## Images of any size: `--image-input`\n", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "image_logreg" not in snippet and "torch" not in snippet
    export(capsys, toy_runs["plain"], tmp_path / "mnist-image.onnx", "--image-input")  # the names the page uses
    from user_digits import write_user_digit

    drawing = write_user_digit(dataset_images(toy_data)[3], tmp_path / "drawing", np.random.default_rng(5), "png-RGBA")
    drawing.rename(tmp_path / "digit.png")
    program = (
        "import sys\n"
        "sys.modules['image_logreg'] = sys.modules['torch'] = None  # not installed, as far as this code knows\n"
        + snippet
        + "print(repr(label))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    code, stdout, err = run_cli(capsys, "predict", toy_runs["plain"], tmp_path / "digit.png", "--json")
    assert code == 0, err
    assert eval(done.stdout) == json.loads(stdout)[0]["label"]


@pytest.mark.integration
def test_image_input_on_user_style_mnist_digits(capsys, mnist_run, real_data, tmp_path, record_property):
    """300 MNIST test digits drawn as users bring them, the default MNIST model: the --image-input
    graph's top-1 agreed with ``image-logreg predict`` on 300 of 300 (probabilities within 5.2e-7),
    95.7% right, as predict. The same files' gray pixels merely resized to 28 x 28 and fed to the
    plain file all came out "2" (10.7% right). The figures on the export page."""
    from PIL import Image

    from image_logreg.datasets import load_split

    test = load_split("mnist", real_data, "test", download=False)
    images, labels = test.images.numpy()[:300], test.labels.numpy()[:300]
    paths = user_style_files(images, tmp_path / "files")
    image_file, plain_file = tmp_path / "image.onnx", tmp_path / "plain.onnx"
    export(capsys, mnist_run, image_file, "--image-input")
    export(capsys, mnist_run, plain_file)
    session = ort.InferenceSession(str(image_file), providers=["CPUExecutionProvider"])
    got = image_input_probabilities(lambda image: session.run(["probabilities"], {"image": image})[0], paths)
    want = predicted_probabilities(mnist_run, paths)
    resized = np.stack([np.asarray(Image.fromarray(gray_pixels(p)).resize((28, 28), Image.Resampling.LANCZOS)) for p in paths])
    naive = onnx_probabilities(plain_file, resized)

    top1, close = agreement(got, want)
    accuracy = {name: float(np.mean(p.argmax(1) == labels)) for name, p in (("graph", got), ("predict", want), ("resized", naive))}
    record_property("top1_agreement", top1)
    record_property("max_abs_difference", float(np.abs(got - want).max()))
    for name, value in accuracy.items():
        record_property(f"{name}_accuracy", value)
    assert top1 >= 0.98 and close >= 0.95, (top1, close)
    assert accuracy["graph"] >= accuracy["predict"] - 0.01 and accuracy["predict"] > 0.9
    assert accuracy["resized"] < 0.3 and agreement(naive, want)[0] < 0.3  # the failure --image-input answers
