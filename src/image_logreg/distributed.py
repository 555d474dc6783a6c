"""Data-parallel training on torch.distributed: the ranks torchrun starts, and ``--nproc``.

Every rank holds the whole dataset, draws the same seeded shuffle and takes its own share of
each global batch; the gradients (already divided by the global batch's row count) are summed
across ranks, so each rank takes the optimizer step one process would take on the whole batch.
Rank 0 alone logs and writes the run directory.

Nothing here imports torch at module level: the command line reads the rank and launches
torchrun without paying for it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from .errors import ImageLogregError, UsageError

# Seconds a rank waits for the others (to start, or at any collective) before it gives up.
TIMEOUT_ENV = "IMAGE_LOGREG_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0


class DistributedError(ImageLogregError):
    """A rank lost the others: one failed, was stopped, or never arrived."""


def env_rank() -> int:
    """This process's rank as torchrun set it (0 when not started by torchrun, or started alone)."""
    return int(os.environ.get("RANK", "0")) if env_world_size() > 1 else 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise UsageError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


@dataclass(frozen=True)
class Group:
    """The ranks training together; a plain process is a group of one, whose methods do nothing."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows (sizes differ by at most one; may be empty)."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def all_reduce(self, tensor):
        """Sum ``tensor`` over the ranks, in place."""
        if self.active:
            import torch.distributed as dist

            _collective(self, dist.all_reduce, tensor)
        return tensor

    def all_reduce_grads(self, params) -> None:
        """Sum the parameters' gradients over the ranks, each in place (``fit`` steps one vector
        holding them all, ``optim.flat_parameters``: one collective a step)."""
        for p in params:
            self.all_reduce(p.grad)

    def broadcast_params(self, model) -> None:
        """Start every rank from rank 0's weights (the seeded initialisation should match anyway)."""
        if not self.active:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for p in model.parameters():
                _collective(self, dist.broadcast, p.data, 0)

    def check_same(self, what: str, value: str) -> None:
        """Refuse to train when the ranks were given different settings: they would silently
        compute different things and average them."""
        if not self.active:
            return
        import torch.distributed as dist

        values = [None] * self.world_size
        _collective(self, dist.all_gather_object, values, value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise UsageError(f"rank {differ[0]} was started with other {what} than rank 0; give every node the same command")

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            _collective(self, dist.barrier)


SINGLE = Group()


def _gist(exc: BaseException) -> str:
    """The first sentence of a backend's error, less the source location it starts with."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text.split(". ", 1)[0][:200]


def _collective(group: Group, op, *args) -> None:
    try:
        op(*args)
    except RuntimeError as exc:  # gloo and NCCL report a lost peer or a timeout as RuntimeError subclasses
        raise DistributedError(
            f"rank {group.rank} of {group.world_size} lost the other ranks ({_gist(exc)}); another rank failed "
            f"(see its error), stopped, or took longer than ${TIMEOUT_ENV}={timeout_seconds():g}s"
        ) from None


class Stopped(DistributedError):
    """torchrun stopped this rank, because another one failed."""


def _stop(signum, frame):
    # raised so that ``finally`` blocks run: the staging directory of the run is removed
    raise Stopped(f"rank {env_rank()} stopped by signal {signum} (torchrun stops every rank when one fails)")


@contextlib.contextmanager
def session(device):
    """Join the other ranks torchrun started, for the length of one run; yield ``(group, device)``.

    A process not started by torchrun (or started alone) is a group of one and joins nothing.
    The backend is gloo on CPU and NCCL on CUDA, where each rank takes the GPU of its local rank.
    A process group the caller set up already is used as it is and left open.
    """
    if env_world_size() <= 1:
        yield SINGLE, device
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield Group(dist.get_rank(), dist.get_world_size()), device
        return
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"this is process {local + 1} on a machine with {torch.cuda.device_count()} GPU(s): "
                "start one process per GPU, or train on the CPU with --device cpu"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    timeout = timeout_seconds()
    previous = _install(signal.SIGTERM, _stop)
    try:
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {env_rank()} could not join the other ranks: {_gist(exc)}") from None
        try:
            yield Group(dist.get_rank(), dist.get_world_size()), device
        finally:
            dist.destroy_process_group()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _install(signum, handler):
    try:
        return signal.signal(signum, handler)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        return None


# --- the --nproc shortcut -------------------------------------------------------------------

# Spellings argparse takes for --nproc (it accepts any unambiguous prefix of a long flag).
NPROC_FLAGS = ("--np", "--npr", "--npro", "--nproc")


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (or ``--nproc=N``), as the ranks are to get it."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in NPROC_FLAGS:
            skip = True
        elif arg.split("=", 1)[0] in NPROC_FLAGS:
            pass
        else:
            out.append(arg)
    return out


def torchrun_args(nproc: int, argv: list[str]) -> list[str]:
    """torchrun's arguments for ``train --nproc N ARGS``, on this machine: ``python -m
    torch.distributed.run`` followed by these is the same run."""
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", "image_logreg", *without_nproc(argv)]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``argv`` (a ``train`` command line) in ``nproc`` ranks under torchrun; the exit status
    of the first rank that failed, else 0.

    torchrun runs in a process of its own (``python -m image_logreg.distributed``: torchrun's own
    parser and launcher), which keeps the ranks' one-line errors and leaves out the traceback and
    report torchrun adds when a rank fails.
    """
    if env_world_size() > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        raise UsageError("--nproc starts torchrun itself; under torchrun leave it out")
    env = dict(os.environ)
    # torchrun sets this too, with a warning; each rank's steps are too small to share between threads
    env.setdefault("OMP_NUM_THREADS", "1")
    # all the ranks are on this machine: gloo need not listen beyond it (it would pick the host name's address)
    loopback = {"linux": "lo", "darwin": "lo0"}.get(sys.platform)
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    # torchrun keeps a folder of (empty) log folders in the temporary directory, and leaves it there
    with tempfile.TemporaryDirectory(prefix="image-logreg-torchrun-") as scratch:
        env["TMPDIR"] = scratch
        with subprocess.Popen([sys.executable, "-m", "image_logreg.distributed", *torchrun_args(nproc, argv)], env=env) as proc:
            try:
                code = proc.wait()
            except KeyboardInterrupt:  # the ranks got the ^C too: let torchrun stop them and report
                code = proc.wait()
    return 128 - code if code < 0 else code


def _torchrun(argv: list[str]) -> int:
    """``python -m torch.distributed.run ARGV``, but a failed rank ends it with that rank's exit
    status and no more than the rank's own error, which it has printed."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torch sets a level on each of its elastic loggers, so a parent's level would not reach them
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        code = failure.exitcode
        return 128 - code if code < 0 else code or 1
    except SignalException as exc:  # ^C or a kill: the ranks have said "interrupted" or been stopped
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    raise SystemExit(_torchrun(sys.argv[1:]))
