"""What the benchmark reports share: the machine they ran on, and replacing one marked block of a
Markdown file, so each benchmark updates only its own figures."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name where Linux tells it (``platform`` only says the architecture)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def vendor() -> str:
    """``intel``, ``amd`` or ``other``: the figures of each are kept in blocks of their own, since
    BLAS kernels and thread choices that win on one can lose on the other."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            found = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("vendor_id")), "")
    except OSError:
        found = ""
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(found, "other")


def machine(*packages: str) -> str:
    """``AMD EPYC ..., 2 cores, torch 2.14.1, Python 3.11.7``, naming the versions of ``packages``."""
    versions = "".join(f", {name} {version(name)}" for name in packages)
    return f"{cpu_name()}, {os.cpu_count()} cores{versions}, Python {platform.python_version()}"


def replace_block(path: Path, name: str, text: str, title: str | None = None) -> None:
    """Put ``text`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``.

    A file without the block gets it appended (under ``title``, if given); a missing file is created.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    current = path.read_text(encoding="utf-8") if path.exists() else "# image-logreg benchmark results\n"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        _, tail = rest.split(end, 1)
        updated = f"{head}{block}{tail}"
    else:
        heading = f"## {title}\n\n" if title else ""
        updated = f"{current.rstrip()}\n\n{heading}{block}\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(updated, encoding="utf-8")
    os.replace(tmp, path)
