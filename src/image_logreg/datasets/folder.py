"""The user's own images as a dataset: a folder in ImageFolder layout, or a CSV of paths and labels.

A folder holds one subfolder per class (class names are the folder names, sorted; files
in nested folders count for the class folder they are in). If it has ``train/`` and
``test/`` subfolders, each is such a folder and they are the two splits; otherwise a
seeded, stratified share of each class (``test_fraction``) is held out as the test split.

A CSV has a header row naming at least the columns ``path`` and ``label`` (a class name);
paths are relative to the CSV's own folder. An optional ``split`` column (``train`` or
``test``) gives the splits; without it a test split is held out as for a folder.

The whole collection (both splits) is decoded once into one array, so every image is
brought to the same size and colour, and cached: see ``cache``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR, S_ISREG

import numpy as np

from ..console import say
from ..errors import DataError, UsageError
from . import cache
from .base import check_fraction, image_set
from .decode import DecodeSettings, decode_files, decode_settings
from .registry import Dataset

TRAIN, TEST = 0, 1
SPLIT_NAMES = {"train": TRAIN, "test": TEST}
# Warnings about skipped files shown one by one; past this, one line sums up the rest.
WARNINGS_SHOWN = 10
# Not hidden by a dot, but never part of a dataset: macOS archive residue, Windows thumbnails.
SYSTEM_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})


@dataclass
class Listing:
    """The files of a collection, in a fixed order, with their labels and splits; nothing decoded."""

    kind: str  # folder | csv
    source: Path  # the folder or the CSV file, absolute
    names: list[str]  # each file as records show it: relative to the folder or as the CSV writes it
    paths: list[str]  # each file as it is opened
    labels: np.ndarray  # int64 class index per file
    classes: list[str]
    splits: np.ndarray | None  # TRAIN/TEST per file; None: a test split is to be held out
    sizes: np.ndarray | None = None  # int64 bytes per file; -1: see problems
    mtimes: np.ndarray | None = None  # int64 modification time in ns per file; -1: see problems
    problems: dict[int, str] = field(default_factory=dict)  # position -> why it cannot even be opened
    notes: list[str] = field(default_factory=list)  # one-line warnings from the scan


@dataclass
class Collection:
    """A listing decoded: the usable images of both splits, in listing order."""

    images: np.ndarray  # uint8, N x H x W or N x 3 x H x W
    usable: np.ndarray  # positions in the listing of the images
    skipped: list[tuple[int, str]]  # (position in the listing, reason)
    color: str
    image_size: tuple[int, int]
    cache: dict  # key, hit, path


# --- finding the files ----------------------------------------------------------------------


def scan_folder(root: str | os.PathLike) -> Listing:
    """List a folder in ImageFolder layout, with ``train/`` and ``test/`` as splits when both are there."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; --dataset folder expects a folder with one subfolder per class")
    top = _visible_subfolders(root)
    notes: list[str] = []
    if "train" in top and "test" in top:
        split_roots = [(TRAIN, root / "train"), (TEST, root / "test")]
        ignored = sorted(set(top) - {"train", "test"})
        if ignored:
            notes.append(f"{root}: the folders beside train/ and test/ are ignored ({', '.join(ignored)})")
        classes = sorted(set(_visible_subfolders(root / "train")) | set(_visible_subfolders(root / "test")))
    else:
        split_roots = [(None, root)]
        classes = top
    for _, split_root in split_roots:
        loose = _visible_files(split_root)
        if loose:
            notes.append(f"{split_root}: {len(loose)} files beside the class folders are ignored")
    _check_classes(classes, root)

    found = _Found(root, notes)
    labels, splits = [], []
    for split, split_root in split_roots:
        found.seen = set()  # real folders already read in this split: links are followed once
        for label, name in enumerate(classes):
            before = len(found.paths)
            found.add_files_under(str(split_root / name))
            labels += [label] * (len(found.paths) - before)
            splits += [TRAIN if split is None else split] * (len(found.paths) - before)
    has_splits = split_roots[0][0] is not None
    listing = Listing(
        "folder", root, found.names, found.paths, np.asarray(labels, dtype=np.int64),
        classes, np.asarray(splits, dtype=np.int8) if has_splits else None,
        np.asarray(found.sizes, dtype=np.int64), np.asarray(found.mtimes, dtype=np.int64), found.problems, notes,
    )
    _check_every_class_has_files(listing)
    return listing


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in SYSTEM_NAMES


