"""Writing files so that nothing a user had is half-written or silently replaced."""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from .errors import UsageError

# mkstemp/mkdtemp create private (0600/0700) paths; results should get the user's usual mode.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # writers may have recreated the file with their own mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data) -> Path:
    """``data`` as indented JSON. A dict's values may be 1-D integer tensors or arrays (a run's
    split: millions of indices), written compactly on one line, a block at a time, without
    becoming a Python list first."""
    if not isinstance(data, dict) or not any(_is_array(v) for v in data.values()):
        return write_text(path, json.dumps(data, indent=2) + "\n")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("{")
        for i, (key, value) in enumerate(data.items()):
            f.write(("," if i else "") + "\n  " + json.dumps(key) + ": ")
            if _is_array(value):
                _write_integers(f, value)
            else:
                f.write(json.dumps(value, indent=2).replace("\n", "\n  "))
        f.write("\n}\n")
    return Path(path)


ARRAY_BLOCK = 1 << 16  # integers formatted at a time


def _is_array(value) -> bool:
    return hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1


def _write_integers(f, values) -> None:
    f.write("[")
    for start in range(0, len(values), ARRAY_BLOCK):
        f.write(("," if start else "") + ",".join(map(str, values[start : start + ARRAY_BLOCK].tolist())))
    f.write("]")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return write_text(path, buf.getvalue())


def refuse_existing(path: str | os.PathLike, overwrite: bool, what: str = "output") -> Path:
    """Stop before any work if ``path`` exists and the user did not ask to replace it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists; choose another {what} or pass --overwrite to replace it")
    return path


def write_new(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path``, or, when that name is taken, to ``stem-2.suffix``, ``stem-3.suffix``
    and so on; return where it went. No file is ever replaced, and the file appears whole or not at
    all: it is written under a hidden temporary name (which a dataset reader skips) and hard-linked
    to the first free name (a link, unlike a rename, fails where the name exists, however late
    another writer took it). Where there are no hard links, the name is claimed with an exclusive
    create and written there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        for target in _free_names(path):
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                continue
            except OSError:  # no hard links here (some network and FAT file systems)
                return _write_exclusive(path, data)
        raise UsageError(f"{path}: a million files of that name already exist beside it")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def copy_new(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``write_new`` of the bytes of the file ``source``."""
    return write_new(path, Path(source).read_bytes())


def _free_names(path: Path):
    yield path
    for n in range(2, 1_000_000):
        yield path.with_name(f"{path.stem}-{n}{path.suffix}")


def _write_exclusive(path: Path, data: bytes) -> Path:
    for target in _free_names(path):
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return target
    raise UsageError(f"{path}: a million files of that name already exist beside it")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex, read a block at a time."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def default_run_dir(root: str | os.PathLike = "runs", tag: str = "") -> Path:
    """``runs/<timestamp>[-tag]``, with a counter if that name is taken."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / (f"{stamp}-{tag}" if tag else stamp)
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, overwrite: bool = False):
    """Build a directory under a temporary name; it appears at ``final`` only when complete.

    An interrupted or failed run leaves nothing behind, and an existing directory is replaced
    only with ``overwrite`` and only once the new one is whole. A run killed outright leaves its
    ``.NAME.*.partial``; the next one to ``final`` removes it (see ``remove_stale_partials``).
    """
    final = Path(final)
    refuse_existing(final, overwrite, "--out directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_maker()}.", suffix=".partial", dir=final.parent))
    os.chmod(stage, 0o777 & ~_UMASK)
    carried: list[str] = []
    try:
        yield stage
        refuse_existing(final, overwrite, "--out directory")
        if final.exists():
            carried = _carry_over(final, stage)
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(stage, final)
            shutil.rmtree(old)
        else:
            os.replace(stage, final)
    finally:
        if stage.exists():
            for name in carried:  # the swap failed: what was the user's goes back where it was
                home = final if final.exists() else next(final.parent.glob(f".{final.name}.*.old/{final.name}"), None)
                if home is not None and (stage / name).exists():
                    os.replace(stage / name, home / name)
            shutil.rmtree(stage)


# What a run directory holds that is not the run's but its users': the corrections stored by
# `serve` (feedback/). A run replaced with --overwrite passes them on to the new one.
KEPT_ON_OVERWRITE = ("feedback",)


def _carry_over(old: Path, new: Path) -> list[str]:
    """Move ``KEPT_ON_OVERWRITE`` entries from ``old`` into ``new`` (where it has none); return their names."""
    moved = []
    for name in KEPT_ON_OVERWRITE:
        if (old / name).exists() and not (new / name).exists():
            os.replace(old / name, new / name)
            moved.append(name)
    return moved


# --- partial directories of killed runs -------------------------------------------------------
# A partial directory's name says who made it: ``.NAME.<host>-<pid>-<start>.<random>.partial``,
# ``host`` a hash of the machine's name (an --out on a shared disk may be written from several),
# ``start`` the process's start time in clock ticks since boot (Linux; 0 elsewhere), so that a
# later process given the same pid is not mistaken for its maker.


def _maker(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{_host()}-{pid}-{_start_time(pid) or 0}"


def _host() -> str:
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _start_time(pid: int) -> int | None:
    """The process's start time (``/proc/<pid>/stat`` field 22); None when it has ended or is a zombie,
    or where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name before ")" may hold spaces
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def remove_stale_partials(final: str | os.PathLike) -> list[Path]:
    """Remove the partial directories for ``final`` that this user's killed runs left, and list them.

    Only those whose name says they were made on this machine, by a process that is gone (no
    process of that pid, or one started at another time), and that this user owns: a partial
    of a run still going, of another user, or of an older naming is left alone.
    """
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\w{{8}})-(\d+)-(\d+)\.\w+\.partial")
    removed = []
    for path in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        made = pattern.fullmatch(path.name)
        if made and made[1] == _host() and _is_own(path) and not _alive(int(made[2]), int(made[3])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _is_own(path: Path) -> bool:
    try:
        owner = path.lstat().st_uid
    except OSError:
        return False
    return path.is_dir() and not path.is_symlink() and (not hasattr(os, "getuid") or owner == os.getuid())


def _alive(pid: int, start: int) -> bool:
    if Path("/proc/self/stat").exists():
        return _start_time(pid) == start
    if os.name != "posix":
        return True  # no safe way to ask here: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
