"""The input pipeline: uint8 images as a dataset stores them to the float tensor the model sees.

Training, evaluation, prediction, serving and export all come through ``prepare_inputs``, so a
model is always fed what it was trained on; ``preprocessing_for`` is the plain-data record of
those steps that a checkpoint carries. The datasets themselves are read by ``datasets``.
"""

from __future__ import annotations

import torch

from .errors import UsageError


def to_float(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images to float32 in [0, 1] on ``device``, as ``ToTensor`` scales them."""
    return images.to(device).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images as a dataset stores them: float ones in [0, 1] back to uint8, rounded (uint8 as they are)."""
    if images.dtype == torch.uint8:
        return images
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


# ``preprocessing["image_files"]["name"]`` of a model whose user files are decoded as its
# dataset's own files were (``datasets.decode.read_image``), not normalised as digits.
DATASET_DECODE = "dataset-decode"


def preprocessing_for(deskewed: bool = False, decode: dict | None = None) -> dict:
    """The description of the input pipeline that checkpoints record (plain data).

    ``decode`` (``image_size``, ``resize``, ``color``, as a dataset settled them) says a
    user's image files are to be decoded that way; None, that they are normalised as MNIST
    digits (``preprocess.PREPROCESSING``). Prediction reads this, never the dataset's name.
    """
    from .deskew import DESKEW
    from .preprocess import PREPROCESSING

    if decode is None:
        image_files = dict(PREPROCESSING)
    else:
        image_files = {
            "name": DATASET_DECODE,
            "image_size": [int(v) for v in decode["image_size"]],
            "resize": decode["resize"],
            "color": decode["color"],
            "steps": [
                "EXIF orientation applied, transparency over white, 16-bit and float scaled to 8 bits",
                "gray or RGB as the dataset",
                "resized to image_size: fit (aspect kept, padded with the border colour), stretch, or crop (cover, centre cut)",
            ],
        }
    return {"scale": "x / 255", "deskew": dict(DESKEW) if deskewed else False, "image_files": image_files}


def decode_settings_of(preprocessing: dict | None) -> dict | None:
    """The recorded ``image_size``/``resize``/``color`` of a dataset-decode model; None for a digit model."""
    files = (preprocessing or {}).get("image_files") or {}
    if files.get("name") != DATASET_DECODE:
        return None
    return {k: files[k] for k in ("image_size", "resize", "color")}


def prepare_inputs(images: torch.Tensor, preprocessing: dict | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (0-255) to the float tensor the model sees, as its recorded ``preprocessing`` says.

    Training, evaluation and prediction all come through here, so a model is always fed
    what it was trained on. Floating images (the served protocol's FP32) are taken as
    already scaled to 0-1, and get the same steps but the scaling.
    """
    uint8 = images.dtype == torch.uint8
    if not (preprocessing and preprocessing.get("deskew")):
        return to_float(images, device) if uint8 else images.to(device, torch.float32)
    if images.dim() == 4:  # N x C x H x W: deskewing measures the slant of gray strokes
        raise UsageError("--deskew works on grayscale images only; these are colour (use --color gray)")
    from .deskew import deskew

    # uint8 images are deskewed as uint8 (rounded to whole pixel values), then scaled
    images = deskew(images.to(device) if uint8 else images.to(device, torch.float32))
    return to_float(images, device) if uint8 else images