def _visible_subfolders(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if not _hidden(e.name) and e.is_dir())
    except OSError as error:
        raise DataError(f"{folder} cannot be read ({error.strerror or type(error).__name__})") from None


def _visible_files(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if not _hidden(e.name) and not e.is_dir())


def _check_classes(classes: list[str], root: Path) -> None:
    if not classes:
        raise DataError(f"{root} has no class folders; --dataset folder expects one subfolder per class (ImageFolder layout)")
    if len(classes) == 1:
        raise DataError(f"{root} has one class folder ({classes[0]}); a classifier needs at least two classes")


def _posix(relative: str) -> str:
    return relative if os.sep == "/" else relative.replace(os.sep, "/")


class _Found:
    """The files found so far: path, name, size and modification time of each, and why some cannot be opened.

    A cached load of 70,000 files is mostly this walk, one stat per file, so it keeps to
    plain strings and lists, and stats each file relative to its open folder.
    """

    def __init__(self, root: Path, notes: list[str]):
        self.root = str(root)
        self.paths: list[str] = []
        self.names: list[str] = []  # relative to root, "/"-separated
        self.sizes: list[int] = []
        self.mtimes: list[int] = []
        self.problems: dict[int, str] = {}
        self.notes = notes
        self.seen: set[tuple[int, int]] = set()

    def add_files_under(self, folder: str) -> None:
        """Every file under ``folder``, sorted by name, nested folders in their place.

        Links are followed, but each real folder is read once: a link back up the tree
        (a loop) or to a folder already read is noted and not followed again.
        """
        if not os.path.isdir(folder):
            return  # a class with no folder in this split
        try:
            identity = _identity(os.stat(folder))
            if identity in self.seen:
                self.notes.append(f"{folder}: links to a folder already read; not followed again")
                return
            self.seen.add(identity)
            with _open_folder(folder) as handle:
                entries = sorted(os.scandir(handle), key=_entry_name)
                self._add_entries(folder, entries)
        except OSError as error:
            self.notes.append(f"{folder}: cannot be read ({error.strerror or type(error).__name__}); skipped")

    def _add_entries(self, folder: str, entries: list) -> None:
        path_prefix = folder + os.sep
        name_prefix = _posix(path_prefix[len(self.root) + 1 :])
        entries = [e for e in entries if e.name[0] != "." and e.name not in SYSTEM_NAMES]
        if all(e.is_file(follow_symlinks=False) for e in entries) and self._add_plain_files(path_prefix, name_prefix, entries):
            return
        paths, names, sizes, mtimes = self.paths, self.names, self.sizes, self.mtimes
        for entry in entries:
            name = entry.name
            try:
                if entry.is_dir():
                    self.add_files_under(path_prefix + name)
                    continue
                if entry.is_file():
                    stat = entry.stat()
                    size, mtime = stat.st_size, stat.st_mtime_ns
                else:
                    size = mtime = -1
                    self.problems[len(paths)] = "broken symbolic link" if entry.is_symlink() else "not a regular file"
            except OSError as error:
                size = mtime = -1
                self.problems[len(paths)] = f"cannot be read ({error.strerror or type(error).__name__})"
            paths.append(path_prefix + name)
            names.append(name_prefix + name)
            sizes.append(size)
            mtimes.append(mtime)


    def _add_plain_files(self, path_prefix: str, name_prefix: str, entries: list) -> bool:
        """A folder of plain files only (the usual class folder) in a few list operations; False if a stat fails."""
        try:
            stats = [e.stat() for e in entries]
        except OSError:
            return False  # the careful path says which
        self.paths += [path_prefix + e.name for e in entries]
        self.names += [name_prefix + e.name for e in entries]
        self.sizes += [s.st_size for s in stats]
        self.mtimes += [s.st_mtime_ns for s in stats]
        return True


