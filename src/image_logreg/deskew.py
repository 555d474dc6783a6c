"""Moment-based deskewing of digit images.

Handwritten digits lean by different amounts; a linear classifier has to spend
weights on every slant. Deskewing removes most of that variation: for each
image we measure how much the ink leans (the regression slope of column on
row, from the intensity-weighted second moments) and shear it back upright,
moving the centre of mass to the image centre at the same time.

With x = column, y = row, (mu_x, mu_y) the centre of mass and
alpha = cov(x, y) / var(y), an upright stroke leaned by alpha has its ink at
x - mu_x = alpha * (y - mu_y). The output pixel (y', x') therefore samples the
input at

    y = y' + (mu_y - c_y)
    x = x' + alpha * (y' - c_y) + (mu_x - c_x)

where c = ((H - 1) / 2, (W - 1) / 2) is the image centre. Sampling is bilinear
with zeros outside the image.
"""

import torch
import torch.nn.functional as F

# Recorded in checkpoint metadata, so a model trained on deskewed images is
# later fed deskewed images too.
DESKEW = {
    "name": "moment-deskew",
    "skew": "cov(x,y)/var(y) of intensity-weighted pixel coordinates",
    "centre": "centre of mass moved to ((H-1)/2, (W-1)/2)",
    "interpolation": "bilinear",
    "padding": "zeros",
}

# Images per grid_sample call: bounds the temporary grid (N*H*W*2 floats). Small enough
# that the temporaries stay in cache, which is several times faster than larger chunks.
CHUNK = 512


def deskew(images: torch.Tensor) -> torch.Tensor:
    """Deskew a batch N x H x W (or one H x W image), uint8 0..255 or floating.

    Returns the same shape, dtype and device; uint8 output is rounded and
    clamped. Blank images come back unchanged.
    """
    if images.dim() not in (2, 3):
        raise ValueError(f"expected H x W or N x H x W images, got shape {tuple(images.shape)}")
    batch = images.unsqueeze(0) if images.dim() == 2 else images
    # uint8 results are rounded to whole pixel values, so a last-bit difference in the
    # interpolation can move a pixel by one; in float64 no such difference survives between
    # this and an exported graph's sampler (onnxruntime's), so both round alike.
    work_dtype = torch.float32 if images.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64
    # Rounded and cast chunk by chunk: a float64 copy of a whole training set would not fit in cache.
    out = torch.empty(batch.shape, dtype=images.dtype, device=images.device)
    for start in range(0, batch.shape[0], CHUNK):
        chunk = deskew_float(batch[start : start + CHUNK].to(work_dtype))
        if images.dtype == torch.uint8:
            chunk = chunk.round_().clamp_(0, 255)
        out[start : start + CHUNK] = chunk
    return out.reshape(images.shape)


def deskew_float(img: torch.Tensor) -> torch.Tensor:
    """Deskew a floating N x H x W batch (no rounding): the map itself, in tensor operations only.

    The exported ONNX and TorchScript graphs trace this same function, so an exported model
    deskews exactly as training did. Only H and W become constants; N stays free.
    """
    # Plain ints: a tracer would otherwise carry H and W as float32 scalars into the map.
    h, w = (int(d) for d in img.shape[-2:])
    c_y, c_x = (h - 1) / 2, (w - 1) / 2
    xs = torch.arange(w, dtype=img.dtype, device=img.device)

    # Raw moments from row/column marginals (cheaper than full-size products):
    # row_mass[y] = sum_x I, col_mass[x] = sum_y I, row_x[y] = sum_x x I.
    # The marginals are small, so the rest is done in float64: variance from
    # raw moments (E[y^2] - mu^2) cancels badly in float32 on large images.
    row_mass = img.sum(dim=2).double()
    col_mass = img.sum(dim=1).double()
    row_x = (img @ xs).double()
    ys = torch.arange(h, dtype=torch.float64, device=img.device)
    xs = xs.double()
    mass = row_mass.sum(dim=1)
    # A blank image has no mass: treat its centre of mass as the image centre
    # and its skew as zero, so the map below is the identity.
    blank = mass <= 0
    safe_mass = torch.where(blank, torch.ones_like(mass), mass)
    mu_y = torch.where(blank, torch.full_like(mass, c_y), (row_mass @ ys) / safe_mass)
    mu_x = torch.where(blank, torch.full_like(mass, c_x), (col_mass @ xs) / safe_mass)
    var_y = (row_mass @ (ys * ys)) / safe_mass - mu_y * mu_y
    cov_xy = (row_x @ ys) / safe_mass - mu_x * mu_y
    # Ink confined to one row has no defined lean: leave it unsheared.
    flat = var_y <= 1e-6
    alpha = torch.where(flat, torch.zeros_like(var_y), cov_xy / torch.where(flat, torch.ones_like(var_y), var_y))

    # The sampling map from the module docstring, in grid_sample's normalised
    # coordinates: with align_corners=True, u = 2 x / (W - 1) - 1, so pixel
    # offsets scale by 2 / (W - 1) across and 2 / (H - 1) down. The grid is
    # built by broadcasting rather than affine_grid, whose batched matmul is
    # several times slower on CPU for small images.
    sx, sy = max(w - 1, 1), max(h - 1, 1)
    alpha, mu_x, mu_y = alpha.to(img.dtype), mu_x.to(img.dtype), mu_y.to(img.dtype)
    u = _unit_coordinates(w, img).view(1, 1, w)
    v = _unit_coordinates(h, img).view(1, h, 1)
    shear = (alpha * sy / sx)[:, None, None]
    shift_u = (2 * (mu_x - c_x) / sx)[:, None, None]
    shift_v = (2 * (mu_y - c_y) / sy)[:, None, None]
    column = (u + shift_u) + shear * v
    row = (v + shift_v).expand(-1, h, w)
    grid = torch.stack((column, row), dim=-1)
    out = F.grid_sample(img.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.squeeze(1)


def _unit_coordinates(size: int, like: torch.Tensor) -> torch.Tensor:
    """-1 .. 1 in ``size`` steps: pixel centres in grid_sample's align_corners=True coordinates.

    Spelled as i * step - 1 rather than linspace, which ONNX has no operator for: an exporter
    rewrites linspace as this very formula, and the last bit of a coordinate decides how a
    pixel rounds, so training and the exported graph must compute it the same way.
    """
    step = torch.tensor(2.0 / max(size - 1, 1), dtype=like.dtype, device=like.device)
    return torch.arange(size, dtype=like.dtype, device=like.device) * step - 1
