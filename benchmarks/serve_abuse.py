"""Hostile image files against `image-logreg serve`: do they starve an honest upload?

Starts the server on 127.0.0.1 (a free port) and measures a normal upload (a 600x600 PNG of
an MNIST digit, dark on light, as a user would bring it) first alone, then while 4 clients send
files whose headers promise huge images, in a loop, for 20 s (``--seconds``):

- a 335-byte JPEG whose frame header claims 9000x9000;
- a 9000x9000 black PNG (79 KB);
- an 89000x1000 black PNG (87 KB);

each as the raw body and as multipart field ``files``, in turn. Every client waits for its
answer before sending again; at most ``--max-requests`` each, and the run stops by itself.

Targets: the normal upload's p99 under attack < 10x its idle p99; the server's peak memory
(RSS, sampled every 20 ms) < 300 MiB above its memory before the attack; every hostile request
answered with a 4xx in under 1 s. Exit status 1 if any is missed.

    python benchmarks/serve_abuse.py --data-dir ../shared/data [--update-results]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from hostile_images import hostile_files  # noqa: E402
from sections import machine, replace_block  # noqa: E402
from serve_load import http_request, read_response, rss_mib, start_server, train_model  # noqa: E402

HOSTILE_CLIENTS = 4
IDLE_REQUESTS = 200
TARGETS = {"p99_ratio": 10.0, "rss_growth_mib": 300.0, "hostile_seconds": 1.0}
BOUNDARY = "abuse-boundary-7f3a"


# --- the requests -----------------------------------------------------------------------------


def normal_png(data_dir: str) -> bytes:
    """An MNIST test digit as a user brings it: dark ink on light, noisy paper, 600x600."""
    from PIL import Image

    from image_logreg import load_split

    digit = load_split("mnist", data_dir, "test", download=False).images[0].numpy()
    big = np.asarray(Image.fromarray(255 - digit).resize((600, 600), Image.Resampling.BICUBIC), dtype=float)
    noisy = big * 0.85 + 20 + np.random.default_rng(0).normal(0, 4, big.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def raw_upload(name: str, data: bytes) -> bytes:
    kind = "image/jpeg" if name.endswith(".jpg") else "image/png"
    return http_request("POST", f"/predict?model=mnist&filename={name}", data, kind)


def multipart_upload(name: str, data: bytes) -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return http_request("POST", "/predict?model=mnist", body, f"multipart/form-data; boundary={BOUNDARY}")


def hostile_requests() -> list[tuple[str, bytes]]:
    """(label, request) for each hostile file, raw and multipart."""
    requests = []
    for name, data in hostile_files().items():
        requests += [(f"{name} (raw)", raw_upload(name, data)), (f"{name} (multipart)", multipart_upload(name, data))]
    return requests


# --- the clients ------------------------------------------------------------------------------


async def client(host: str, port: int, requests: list[tuple[str, bytes]], until: float, limit: int, offset: int = 0):
    """Send ``requests`` in turn, one at a time, until ``until`` or ``limit``: (label, status, seconds) each."""
    reader, writer = await asyncio.open_connection(host, port)
    answers = []
    try:
        for i in range(offset, offset + limit):
            if time.perf_counter() > until:
                break
            label, request = requests[i % len(requests)]
            start = time.perf_counter()
            writer.write(request)
            status = await read_response(reader)
            answers.append((label, status, time.perf_counter() - start))
    finally:
        writer.close()
    return answers


async def attack(host: str, port: int, normal: bytes, seconds: float, limit: int) -> tuple[list, list]:
    """The normal upload from one client while HOSTILE_CLIENTS send hostile files, all for ``seconds``."""
    until = time.perf_counter() + seconds
    hostile = hostile_requests()
    tasks = [client(host, port, hostile, until, limit, offset=i) for i in range(HOSTILE_CLIENTS)]
    normal_answers, *hostile_answers = await asyncio.gather(client(host, port, [("normal", normal)], until, limit), *tasks)
    return normal_answers, [answer for answers in hostile_answers for answer in answers]


class PeakMemory:
    """The highest RSS of process ``pid``, sampled every 20 ms in a thread while in the block."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def percentile(seconds: list[float], q: float) -> float:
    """The ``q`` quantile of ``seconds``, in ms (NaN when there are none)."""
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def run(model: Path, data_dir: str, seconds: float, limit: int) -> dict:
    normal = raw_upload("digit.png", normal_png(data_dir))
    proc, host, port = start_server(model, "auto")
    try:
        asyncio.run(client(host, port, [("normal", normal)], time.perf_counter() + 60, 20))  # warm up
        idle = asyncio.run(client(host, port, [("normal", normal)], time.perf_counter() + 60, IDLE_REQUESTS))
        memory_before = rss_mib(proc.pid)
        with PeakMemory(proc.pid) as memory:
            under_attack, hostile = asyncio.run(attack(host, port, normal, seconds, limit))
        memory_after = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    kinds = {}
    for label, status, took in hostile:
        kinds.setdefault(label, []).append((status, took))
    return {
        "seconds": seconds,
        "idle": {"requests": len(idle), "errors": sum(s != 200 for _, s, _ in idle),
                 "p50_ms": percentile([t for *_, t in idle], 0.5), "p99_ms": percentile([t for *_, t in idle], 0.99)},
        "attacked": {"requests": len(under_attack), "errors": sum(s != 200 for _, s, _ in under_attack),
                     "p50_ms": percentile([t for *_, t in under_attack], 0.5),
                     "p99_ms": percentile([t for *_, t in under_attack], 0.99)},
        "hostile": {label: {"requests": len(answers), "statuses": sorted({s for s, _ in answers}),
                            "p50_ms": percentile([t for _, t in answers], 0.5),
                            "max_ms": max(t for _, t in answers) * 1000}
                    for label, answers in kinds.items()},
        "memory_before_mib": memory_before, "memory_peak_mib": max(memory.peak, memory_before),
        "memory_after_mib": memory_after,
    }