def _entry_name(entry: os.DirEntry) -> str:
    return entry.name


@contextlib.contextmanager
def _open_folder(folder: str):
    """An open descriptor of ``folder`` where scandir takes one (each stat then skips the path walk), else the path."""
    if os.scandir not in os.supports_fd:
        yield folder
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        yield handle
    finally:
        os.close(handle)


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return (stat.st_dev, stat.st_ino)


def scan_csv(csv_path: str | os.PathLike) -> Listing:
    """List the files of a CSV with a ``path,label`` header (and optionally ``split``)."""
    csv_path = Path(csv_path).absolute()
    rows = _csv_rows(csv_path)
    classes = sorted({label for _, label, _ in rows})
    if len(classes) < 2:
        raise DataError(f"{csv_path} names {len(classes)} class; a classifier needs at least two")
    index = {name: i for i, name in enumerate(classes)}
    names, paths, sizes, mtimes, problems = [], [], [], [], {}
    for position, (name, _, _) in enumerate(rows):
        path = csv_path.parent / name
        (size, mtime), problem = _stat_file(path)
        if problem:
            problems[position] = problem
        names.append(name)
        paths.append(str(path))
        sizes.append(size)
        mtimes.append(mtime)
    has_splits = any(split is not None for _, _, split in rows)
    splits = np.asarray([TRAIN if split in (None, "train") else TEST for _, _, split in rows], dtype=np.int8)
    listing = Listing(
        "csv", csv_path, names, paths, np.asarray([index[label] for _, label, _ in rows], dtype=np.int64), classes,
        splits if has_splits else None, np.asarray(sizes, dtype=np.int64), np.asarray(mtimes, dtype=np.int64), problems,
    )
    _check_every_class_has_files(listing)
    return listing


