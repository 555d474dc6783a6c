"""Worker processes that end with the process that started them.

A pool's workers are told to stop by their parent; a parent killed outright (``kill -9``, the
out-of-memory killer) tells them nothing, and they would live on, each holding a core and its
memory. On Linux the kernel kills them when the parent goes; elsewhere a thread in each worker
watches for it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCH_SECONDS = 0.5  # how often a watching worker looks for its parent


def die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process end when ``parent_pid`` does; call it first thing in the worker."""
    if _kernel_kills_on_parent_death():
        # The parent may have died before the kernel was asked: this worker was then adopted already.
        if os.getppid() != parent_pid:
            os._exit(1)
        return
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _kernel_kills_on_parent_death() -> bool:
    """Ask Linux for SIGKILL when the parent ends; False where that cannot be asked.

    The kernel sends it when the parent's thread that forked this worker ends: pools here are
    made, used and shut down by one thread, so that thread outlives its workers' work.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    # A POSIX orphan gets a new parent id; Windows keeps the old one, but the pipe from a
    # multiprocessing parent closes when it ends.
    import multiprocessing

    parent = multiprocessing.parent_process()
    while os.getppid() == parent_pid and (parent is None or parent.is_alive()):
        time.sleep(WATCH_SECONDS)
    os._exit(1)
