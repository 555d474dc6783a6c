import numpy as np
import pytest
import torch

from conftest import write_idx
from image_logreg.data import to_float
from image_logreg.datasets import load_split, split_indices, subset_indices
from image_logreg.errors import DataError, UsageError


def test_load_split_reads_tensors_and_class_names(toy_data):
    train = load_split("mnist", toy_data, "train", download=False)
    assert train.images.shape == (600, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.shape == (600,) and train.labels.dtype == torch.int64
    assert train.classes[3] == "3 - three" and train.input_shape == (28, 28)
    assert len(load_split("mnist", toy_data, "test", download=False)) == 200
    fashion = load_split("fashion-mnist", toy_data, "train", download=False)
    assert fashion.classes[0] == "T-shirt/top"


def test_to_float_matches_totensor_scaling(toy_data):
    from torchvision.transforms.functional import to_tensor

    data = load_split("mnist", toy_data, "train", download=False)
    x = to_float(data.images[:3])
    expected = torch.stack([to_tensor(img.numpy())[0] for img in data.images[:3]])
    assert torch.equal(x, expected)


def test_missing_files_name_the_files_and_the_flag(tmp_path):
    with pytest.raises(DataError) as err:
        load_split("mnist", tmp_path, "train", download=False)
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert "--data-dir" in msg and "\n" not in msg


def test_failed_download_is_one_line_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(self, *a, **k):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    with pytest.raises(DataError, match="download failed.*--data-dir"):
        load_split("mnist", tmp_path, "train", download=True)


def test_truncated_image_file(toy_data):
    path = toy_data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*corrupt or truncated"):
        load_split("mnist", toy_data, "train", download=False)


def test_corrupt_header(toy_data):
    path = toy_data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"garbage!" + path.read_bytes()[8:])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_split("mnist", toy_data, "test", download=False)


def test_images_and_labels_must_agree(toy_data):
    write_idx(toy_data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.zeros(10, dtype=np.uint8))
    with pytest.raises(DataError, match="200 images but .* 10 labels"):
        load_split("mnist", toy_data, "test", download=False)


def test_labels_out_of_range(toy_data):
    write_idx(toy_data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.full(200, 12, dtype=np.uint8))
    with pytest.raises(DataError, match="labels outside 0..9"):
        load_split("mnist", toy_data, "test", download=False)


def test_split_is_seeded_disjoint_and_complete():
    a_train, a_val = split_indices(1000, 0.2, seed=7)
    b_train, b_val = split_indices(1000, 0.2, seed=7)
    c_train, _ = split_indices(1000, 0.2, seed=8)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert not torch.equal(a_train, c_train)
    assert len(a_val) == 200 and len(a_train) == 800
    assert sorted(torch.cat([a_train, a_val]).tolist()) == list(range(1000))
    # a random split, not the last 20% (the tutorial's warning about label-ordered data)
    assert a_val.max() > 900 and a_val.min() < 100


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan"), 0.001])
def test_split_rejects_bad_fractions(fraction):
    with pytest.raises(UsageError):
        split_indices(100, fraction)


def test_split_without_validation_keeps_everything_for_training():
    train, val = split_indices(100, 0.0, seed=0)
    assert len(val) == 0 and sorted(train.tolist()) == list(range(100))


def test_dataset_names_and_classes_match_torchvision():
    """Kept as plain data so that naming a dataset imports nothing; they must stay torchvision's."""
    import torchvision.datasets

    from image_logreg.datasets import DATASETS
    from image_logreg.datasets.idx import dataset_class

    for name in ("mnist", "fashion-mnist", "kmnist"):
        entry = DATASETS[name]
        assert dataset_class(entry) is getattr(torchvision.datasets, entry.torchvision)
        assert list(entry.classes) == list(dataset_class(entry).classes)
    for entry in DATASETS.values():  # every download names a class torchvision has
        assert entry.user_images or hasattr(torchvision.datasets, entry.torchvision), entry.name


def test_subset_is_a_seeded_subset():
    train, _ = split_indices(1000, 0.2, seed=0)
    sub = subset_indices(train, 50, seed=0)
    assert len(sub) == 50 and set(sub.tolist()) <= set(train.tolist())
    assert torch.equal(sub, subset_indices(train, 50, seed=0))
    with pytest.raises(UsageError):
        subset_indices(train, 801)