def _csv_rows(csv_path: Path) -> list[tuple[str, str, str | None]]:
    """(path, label, split or None) of each row; a malformed CSV is a one-line DataError naming the line."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
            reader = csv.reader(f)
            header = [column.strip().lower() for column in next(reader, [])]
            if "path" not in header or "label" not in header:
                raise DataError(f"{csv_path}: the first row must be a header naming the columns path and label (found: {','.join(header) or 'nothing'})")
            columns = (header.index("path"), header.index("label"), header.index("split") if "split" in header else None)
            rows = [_csv_row(row, columns, csv_path, reader.line_num) for row in reader if any(cell.strip() for cell in row)]
    except IsADirectoryError:
        raise DataError(f"{csv_path} is a folder; --dataset csv expects a CSV file (--dataset folder reads folders)") from None
    except FileNotFoundError:
        raise DataError(f"{csv_path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{csv_path} cannot be read as a UTF-8 CSV ({' '.join(str(error).split())})") from None
    if not rows:
        raise DataError(f"{csv_path} lists no files")
    return rows


def _csv_row(row: list[str], columns: tuple, csv_path: Path, line: int) -> tuple[str, str, str | None]:
    path_column, label_column, split_column = columns
    if len(row) <= max(c for c in columns if c is not None):
        raise DataError(f"{csv_path}: line {line} has {len(row)} columns, fewer than the header")
    path, label = row[path_column].strip(), row[label_column].strip()
    if not path or not label:
        raise DataError(f"{csv_path}: line {line} has an empty {'path' if not path else 'label'}")
    split = row[split_column].strip().lower() if split_column is not None else None
    if split is not None and split not in SPLIT_NAMES:
        raise DataError(f"{csv_path}: line {line} has split {split!r}; use train or test")
    return path, label, split


def _stat_file(path: Path) -> tuple[tuple[int, int], str | None]:
    try:
        info = path.stat()
    except FileNotFoundError:
        return (-1, -1), "broken symbolic link" if path.is_symlink() else "no such file"
    except OSError as error:
        return (-1, -1), f"cannot be read ({error.strerror or type(error).__name__})"
    if not S_ISREG(info.st_mode):  # the stat in hand, not another one through is_file()
        return (-1, -1), "is a folder, not an image file" if S_ISDIR(info.st_mode) else "not a regular file"
    return (info.st_size, info.st_mtime_ns), None


def _check_every_class_has_files(listing: Listing) -> None:
    """A class without a single training file fails at once, before anything is decoded."""
    training = listing.labels if listing.splits is None else listing.labels[listing.splits == TRAIN]
    counts = np.bincount(training, minlength=len(listing.classes))
    empty = [listing.classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        where = "training files" if listing.splits is not None else "files"
        raise DataError(f"{listing.source}: {_count(len(empty), 'class')} with no {where}: {_short_list(empty)}")


# --- decoding, with the cache ---------------------------------------------------------------

def decode_listing(
    listing: Listing,
    settings: DecodeSettings,
    cache_dir: str | os.PathLike | None = None,
    no_cache: bool = False,
    progress: bool | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Collection:
    """Every file of ``listing`` decoded (or read from the cache), both splits, in listing order."""
    log = log or say
    key = cache.cache_key(
        listing.names, [listing.labels, listing.sizes, listing.mtimes],
        dict(settings.to_dict(), kind=listing.kind, classes=listing.classes, max_pixels=settings.max_pixels),
    )
    folder = Path(cache_dir) if cache_dir else cache.default_cache_dir()
    check = functools.partial(_entry_holds_together, files=len(listing.paths), settings=settings)
    collection = None if no_cache else _cached(folder, key, check)
    if collection is None:
        collection = _decode(listing, settings, progress, workers)
        collection.cache = {"key": key, "hit": False, "path": None}
        if not no_cache and len(collection.usable):
            collection.cache["path"] = _store(folder, key, collection, log, check)
    return collection


def _cached(folder: Path, key: str, check) -> Collection | None:
    """The cached decode of ``key``, or None (decode again) when there is none or its record lies."""
    entry = cache.load(folder, key, check)
    if entry is None:
        return None
    info = entry.info
    return Collection(
        entry.images, np.asarray(info["usable"], dtype=np.int64), [tuple(s) for s in info["skipped"]],
        info["color"], tuple(info["image_size"]), {"key": key, "hit": True, "path": str(entry.path)},
    )


def _entry_holds_together(info: dict, shape: tuple, files: int, settings: DecodeSettings) -> bool:
    """Each of ``files`` is usable or skipped, once; the colour and size are the ones asked for
    (when asked) and the ones the images have: else a run would record what its images are not."""
    usable, skipped, color, size = (info.get(k) for k in ("usable", "skipped", "color", "image_size"))
    if not (isinstance(usable, list) and all(type(i) is int for i in usable)):
        return False
    if not (isinstance(skipped, list) and all(_skip_record(s) for s in skipped)):
        return False
    if sorted([*usable, *(s[0] for s in skipped)]) != list(range(files)) or usable != sorted(usable):
        return False
    if color not in ("gray", "rgb") or settings.color not in (None, color):
        return False
    if not (isinstance(size, list) and len(size) == 2 and all(type(d) is int and d > 0 for d in size)):
        return False
    if settings.image_size is not None and tuple(size) != tuple(settings.image_size):
        return False
    return tuple(shape) == (len(usable), *([3] if color == "rgb" else []), *size)


def _skip_record(record) -> bool:
    return isinstance(record, list) and len(record) == 2 and type(record[0]) is int and isinstance(record[1], str)


def _decode(listing: Listing, settings: DecodeSettings, progress, workers) -> Collection:
    openable = np.asarray([i for i in range(len(listing.paths)) if i not in listing.problems], dtype=np.int64)
    decoded = decode_files([listing.paths[i] for i in openable], settings, progress, workers)
    skipped = sorted([(int(openable[i]), reason) for i, reason in decoded.skipped] + list(listing.problems.items()))
    return Collection(decoded.images, openable[decoded.usable], skipped, decoded.color, decoded.image_size, {})


def _store(folder: Path, key: str, collection: Collection, log, check) -> str | None:
    info = {
        "usable": collection.usable.tolist(),
        "skipped": [list(s) for s in collection.skipped],
        "color": collection.color,
        "image_size": list(collection.image_size),
    }
    try:
        path = cache.store(folder, key, collection.images, info, check)
    except OSError as error:  # a full disk or a read-only home costs the next run a decode, nothing more
        log(f"warning: cannot write the image cache in {folder} ({error.strerror or type(error).__name__}); continuing without it")
        return None
    return str(path or folder / key)


# --- splits ---------------------------------------------------------------------------------


def held_out_test(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of a stratified, seeded test split: ``round(fraction * n)`` of each class's n.

    Each class keeps at least one image for training.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        count = min(int(np.floor(fraction * len(members) + 0.5)), max(len(members) - 1, 0))
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# --- the split, as an ImageSet ------------------------------------------------------------


def load(dataset: Dataset, data_dir: str | os.PathLike, split: str = "train", download: bool = True, **options):
    """The registry's entry point: one split of a folder or CSV (nothing to download)."""
    return load_split(dataset.name, data_dir, split, **options)


