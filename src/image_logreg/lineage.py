"""How a model relates to its parent run and to folders of labelled images.

Folders of labelled images (``learn``'s input, the server's stored corrections, ``suggest``'s
choices) are named after the model's classes, as ``--dataset folder`` names classes after
folders; a run trained from another (``train --init``, ``learn``) records its parent's weights.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .files import file_sha256


def class_folder(classes: list[str], index: int) -> str:
    """The folder for class ``index``: its name when that is a safe folder name, else the index."""
    name = classes[index]
    safe = name and name.strip() == name and name not in (".", "..") and not any(c in name for c in '/\\\0:*?"<>|')
    return name if safe else str(index)


def class_of_folder(classes: list[str], folder: str) -> int | None:
    """The class a folder holds: named as ``class_folder`` names it, by the class's index, or by the
    first word of a name such as MNIST's ``7 - seven``; None when it names no class."""
    if folder in classes:
        return classes.index(folder)
    if folder.isdigit() and int(folder) < len(classes):
        return int(folder)
    heads = [c.split(" - ")[0] for c in classes]
    return heads.index(folder) if heads.count(folder) == 1 else None


def class_order(parent_classes: list[str], classes: list[str]) -> list[int]:
    """For each of ``classes``, the index of the same class among ``parent_classes`` (matched as
    ``class_of_folder`` matches a folder: by name, index or MNIST's leading digit, or the other
    way round, ``7 - seven`` for a model's ``7``); a UsageError unless the two name the same
    classes, in any order."""
    if len(classes) != len(parent_classes):
        raise UsageError(f"the model has {len(parent_classes)} classes ({some_names(parent_classes)}), the data {len(classes)} ({some_names(classes)})")
    order = [_same_class(parent_classes, name) for name in classes]
    unmatched = [name for name, k in zip(classes, order) if k is None]
    if unmatched:
        raise UsageError(f"the data's class {unmatched[0]!r} is none of the model's ({some_names(parent_classes)})")
    if len(set(order)) != len(order):
        raise UsageError(f"the data's classes {some_names(classes)} name some of the model's classes twice ({some_names(parent_classes)})")
    return order


def _same_class(parent_classes: list[str], name: str) -> int | None:
    found = class_of_folder(parent_classes, name)
    head = name.split(" - ")[0]
    if found is None and head in parent_classes:
        found = parent_classes.index(head)
    return found


def some_names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f", ... {len(names)} in all" if len(names) > shown else "")


def weights_record(checkpoint) -> dict:
    """A run's ``parent``: the absolute path of the weights file it started from and that file's
    SHA-256, so a reader can tell whether the file found there now is still the one."""
    return {"path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint)}
