"""Write MNIST (or Fashion-MNIST) from its IDX files as a folder of PNG files.

The folder is in torchvision's ``ImageFolder`` layout with both splits,
``OUT/train/<label>/<index>.png`` and ``OUT/test/<label>/<index>.png`` (70,000 files for
MNIST), so ``--dataset folder`` can be compared with ``--dataset mnist`` image for image.
Class folders are named by the label number ("0" .. "9"): sorted, they keep the label order.

    python benchmarks/export_folder.py /tmp/mnist-png [--data-dir ../shared/data] [--dataset mnist] [--limit N]

``--limit N`` writes only the first N images of each split (a subset sized for tests).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

# Files per task: large enough that a worker's start-up and the results' trip back are
# a small share of the work, small enough to spread over all cores.
CHUNK = 2000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write (created; must not hold a previous export)")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of each split")
    args = parser.parse_args(argv)

    from image_logreg.datasets import load_split

    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} already exists and is not empty")
    start = time.perf_counter()
    total = 0
    for split in ("train", "test"):
        data = load_split(args.dataset, args.data_dir, split, download=False)
        images, labels = data.images.numpy()[: args.limit], data.labels.numpy()[: args.limit]
        for label in range(len(data.classes)):
            (args.out / split / str(label)).mkdir(parents=True, exist_ok=True)
        tasks = [
            (str(args.out / split), images[i : i + CHUNK], labels[i : i + CHUNK], i)
            for i in range(0, len(labels), CHUNK)
        ]
        with ProcessPoolExecutor(args.workers) as pool:
            total += sum(pool.map(_write_chunk, tasks))
    print(f"wrote {total} PNG files to {args.out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def _write_chunk(task: tuple[str, np.ndarray, np.ndarray, int]) -> int:
    from PIL import Image

    folder, images, labels, first = task
    for offset, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(os.path.join(folder, str(int(label)), f"{first + offset:05d}.png"))
    return len(labels)


if __name__ == "__main__":
    sys.exit(main())