def checks(figures: dict) -> dict[str, tuple[str, bool]]:
    ratio = figures["attacked"]["p99_ms"] / figures["idle"]["p99_ms"]
    growth = figures["memory_peak_mib"] - figures["memory_before_mib"]
    hostile = figures["hostile"].values()
    slowest = max(h["max_ms"] for h in hostile)
    all_4xx = all(400 <= s < 500 for h in hostile for s in h["statuses"])
    return {
        "normal upload p99, attacked vs idle": (f"{ratio:.1f}x (< 10x)", ratio < TARGETS["p99_ratio"]),
        "normal uploads answered": (f"{figures['attacked']['errors']} errors of {figures['attacked']['requests']} (0)",
                                    figures["attacked"]["errors"] == 0 and figures["attacked"]["requests"] > 0),
        "server peak memory growth": (f"{growth:+.0f} MiB (< 300 MiB)", growth < TARGETS["rss_growth_mib"]),
        "hostile requests: 4xx": ("all" if all_4xx else "not all", all_4xx),
        "hostile requests: slowest answer": (f"{slowest:.0f} ms (< 1000 ms)", slowest < TARGETS["hostile_seconds"] * 1000),
    }


def render(figures: dict) -> str:
    idle, attacked = figures["idle"], figures["attacked"]
    lines = [
        f"Measured {date.today()} on {machine('torch', 'fastapi', 'uvicorn', 'pillow')}; server and clients share the machine.",
        f"Reproduce: `python benchmarks/serve_abuse.py --data-dir ../shared/data --update-results` "
        f"({HOSTILE_CLIENTS} hostile clients for {figures['seconds']:.0f} s, one normal client beside them).",
        "",
        "| requests | count | status | p50 | p99 / slowest |",
        "|---|---:|---|---:|---:|",
        f"| normal 600x600 PNG, idle | {idle['requests']} | {'200' if not idle['errors'] else str(idle['errors']) + ' errors'} "
        f"| {idle['p50_ms']:.1f} ms | {idle['p99_ms']:.1f} ms |",
        f"| normal 600x600 PNG, under attack | {attacked['requests']} | "
        f"{'200' if not attacked['errors'] else str(attacked['errors']) + ' errors'} "
        f"| {attacked['p50_ms']:.1f} ms | {attacked['p99_ms']:.1f} ms |",
    ]
    for label, h in figures["hostile"].items():
        statuses = ", ".join(map(str, h["statuses"]))
        lines.append(f"| `{label}` | {h['requests']:,} | {statuses} | {h['p50_ms']:.1f} ms | {h['max_ms']:.1f} ms |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {text} | {'yes' if ok else '**no**'} |" for name, (text, ok) in checks(figures).items()]
    lines += ["", f"Server memory: {figures['memory_before_mib']:.0f} MiB before the attack, "
                  f"{figures['memory_peak_mib']:.0f} MiB at its peak, {figures['memory_after_mib']:.0f} MiB after."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--model", default=None, help="run directory to serve (default: train one with the defaults)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the attack lasts (default: %(default)s)")
    parser.add_argument("--max-requests", type=int, default=20000, help="most requests per client (default: %(default)s)")
    parser.add_argument("--update-results", action="store_true", help="write the figures into results.md")
    parser.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else train_model(args.data_dir, Path(tmp))
        figures = run(model, args.data_dir, args.seconds, args.max_requests)
    text = render(figures)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if args.update_results:
        replace_block(ROOT / "benchmarks" / "results.md", "serve-abuse", text,
                      title="Hostile image files: `benchmarks/serve_abuse.py`")
    return 0 if all(ok for _, ok in checks(figures).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
