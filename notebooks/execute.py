"""Run a notebook top to bottom in a fresh kernel and, if asked, save it with its outputs.

    .venv/bin/pip install -e '.[notebook]'                     # nbclient, nbformat, ipykernel
    .venv/bin/python notebooks/execute.py                      # runs walkthrough.ipynb; saves nothing
    .venv/bin/python notebooks/execute.py --in-place           # ... and saves it with its outputs
    .venv/bin/python notebooks/execute.py --data-dir DIR       # with IMAGE_LOGREG_DATA=DIR

The kernel is the Python running this script (the project's venv, with image-logreg installed),
not whatever kernel named "python3" Jupyter would find first. The kernel starts in the
notebook's folder, as Jupyter starts it. A cell that raises stops the run with nbclient's
CellExecutionError. The tests execute the notebook through the same function.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "walkthrough.ipynb"
KERNEL_NAME = "python3"
CELL_TIMEOUT = 300  # seconds per cell


def kernel_manager(spec_dir: Path):
    """A KernelManager whose only kernel is ``sys.executable -m ipykernel_launcher``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    folder = spec_dir / KERNEL_NAME
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "metadata": {"debugger": False},
    }
    (folder / "kernel.json").write_text(json.dumps(spec, indent=1))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def run_notebook(nb, cwd: str | os.PathLike, env: dict | None = None):
    """Execute notebook node ``nb`` in place in a fresh kernel started in ``cwd``; return it."""
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory(prefix="image-logreg-kernel-") as spec_dir:
        km = kernel_manager(Path(spec_dir))
        client = NotebookClient(
            nb,
            km=km,
            kernel_name=KERNEL_NAME,
            timeout=CELL_TIMEOUT,
            record_timing=False,  # no timestamps in the saved file: a re-run changes only what it computed
            resources={"metadata": {"path": str(cwd)}},
        )
        try:
            # nbclient leaves a kernel it was handed running; cleanup_kc shuts it down, gracefully,
            # so that the kernel's own clean-up (temporary folders) runs.
            client.execute(cleanup_kc=True, env=dict(os.environ if env is None else env))
        finally:
            if km.has_kernel:  # only if the graceful shutdown did not happen
                km.shutdown_kernel(now=True)
    return nb


def execute_notebook(path: str | os.PathLike, data_dir: str | os.PathLike | None = None, out_path: str | os.PathLike | None = None):
    """Execute the notebook at ``path`` (``IMAGE_LOGREG_DATA=data_dir`` when given); save it to
    ``out_path`` if given. Returns the executed notebook node."""
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    if data_dir is not None:
        env["IMAGE_LOGREG_DATA"] = str(data_dir)
    run_notebook(nb, path.parent, env)
    if out_path is not None:
        nbformat.write(nb, str(out_path))
    return nb


NEEDS = ("nbclient", "nbformat", "ipykernel")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Execute a notebook top to bottom; save it with its outputs if asked.")
    parser.add_argument("notebook", nargs="?", default=str(NOTEBOOK), help="the notebook (default: %(default)s)")
    parser.add_argument("--data-dir", help="the data folder, passed as IMAGE_LOGREG_DATA (default: the notebook's own search)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--in-place", action="store_true", help="save the executed notebook over the one run")
    where.add_argument("--out", help="save the executed notebook here (default: saved nowhere)")
    args = parser.parse_args(argv)
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: running a notebook needs {', '.join(missing)}: pip install -e '.[notebook]'", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = args.notebook if args.in_place else args.out
    execute_notebook(args.notebook, args.data_dir, out)
    saved = f"saved to {out}" if out else "saved nowhere (--in-place or --out PATH to keep its outputs)"
    print(f"executed {args.notebook} in {time.perf_counter() - start:.1f} s; {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
