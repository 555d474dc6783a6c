import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from image_logreg import deskew as deskew_module
from image_logreg.deskew import DESKEW, deskew



def moments(img):
    """Centre of mass, skew cov(x,y)/var(y) and column spread, computed here in
    numpy so the tests do not trust the module's own arithmetic."""
    a = np.asarray(img, dtype=np.float64)
    y, x = np.mgrid[: a.shape[0], : a.shape[1]]
    m = a.sum()
    mx, my = (a * x).sum() / m, (a * y).sum() / m
    var_y = (a * (y - my) ** 2).sum() / m
    cov = (a * (x - mx) * (y - my)).sum() / m
    spread_x = np.sqrt((a * (x - mx) ** 2).sum() / m)
    return mx, my, cov / var_y, spread_x


def sheared_bar(shear, width=3, centre_col=12, rows=range(5, 23)):
    img = np.zeros((28, 28), np.uint8)
    for r in rows:
        c = int(round(centre_col + shear * (r - 14)))
        img[r, c : c + width] = 255
    return img


def blob(cy, cx, sy=3.0, sx=1.5, shear=0.0, size=28):
    """A smooth elongated stroke centred at (cy, cx), leaning by `shear`."""
    y, x = np.mgrid[:size, :size].astype(np.float64)
    u = (x - cx) - shear * (y - cy)
    return np.exp(-0.5 * ((y - cy) / sy) ** 2 - 0.5 * (u / sx) ** 2)


@pytest.mark.parametrize("shear", [0.3, -0.3])
def test_sheared_stroke_comes_back_upright(shear):
    img = sheared_bar(shear)
    _, _, skew_in, spread_in = moments(img)
    assert abs(skew_in) > 0.25  # the test input really is skewed

    out = deskew(torch.from_numpy(img)).numpy()
    _, _, skew_out, spread_out = moments(out)
    assert abs(skew_out) < 0.05
    assert spread_out < 0.7 * spread_in


def test_upright_centred_input_changes_little():
    # An upright "0": symmetric about both axes through the image centre, so
    # there is no skew and no shift and the map is the identity.
    y, x = np.mgrid[:28, :28]
    r = np.hypot((y - 13.5) / 8, (x - 13.5) / 5)
    ring = ((r > 0.75) & (r < 1.0)).astype(np.uint8) * 255
    out = deskew(torch.from_numpy(ring)).numpy().astype(np.int64)
    assert np.abs(out - ring).sum() < 0.01 * ring.sum()

    # A smooth upright stroke a tenth of a pixel off centre: only the small
    # recentring shift happens, which changes little of the ink.
    img = blob(13.6, 13.4, sy=5.0, sx=2.0)
    out = deskew(torch.from_numpy(img)).numpy()
    assert np.abs(out - img).sum() < 0.1 * img.sum()


@pytest.mark.parametrize("cy,cx,shear", [(10.0, 17.0, 0.4), (16.3, 9.6, -0.25), (13.5, 13.5, 0.0), (15.0, 12.0, 0.1)])
def test_centre_of_mass_moves_to_image_centre(cy, cx, shear):
    img = blob(cy, cx, shear=shear)
    out = deskew(torch.from_numpy(img)).numpy()
    mx, my, skew, _ = moments(out)
    assert abs(mx - 13.5) < 0.5 and abs(my - 13.5) < 0.5
    assert abs(skew) < 0.05


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_dtype_shape_and_device_preserved(dtype):
    imgs = torch.from_numpy(np.stack([sheared_bar(0.3), sheared_bar(-0.2, width=2)]))
    imgs = imgs.to(dtype) if dtype == torch.uint8 else imgs.to(dtype) / 255
    out = deskew(imgs)
    assert out.dtype == dtype and out.shape == imgs.shape and out.device == imgs.device

    single = deskew(imgs[0])  # 2-D input
    assert single.shape == (28, 28) and single.dtype == dtype
    atol = 1 if dtype == torch.uint8 else 1e-5  # uint8 rounding may flip at .5
    torch.testing.assert_close(single.double(), out[0].double(), atol=atol, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_stays_on_cuda():
    imgs = torch.from_numpy(np.stack([sheared_bar(0.3)])).cuda()
    out = deskew(imgs)
    assert out.device == imgs.device and out.dtype == torch.uint8
    assert torch.allclose(out.cpu().double(), deskew(imgs.cpu()).double(), atol=1)


def test_blank_and_degenerate_images():
    blank = torch.zeros(28, 28, dtype=torch.uint8)
    assert torch.equal(deskew(blank), blank)

    one_row = torch.zeros(28, 28)
    one_row[14, 5:20] = 1.0  # var(y) = 0: skew undefined, must not be NaN
    batch = torch.stack([torch.zeros(28, 28), one_row, torch.zeros(28, 28)])
    out = deskew(batch)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(28, 28)) and torch.equal(out[2], torch.zeros(28, 28))
    assert out[1].sum() > 0


def test_batch_matches_single_images_across_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    imgs = np.stack(
        [blob(rng.uniform(11, 16), rng.uniform(11, 16), shear=rng.uniform(-0.4, 0.4)) for _ in range(7)]
        + [np.zeros((28, 28))]
    ).astype(np.float32)
    imgs = torch.from_numpy(imgs)
    whole = deskew(imgs)
    singles = torch.stack([deskew(im) for im in imgs])
    torch.testing.assert_close(whole, singles, atol=1e-5, rtol=0)

    monkeypatch.setattr(deskew_module, "CHUNK", 3)  # chunk boundaries inside the batch
    torch.testing.assert_close(deskew(imgs), whole, atol=1e-5, rtol=0)


def test_description_is_plain_json():
    assert DESKEW["name"] == "moment-deskew"
    assert json.loads(json.dumps(DESKEW)) == DESKEW


def test_rejects_wrong_rank():
    with pytest.raises(ValueError):
        deskew(torch.zeros(2, 1, 28, 28))


def _logreg_accuracy(x_train, y_train, x_test, y_test):
    """Multinomial logistic regression on pixels in [0, 1], full-batch L-BFGS."""
    torch.manual_seed(0)
    x_train = x_train.reshape(len(x_train), -1).float() / 255
    x_test = x_test.reshape(len(x_test), -1).float() / 255
    model = torch.nn.Linear(x_train.shape[1], 10)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=40, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x_train), y_train) + 5e-5 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def test_deskewing_helps_a_linear_classifier_on_mnist(real_data):
    from image_logreg.datasets import load_split

    n_train, n_test = 6000, 4000
    train = load_split("mnist", real_data, "train", download=False)
    test = load_split("mnist", real_data, "test", download=False)
    x_train, y_train = train.images[:n_train], train.labels[:n_train]
    x_test, y_test = test.images[:n_test], test.labels[:n_test]

    raw = _logreg_accuracy(x_train, y_train, x_test, y_test)
    deskewed = _logreg_accuracy(deskew(x_train), y_train, deskew(x_test), y_test)
    assert deskewed > raw + 0.02, (raw, deskewed)
