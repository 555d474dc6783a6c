"""Load on `image-logreg serve` over loopback: throughput, latency, errors and memory, side by side.

Starts the server on 127.0.0.1 (a free port), sends a bounded number of requests per scenario
from 8 concurrent keep-alive connections, in 5 rounds that take turns, and stops by itself:

- ``/v2/health/live``: the framework's own ceiling on this machine;
- ``infer`` with one MNIST test image (UINT8);
- one 28x28 PNG uploaded to ``/predict``;
- ``infer`` with batches of 256 images.

Targets, all from the same run: single-image infer >= 60% of the health endpoint's req/s,
PNG upload >= 50%, p99 <= 100 ms, batches >= 5,000 images/s, no errors, server memory growth
< 10%. Exit status 1 if any is missed.

    python benchmarks/serve_load.py --data-dir ../shared/data [--update-results]

The load generator is plain asyncio over raw HTTP/1.1 with the requests encoded up front,
so that the client costs as little of the shared CPU as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import machine, replace_block  # noqa: E402

CONCURRENCY = 8
TIME_LIMIT = 120.0  # seconds per scenario and round, whatever the request count
ROUNDS = 5
TARGETS = {"infer_ratio": 0.60, "png_ratio": 0.50, "p99_ms": 100.0, "batch_images_per_s": 5000.0, "memory_growth": 0.10}


# --- the server -------------------------------------------------------------------------------


def start_server(model: Path, http: str) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "image_logreg", "serve", f"mnist={model}", "--port", "0", "--http", http],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("serving "):
            url = line.split(" at ")[1].split()[0]
            host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
            return proc, host, int(port)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("the server did not start")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the requests -----------------------------------------------------------------------------


def http_request(method: str, path: str, body: bytes = b"", content_type: str | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body or method == "POST":
        head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def infer_request(images: np.ndarray) -> bytes:
    body = {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.reshape(-1).tolist()}]}
    return http_request("POST", "/v2/models/mnist/infer", json.dumps(body).encode(), "application/json")


def png_request(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return http_request("POST", "/predict?model=mnist", buf.getvalue(), "image/png")


def scenarios(images: np.ndarray, count: int, batch_count: int) -> list[dict]:
    return [
        {"name": "health", "label": "`GET /v2/health/live`", "images": 0, "count": count,
         "requests": [http_request("GET", "/v2/health/live")]},
        {"name": "infer", "label": "`infer`, 1 image (UINT8 JSON)", "images": 1, "count": count,
         "requests": [infer_request(images[i : i + 1]) for i in range(64)]},
        {"name": "png", "label": "`/predict`, one 28x28 PNG", "images": 1, "count": count,
         "requests": [png_request(images[i]) for i in range(64)]},
        {"name": "batch", "label": "`infer`, batches of 256 (UINT8 JSON)", "images": 256, "count": batch_count,
         "requests": [infer_request(images[i * 256 : (i + 1) * 256]) for i in range(8)]},
    ]


# --- the load ---------------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> int:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def load(host: str, port: int, requests: list[bytes], count: int, start_index: int = 0) -> dict:
    """``count`` requests (cycling through ``requests`` from ``start_index``) from CONCURRENCY
    connections: their latencies, errors and wall time."""
    next_index = iter(range(start_index, start_index + count))
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + TIME_LIMIT

    async def connection():
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in next_index:
                if time.perf_counter() > deadline:
                    break
                start = time.perf_counter()
                writer.write(requests[i % len(requests)])
                status = await read_response(reader)
                latencies.append(time.perf_counter() - start)
                errors += status != 200
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(CONCURRENCY)))
    return {"latencies": latencies, "errors": errors, "seconds": time.perf_counter() - start}


def summary(parts: list[dict]) -> dict:
    """One scenario's figures over its rounds: requests per second of wall time spent on it."""
    ms = sorted(x * 1000 for part in parts for x in part["latencies"])
    seconds = sum(part["seconds"] for part in parts)
    return {
        "requests": len(ms), "errors": sum(part["errors"] for part in parts), "seconds": seconds,
        "req_per_s": len(ms) / seconds, "p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
    }


