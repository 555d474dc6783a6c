"""Data-parallel training: 2 gloo ranks on CPU give the weights one process gives.

The launches are real: torchrun on one machine (directly and through ``train --nproc``) and
two torchrun "nodes" meeting at a rendezvous on 127.0.0.1. Each trains 2 epochs on 2,000 MNIST
images, a few seconds, most of it imports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli

TOLERANCE = 1e-5  # max abs difference of any weight, 2 ranks against 1 process
TIMEOUT = 180  # seconds for any launch: a hang fails the test instead of the whole CI job
SMALL = ["--train-subset", "2000", "--val-fraction", "0.05", "--epochs", "2", "--quiet", "--no-download"]


@pytest.fixture(autouse=True)
def own_temporary_directory(tmp_path, monkeypatch):
    """torchrun leaves its log folders in the temporary directory: here, the test's own."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def env() -> dict:
    """The ranks talk over loopback only, and give up on a lost peer within a minute."""
    return dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", IMAGE_LOGREG_DIST_TIMEOUT="60")


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *map(str, args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from image_logreg.checkpoint import load_model

    model, _ = load_model(run / "model.safetensors")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def one_process(capsys, real_data, out: Path, *flags) -> Path:
    code, _, err = run_cli(capsys, "train", "--data-dir", real_data, "--out", out, *SMALL, *flags)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["world_size"] == 1
    return out


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("image-logreg: error:")]