def load_split(kind: str, data_dir: str | os.PathLike, split: str = "train", **options):
    """One split of a folder (``kind`` "folder") or CSV ("csv") as an ``ImageSet``.

    ``data_dir`` is the folder or the CSV file; ``options`` are ``load_splits``'s. The
    split's ``source`` holds what a run records: the files of this split, the files skipped
    and why, the decode settings decided, the held-out test positions, the cache entry used.
    """
    return load_splits(kind, data_dir, (split,), **options)[split]


def load_splits(
    kind: str,
    data_dir: str | os.PathLike,
    splits=("train", "test"),
    *,
    image_size=None,
    resize: str | None = None,
    color: str | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
    max_pixels: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    no_cache: bool = False,
    progress: bool | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """``{split: ImageSet}`` for each of ``splits``, from one walk of the files and one decode (or cache read).

    - ``image_size``: (H, W), "HxW" or one side; None: the size all images share.
    - ``resize``: fit (default), stretch or crop; how an image of another size is brought to it.
    - ``color``: gray or rgb; None: rgb if any image has colour.
    - ``test_fraction`` (0.2), ``seed`` (0): the held-out test split, when there are no given splits.
    - ``max_pixels`` (``settings.MAX_PIXELS``): larger files are skipped unread, as unusable files are.
    - ``cache_dir`` (default ``$XDG_CACHE_HOME/image-logreg``), ``no_cache``: see ``cache``.
    - ``progress``: a progress bar on stderr (None: when stderr is a terminal); ``workers``:
      decoding processes (None: one per core); ``log``: where warnings go (one line each; stderr).
    """
    for split in splits:
        if split not in SPLIT_NAMES:
            raise UsageError(f"unknown split {split!r}; choose from {', '.join(SPLIT_NAMES)}")
    log = log or say
    settings = decode_settings(image_size, resize, color, max_pixels)
    test_fraction = check_fraction(0.2 if test_fraction is None else test_fraction, "--test-fraction")
    seed = 0 if seed is None else int(seed)
    listing = scan_folder(data_dir) if kind == "folder" else scan_csv(data_dir)
    for note in listing.notes:
        log(f"warning: {note}")
    collection = decode_listing(listing, settings, cache_dir, no_cache, progress, workers, log)
    _warn_skipped(listing, collection.skipped, log)
    labels = listing.labels[collection.usable]
    _check_usable(listing, collection, labels)

    if listing.splits is None:
        test_positions = held_out_test(labels, len(listing.classes), test_fraction, seed)
        in_test = np.zeros(len(labels), dtype=bool)
        in_test[test_positions] = True
    else:
        test_positions = None
        in_test = listing.splits[collection.usable] == TEST
    loaded = {}
    for split in splits:
        chosen = np.flatnonzero(in_test if split == "test" else ~in_test)
        if len(chosen) == 0:
            raise DataError(_empty_split_message(listing, split))
        source = _source_record(listing, collection, settings, chosen, test_positions, test_fraction, seed)
        loaded[split] = image_set(_take(collection.images, chosen), labels[chosen], listing.classes, listing.kind, split, source)
    return loaded


def _check_usable(listing: Listing, collection: Collection, labels: np.ndarray) -> None:
    if len(collection.usable) == 0:
        first = collection.skipped[0] if collection.skipped else None
        example = f"; {listing.names[first[0]]}: {first[1]}" if first else ""
        raise DataError(f"{listing.source}: no usable images ({_count(len(collection.skipped), 'file')} skipped{example})")
    splits = None if listing.splits is None else listing.splits[collection.usable]
    training = labels if splits is None else labels[splits == TRAIN]
    counts = np.bincount(training, minlength=len(listing.classes))
    empty = [listing.classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{listing.source}: {_count(len(empty), 'class')} left with no usable images for training: {_short_list(empty)}")


def _empty_split_message(listing: Listing, split: str) -> str:
    if listing.splits is not None:
        return f"{listing.source}: the {split} split has no usable images"
    return (
        f"{listing.source}: the held-out {split} split is empty; raise --test-fraction "
        "(each class keeps at least one training image) or give the folder train/ and test/ subfolders"
    )


def _warn_skipped(listing: Listing, skipped: list[tuple[int, str]], log) -> None:
    for position, reason in skipped[:WARNINGS_SHOWN]:
        log(f"warning: skipped {listing.names[position]}: {reason}")
    if len(skipped) > WARNINGS_SHOWN:
        log(f"warning: skipped {len(skipped) - WARNINGS_SHOWN} more files that are not usable images ({len(skipped)} in all)")


def _take(images: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """``images[chosen]``, as a view (no copy, the cache's pages stay on disk) when ``chosen`` is one run."""
    if len(chosen) and chosen[-1] - chosen[0] + 1 == len(chosen):
        return images[chosen[0] : chosen[-1] + 1]
    return images[chosen]


def _source_record(listing, collection, settings, chosen, test_positions, test_fraction, seed) -> dict:
    """Plain data describing where the split came from, for the run to save."""
    record = {
        "kind": listing.kind,
        "path": str(listing.source),
        "layout": "splits" if listing.splits is not None else "held-out",
        "image_size": list(collection.image_size),
        "resize": settings.resize,
        "color": collection.color,
        "requested": settings.to_dict(),
        "files": [listing.names[int(p)] for p in collection.usable[chosen]],
        "skipped": [{"path": listing.names[p], "reason": reason} for p, reason in collection.skipped],
        "cache": dict(collection.cache),
    }
    if test_positions is not None:
        # positions among the collection's usable images, in listing order (the "files" of both splits)
        record.update(test_fraction=test_fraction, seed=seed, test_indices=test_positions.tolist())
    return record


def _count(n: int, noun: str) -> str:
    plural = {"class": "classes"}.get(noun, noun + "s")
    return f"{n} {noun if n == 1 else plural}"


def _short_list(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