def run_load(*args) -> dict:
    """One load run, on uvloop where installed: the client then takes less of the shared CPU."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(load(*args))
    return uvloop.run(load(*args))


def run(model: Path, data_dir: str, count: int, batch_count: int, http: str = "auto") -> dict:
    from image_logreg import load_split

    images = load_split("mnist", data_dir, "test", download=False).images[:2048].numpy()
    plans = scenarios(images, count, batch_count)
    proc, host, port = start_server(model, http)
    try:
        for plan in plans:  # warm every path before the first measurement
            run_load(host, port, plan["requests"], min(200, plan["count"]))
        memory_before = rss_mib(proc.pid)
        # The scenarios take turns, ROUNDS times, so that a slower or quicker spell of this shared
        # machine falls on all of them alike and their ratios compare like with like.
        parts = {plan["name"]: [] for plan in plans}
        for round_ in range(ROUNDS):
            for plan in plans:
                done = parts[plan["name"]]
                share = plan["count"] // ROUNDS + (round_ < plan["count"] % ROUNDS)
                done.append(run_load(host, port, plan["requests"], share, sum(len(part["latencies"]) for part in done)))
        results = {}
        for plan in plans:
            result = summary(parts[plan["name"]])
            result.update(label=plan["label"], images_per_s=result["req_per_s"] * plan["images"])
            results[plan["name"]] = result
            print(f"{plan['name']}: {result['req_per_s']:.0f} req/s, p99 {result['p99_ms']:.1f} ms", file=sys.stderr)
        memory_after = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"scenarios": results, "memory_before_mib": memory_before, "memory_after_mib": memory_after,
            "count": count, "batch_count": batch_count, "http": http}


def checks(figures: dict) -> dict[str, tuple[str, bool]]:
    s = figures["scenarios"]
    health = s["health"]["req_per_s"]
    growth = figures["memory_after_mib"] / figures["memory_before_mib"] - 1
    worst_p99 = max(r["p99_ms"] for r in s.values())
    return {
        "single-image infer vs health": (f"{s['infer']['req_per_s'] / health:.0%} (>= 60%)",
                                         s["infer"]["req_per_s"] / health >= TARGETS["infer_ratio"]),
        "PNG upload vs health": (f"{s['png']['req_per_s'] / health:.0%} (>= 50%)",
                                 s["png"]["req_per_s"] / health >= TARGETS["png_ratio"]),
        "worst p99": (f"{worst_p99:.1f} ms (<= 100 ms)", worst_p99 <= TARGETS["p99_ms"]),
        "batches of 256": (f"{s['batch']['images_per_s']:,.0f} images/s (>= 5,000)",
                           s["batch"]["images_per_s"] >= TARGETS["batch_images_per_s"]),
        "errors": (f"{sum(r['errors'] for r in s.values())} (0)", all(r["errors"] == 0 for r in s.values())),
        "server memory growth": (f"{growth:+.1%} (< 10%)", growth < TARGETS["memory_growth"]),
    }


def parser_name(http: str) -> str:
    if http != "auto":
        return http
    try:
        import httptools  # noqa: F401  (uvicorn's choice when it is installed)
    except ImportError:
        return "h11"
    return "httptools"


def render(figures: dict) -> str:

    lines = [
        f"Measured {date.today()} on {machine('torch', 'fastapi', 'uvicorn')}, HTTP parser {parser_name(figures['http'])}; "
        "server and load generator share the machine.",
        f"Reproduce: `python benchmarks/serve_load.py --data-dir ../shared/data"
        f"{'' if figures['http'] == 'auto' else ' --http ' + figures['http']} --update-results` "
        f"({figures['count']:,} requests per scenario, {figures['batch_count']} for batches; {CONCURRENCY} concurrent).",
        "",
        "| scenario | req/s | images/s | p50 | p99 | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in figures["scenarios"].values():
        images = f"{r['images_per_s']:,.0f}" if r["images_per_s"] else "-"
        lines.append(f"| {r['label']} | {r['req_per_s']:,.0f} | {images} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {r['errors']} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {text} | {'yes' if ok else '**no**'} |" for name, (text, ok) in checks(figures).items()]
    lines += ["", f"Server memory: {figures['memory_before_mib']:.0f} MiB after warm-up, "
                  f"{figures['memory_after_mib']:.0f} MiB after all scenarios."]
    return "\n".join(lines) + "\n"


def train_model(data_dir: str, folder: Path) -> Path:
    from image_logreg.cli import main

    out = folder / "mnist"
    if main(["train", "--data-dir", data_dir, "--out", str(out), "--quiet", "--no-download"]) != 0:
        raise SystemExit("training the benchmark's model failed")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--model", default=None, help="run directory to serve (default: train one with the defaults)")
    parser.add_argument("--requests", type=int, default=10000, help="requests per single-image scenario")
    parser.add_argument("--batch-requests", type=int, default=200, help="requests of 256 images")
    parser.add_argument("--http", choices=["auto", "httptools", "h11"], default="auto", help="the server's HTTP parser")
    parser.add_argument("--update-results", action="store_true", help="write the figures into results.md and the documentation (docs/)")
    parser.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else train_model(args.data_dir, Path(tmp))
        figures = run(model, args.data_dir, args.requests, args.batch_requests, args.http)
    text = render(figures)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if args.update_results:
        parser_used = parser_name(args.http)
        if parser_used == parser_name("auto"):  # what `serve` uses by default: results.md and docs/serving.md
            replace_block(ROOT / "benchmarks" / "results.md", "serve", text, title="Serving: `benchmarks/serve_load.py`")
            replace_block(ROOT / "docs" / "serving.md", "serve-results", text)
        else:
            replace_block(ROOT / "benchmarks" / "results.md", f"serve-{parser_used}", text,
                          title=f"Serving with `--http {parser_used}`")
    return 0 if all(ok for _, ok in checks(figures).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
