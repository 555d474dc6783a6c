"""Replace one marked block of a Markdown file, so each benchmark updates only its own figures."""

from __future__ import annotations

import os
from pathlib import Path


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