def no_run_left(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging dir


@pytest.mark.parametrize("flags", [
    ["--optimizer", "sgd", "--momentum", "0.9", "--batch-size", "99"],  # 49 and 50 rows a rank; the last batch 20
    ["--optimizer", "adam", "--batch-size", "100", "--train-subset", "2001"],  # a last batch of 1 row: rank 0 has none
    ["--optimizer", "lbfgs"],
    ["--optimizer", "lbfgs", "--weight-decay", "1e-3", "--seed", "2"],
], ids=["sgd", "adam", "lbfgs", "lbfgs-decay"])
def test_two_ranks_give_the_weights_of_one_process(capsys, real_data, tmp_path, flags):
    single = one_process(capsys, real_data, tmp_path / "one", *flags)
    out = tmp_path / "two"
    done = subprocess.run(
        torchrun("--standalone", "--nproc-per-node", 2, "-m", "image_logreg", "train", "--data-dir", real_data,
                 "--out", out, *SMALL, *flags),
        capture_output=True, text=True, env=env(), timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    diff = max_diff(single, out)
    print(f"{' '.join(flags)}: max abs weight difference {diff:.3g}")
    assert diff <= TOLERANCE
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    h1, h2 = (json.loads((run / "history.json").read_text()) for run in (single, out))
    assert [h["epoch"] for h in h1] == [h["epoch"] for h in h2]
    for a, b in zip(h1, h2):  # the figures are the whole sets', summed over the ranks
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_two_ranks_streaming_give_the_weights_of_one_process_in_memory(capsys, real_data, tmp_path):
    """Each rank reads its share of every batch from the IDX file: the same weights again."""
    flags = ["--optimizer", "sgd", "--momentum", "0.9", "--batch-size", "99"]
    single = one_process(capsys, real_data, tmp_path / "one", *flags)
    out = tmp_path / "two"
    done = subprocess.run(
        torchrun("--standalone", "--nproc-per-node", 2, "-m", "image_logreg", "train", "--data-dir", real_data,
                 "--out", out, *SMALL, *flags, "--max-memory", "1K"),
        capture_output=True, text=True, env=env(), timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["streamed"] is True and config["world_size"] == 2
    assert max_diff(single, out) <= TOLERANCE


def test_the_nproc_shortcut_launches_torchrun_and_passes_its_status(capsys, real_data, tmp_path):
    flags = ["--optimizer", "adam", "--seed", "3"]
    single = one_process(capsys, real_data, tmp_path / "one", *flags)
    out = tmp_path / "two"
    cli = [sys.executable, "-m", "image_logreg", "train", "--nproc", "2", "--data-dir", str(real_data)]
    done = subprocess.run([*cli, "--out", str(out), *SMALL, *flags, "--json"],
                          capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["run_dir"] == str(out)  # rank 0's summary alone: one JSON document
    assert max_diff(single, out) <= TOLERANCE
    assert json.loads((out / "config.json").read_text())["world_size"] == 2

    # a failure in the ranks: each says so in one line, the status is the ranks' (2: bad input), nothing is left
    bad = tmp_path / "bad"
    done = subprocess.run([*cli[:-1], str(tmp_path / "nowhere"), "--out", str(bad), *SMALL],
                          capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert done.returncode == 2, done.stderr[-3000:]
    assert sorted(line.split(":")[2].strip() for line in errors(done.stderr)) == ["rank 0", "rank 1"], done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr
    no_run_left(bad)

    # an existing --out is refused before any rank starts
    done = subprocess.run([*cli, "--out", str(out), *SMALL], capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert done.returncode == 2 and len(errors(done.stderr)) == 1 and "already exists" in done.stderr, done.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("torchelastic_", "image-logreg-torchrun-"))]


def launch_nodes(node_args: list[list[str]], rdzv: str = "c10d") -> list[subprocess.CompletedProcess]:
    """One torchrun per "node" (one rank each) on this machine, meeting at 127.0.0.1; node K gets node_args[K]."""
    port = free_port()
    procs = [
        subprocess.Popen(
            torchrun("--nnodes", len(node_args), "--node-rank", k, "--nproc-per-node", 1, "--rdzv-backend", rdzv,
                     "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "image_logreg", "train", *args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        )
        for k, args in enumerate(node_args)
    ]
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_two_nodes_give_the_weights_of_one_process(capsys, real_data, tmp_path):
    flags = ["--optimizer", "sgd", "--batch-size", "64", "--seed", "1"]
    single = one_process(capsys, real_data, tmp_path / "one", *flags)
    out = tmp_path / "nodes"  # c10d numbers the nodes as they arrive: whichever is rank 0 writes here
    args = ["--data-dir", str(real_data), "--out", str(out), *SMALL, *flags]
    results = launch_nodes([args, args])
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    diff = max_diff(single, out)
    print(f"two nodes: max abs weight difference {diff:.3g}")
    assert diff <= TOLERANCE
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


def test_a_node_that_fails_stops_the_other_and_leaves_no_run(real_data, tmp_path):
    """Node 1 has no data where it was told to look: it says so, and node 0 (rank 0, the one that
    writes) stops at once with one line of its own, leaving no run directory behind.

    Gloo can finish node 1's side of the join before node 0's: on a busy machine node 1 then fails
    while node 0 is still joining, and node 0's line says it could not join rather than that it
    lost the other ranks. Either is true, and either is one line."""
    out = tmp_path / "run"
    common = ["--out", str(out), *SMALL]
    results = launch_nodes([["--data-dir", str(real_data), *common], ["--data-dir", str(tmp_path / "nowhere"), *common]],
                           rdzv="static")  # static: --node-rank decides the rank, so node 0 is rank 0
    assert all(r.returncode != 0 for r in results), [r.stderr[-2000:] for r in results]
    (first,), (second,) = errors(results[0].stderr), errors(results[1].stderr)
    assert "rank 0 of 2 lost the other ranks" in first or "rank 0 could not join the other ranks" in first, first
    assert "rank 1: mnist train data missing" in second, second
    no_run_left(out)


def test_nodes_started_with_different_settings_refuse_to_train(real_data, tmp_path):
    args = ["--data-dir", str(real_data), "--out", str(tmp_path / "run"), *SMALL]
    results = launch_nodes([[*args, "--lr", "0.01"], [*args, "--lr", "0.02"]], rdzv="static")
    assert all(r.returncode != 0 for r in results), [r.stderr[-2000:] for r in results]
    for r in results:
        assert any("was started with other settings or data than rank 0" in line for line in errors(r.stderr)), r.stderr
    no_run_left(tmp_path / "run")


# --- the parts, in this process -------------------------------------------------------------


def test_nproc_is_taken_out_of_the_command_the_ranks_get():
    from image_logreg.distributed import torchrun_args, without_nproc

    argv = ["train", "--nproc", "4", "--lr", "0.1", "--nproc=3", "--npro", "2", "--no-cache"]
    assert without_nproc(argv) == ["train", "--lr", "0.1", "--no-cache"]
    assert torchrun_args(2, ["train", "--nproc", "2", "--epochs", "1"]) == [
        "--standalone", "--nproc-per-node", "2", "-m", "image_logreg", "train", "--epochs", "1",
    ]


def test_nproc_must_be_positive_and_is_not_for_use_under_torchrun(capsys, monkeypatch):
    code, _, err = run_cli(capsys, "train", "--nproc", "0")
    assert code == 2 and "--nproc must be at least 1" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, _, err = run_cli(capsys, "train", "--nproc", "2")
    assert code == 2 and err.strip() == "image-logreg: error: rank 1: --nproc starts torchrun itself; under torchrun leave it out"


def test_timeout_comes_from_the_environment(monkeypatch):
    from image_logreg.distributed import DEFAULT_TIMEOUT, TIMEOUT_ENV, timeout_seconds
    from image_logreg.errors import UsageError

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_seconds() == DEFAULT_TIMEOUT
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert timeout_seconds() == 12.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(UsageError):
            timeout_seconds()


def test_shards_cover_every_row_once():
    from image_logreg.distributed import Group

    for n in (0, 1, 5, 128, 1001):
        for world in (1, 2, 3, 8):
            rows = [i for r in range(world) for i in range(n)[Group(r, world).shard(n)]]
            assert rows == list(range(n))


def test_full_objective_is_the_regularised_loss_and_its_gradient():
    """L-BFGS's closed-form objective against autograd on ``regularised_loss``."""
    from image_logreg.model import LogisticRegression
    from image_logreg.train import full_objective, regularised_loss

    torch.manual_seed(0)
    x, y = torch.rand(333, 20), torch.randint(0, 4, (333,))
    model = LogisticRegression((20,), 4)
    loss = regularised_loss(model, x, y, 0.1)
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    got = full_objective(model, x, y, torch.nn.functional.one_hot(y, 4).float(), 0.1)
    assert got.item() == pytest.approx(loss.item(), rel=1e-6)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_full_objective_does_not_depend_on_the_thread_count():
    from image_logreg.model import LogisticRegression
    from image_logreg.train import full_objective

    torch.manual_seed(0)
    x, y = torch.rand(4000, 784), torch.randint(0, 10, (4000,))
    onehot = torch.nn.functional.one_hot(y, 10).float()
    model = LogisticRegression()
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            full_objective(model, x, y, onehot, 0.0)
            grads.append(model.linear.weight.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*grads)


# What each piece sees of the CPU thread settings, in a process whose new threads would default
# to 4 OpenMP and 4 MKL threads: torch.set_num_threads() on the calling thread does not reach them.
THREADS_PROBE = r"""
import ctypes, glob, json, os, torch
from image_logreg.model import LogisticRegression
from image_logreg.train import _each_piece, full_objective

lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*"))[0])
probes = {name: getattr(lib, name) for name in ("mkl_get_max_threads", "omp_get_max_threads") if hasattr(lib, name)}
seen = []
torch.set_num_threads(4)
_each_piece(lambda c: seen.append({name: f() for name, f in probes.items()}), range(8), torch.device("cpu"))

torch.manual_seed(0)
x, y = torch.rand(4000, 784), torch.randint(0, 10, (4000,))
onehot = torch.nn.functional.one_hot(y, 10).float()
model, grads = LogisticRegression(), []
for threads in (1, 4):
    torch.set_num_threads(threads)
    full_objective(model, x, y, onehot, 0.0)
    grads.append(model.linear.weight.grad)
print(json.dumps({"probes": sorted(probes), "seen": seen, "same": torch.equal(*grads)}))
"""


def test_each_piece_runs_on_one_thread_even_where_new_threads_default_to_more():
    import platform

    done = subprocess.run([sys.executable, "-c", THREADS_PROBE], capture_output=True, text=True, timeout=TIMEOUT,
                          env=dict(os.environ, OMP_NUM_THREADS="4", MKL_NUM_THREADS="4"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "mkl_get_max_threads" in result["probes"]  # torch's x86 builds carry MKL: the probe must see it
    assert "omp_get_max_threads" in result["probes"]
    assert len(result["seen"]) == 8
    assert all(set(counts.values()) == {1} for counts in result["seen"]), result["seen"]
    assert result["same"]  # 1 and 4 threads: the same gradient, bit for bit
